"""What people look at: the figures (`plots`), the data files `dvc plots` draws (`plot_data`),
`metrics/report.md` (`render`, the `report` stage), and the summary across experiments
(`summary`, `pipeline summarize`)."""

"""What people look at: the figures (`plots`), the training stages' DVCLive log (`live`),
`metrics/report.md` (`render`, the `report` stage), the summary across experiments
(`summary`, `pipeline summarize`), and the latent explorer's static site (`explorer` and its page
`explorer_page`, the `explorer` stage)."""

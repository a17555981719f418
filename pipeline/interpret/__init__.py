"""What the SAE latents mean: firing statistics and top sets per class (`stats`, the
`latent_stats` stage, and its files `top_sets` and `records`), galleries, class purity against
random and PCA directions and the exact latent-to-head attribution (`latents`, the `interpret`
stage), and the two joined with the steering sweep for people to read (`cards`)."""

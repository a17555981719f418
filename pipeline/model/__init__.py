"""The head-gated ViT and everything that runs it: the timm ViT with AdaViT-style per-head gates
(`gated_vit`), attention reduced to the kept heads (`heads`), matmul FLOPs from the gates
(`flops`), the fine-tuning loop (`training`), writing the final block's CLS inputs
(`extraction`), and class-specific compact models with dropped heads removed (`pruned`)."""

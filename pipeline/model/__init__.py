"""The head-gated ViT and everything that runs it: the timm ViT with AdaViT-style per-head gates
(`gated_vit`) and its stored description (`config`), attention reduced to the kept heads
(`heads`), matmul FLOPs from the gates (`flops`), the fine-tuning loop (`training`) and the
record it leaves (`record`), writing the final block's CLS inputs (`extraction`), and
class-specific compact models with the dropped heads removed (`pruned`)."""

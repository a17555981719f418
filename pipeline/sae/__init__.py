"""Sparse autoencoders on the final block's CLS input: the interface every architecture offers
(`base`), one module per architecture (`topk`), the registry and file format (`registry`), and
training and evaluation (`training`, imported by `train_sae` alone)."""

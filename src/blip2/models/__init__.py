"""The BLIP-2 model in plain PyTorch, one file per box of the paper's figure (see docs/ARCHITECTURE.md)."""

"""placeholder"""
from __future__ import annotations

import torch
from torch import nn


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, each tensor counted once (tied weights share)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())

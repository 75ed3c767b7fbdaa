"""The optimiser every recipe step uses: AdamW, linear warmup, cosine decay to 10%."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch

__all__ = ["make_optimizer", "lr_at", "Progress", "train_steps"]


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases / norms / embeddings of one dimension do not."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


class Progress:
    """Prints ``name step/steps loss`` lines every ``every`` steps, with the elapsed time."""

    def __init__(self, name: str, steps: int, every: int) -> None:
        self.name, self.steps, self.every = name, steps, every
        self.start = time.time()
        self.sums: dict[str, float] = {}
        self.n = 0

    def update(self, step: int, **losses: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            avg = " ".join(f"{k} {v / self.n:.4f}" for k, v in self.sums.items())
            print(f"[{self.name}] step {step + 1}/{self.steps} {avg} ({time.time() - self.start:.0f}s)", flush=True)
            self.sums, self.n = {}, 0


def train_steps(model: torch.nn.Module, loss_at: Callable[[int], torch.Tensor], steps: int, lr: float,
                weight_decay: float, name: str, log_every: int) -> torch.nn.Module:
    """``steps`` AdamW steps on ``loss_at(step)`` (warm-up over 5%, cosine to 10%, gradient norm clipped at
    1), with progress lines; returns the model in eval mode."""
    opt = make_optimizer(model.parameters(), lr, weight_decay=weight_decay)
    progress = Progress(name, steps, log_every)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        progress.update(step, loss=loss.item())
    return model.eval()

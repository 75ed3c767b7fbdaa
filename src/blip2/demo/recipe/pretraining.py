"""The loop that pretrains the demo's image encoder and language model: AdamW, warm-up, cosine decay to 10%.

Stages 1 and 2 run ``blip2.train``'s loop. The pretraining steps (``recipe.vision``, ``recipe.lm``) do not:
that loop reads batches of a dataset through a DataLoader and reseeds dropout every step, while each
pretraining step draws its own batch from the scene tensors in memory (``loss_at(step)``). The optimizer
is ``blip2.train``'s (``adamw``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from blip2.train.loop import adamw

__all__ = ["LossPrinter", "pretraining_loop", "pretraining_lr"]


def pretraining_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    """Learning rate of step ``step`` (0-based) of ``steps``: linear warm-up reaching ``lr`` at step
    ``warmup - 1``, then cosine decay to ``lr / 10``.

    Not ``blip2.train.lr_at``: that warm-up starts from ``warmup_lr`` and reaches the peak one step later,
    and its decay, ``min_lr + (lr - min_lr) * ...``, rounds differently on about a third of the steps. The
    shipped demo weights were trained with this schedule (docs/TRAINING.md says why a rerun now gives other
    bytes)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


class LossPrinter:
    """Prints ``[name] step s/steps loss x`` lines every ``every`` steps: the means since the last line,
    and the time since the start."""

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


def pretraining_loop(model: torch.nn.Module, loss_at: Callable[[int], torch.Tensor], steps: int, lr: float,
                     weight_decay: float, name: str, log_every: int) -> torch.nn.Module:
    """``steps`` AdamW steps (betas 0.9, 0.98) on ``loss_at(step)``: ``pretraining_lr`` with a warm-up over 5%
    of the steps, gradient norm clipped at 1, progress lines; returns the model in eval mode."""
    opt = adamw(model, lr, weight_decay)
    printer = LossPrinter(name, steps, log_every)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = pretraining_lr(step, steps, lr, warmup=max(1, steps // 20))
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        printer.update(step, loss=loss.item())
    return model.eval()

"""The training loop both stages use: freezing, AdamW, warm-up + cosine schedule, accumulation, clipping,
autocast, DDP, logging, resumable checkpoints.

Reproducibility and resumption: everything random is a function of the seed and the step, never of
process history. The learning rate is a function of the step; the data position is ``step * grad_accum``
micro-batches (``GlobalBatchSampler``), each sample's augmentation is seeded by its key, dropout is
reseeded from (seed, step, rank) at every step, and hard negatives from (seed, step, micro-step). So a
checkpoint needs only the trained weights, the optimizer (and fp16 loss-scaler) state and the step, and
a resumed run reproduces the uninterrupted one bit for bit.

Files under ``config.out_dir`` (rank 0 writes): ``metrics.jsonl`` (one line per logged step: ``step``,
``loss`` and its parts, ``lr``, ``samples_per_s``, ``skipped``, ...), ``checkpoint/state.pt`` (resume
state, written atomically), and the final model in the Hugging Face format (the caller's ``save``), its
frozen weights as they were loaded whatever ``frozen_dtype`` they ran in. A directory that holds a run is
continued (``resume``) or started again (``overwrite``), never silently written over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from blip2.checkpoint import atomic_write, parse_dtype
from blip2.train.data import GlobalBatchSampler, ImageTextDataset, collate
from blip2.train.losses import rank_and_world
from blip2.train.presets import TrainConfig

__all__ = ["CHECKPOINT_FILE", "METRICS_FILE", "Trainee", "adamw", "check_out_dir", "derive_seed", "lr_at", "run"]

logger = logging.getLogger("blip2.train")

CHECKPOINT_FILE = os.path.join("checkpoint", "state.pt")
METRICS_FILE = "metrics.jsonl"


class Trainee(Protocol):
    """What ``run`` trains (``Blip2Stage1``, ``Blip2Stage2``): an nn.Module whose forward returns a dict
    with a scalar ``"loss"`` (other 0-dim tensors are logged as they are)."""

    autocast_dtype: torch.dtype | None

    def frozen_modules(self, freeze_vision: bool) -> list[nn.Module]: ...

    def after_step(self) -> None: ...


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence): independent streams per (seed, step, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def lr_at(step: int, config: TrainConfig, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up from ``warmup_lr`` to ``lr`` over
    ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps`` (per step; LAVIS decays per epoch)."""
    if step < config.warmup_steps:
        return config.warmup_lr + (config.lr - config.warmup_lr) * step / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def adamw(module: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.98),
          eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``module``: weight decay on matrices and embeddings; none on
    biases, norms, the temperature (parameters with ndim < 2)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def _cast_frozen(trainee: nn.Module, frozen: list[nn.Module], dtype: torch.dtype) -> dict[nn.Parameter, Tensor]:
    """Store the frozen weights in ``dtype``, except those the model keeps in fp32 at that dtype
    (``keeps_fp32``: T5's FFN output projections under fp16, which overflow otherwise). Returns the weights
    as loaded, on the CPU, for the saved model (``_as_loaded``): casting back would not give their bits."""
    ids = {id(p) for module in frozen for p in module.parameters()}
    model = getattr(trainee, "model", trainee)
    keeps = getattr(model, "keeps_fp32", lambda name, dtype: False)
    loaded: dict[nn.Parameter, Tensor] = {}
    for name, p in model.named_parameters():
        if id(p) in ids and p.is_floating_point() and p.dtype != dtype and not keeps(name, dtype):
            loaded[p] = p.data.cpu()
            p.data = p.data.to(dtype)
    return loaded


@contextlib.contextmanager
def _as_loaded(loaded: dict[nn.Parameter, Tensor]) -> Iterator[None]:
    """The frozen weights as loaded in place of their cast copies, while the model is saved."""
    cast = {p: p.data for p in loaded}
    for p, value in loaded.items():
        p.data = value
    try:
        yield
    finally:
        for p, value in cast.items():
            p.data = value


def check_out_dir(config: TrainConfig) -> None:
    """Refuse to start a run in a directory that holds one, unless ``resume`` (continue it) or ``overwrite``
    (start again) says what to do with it: a restart without either used to begin at step 0 silently."""
    if not config.out_dir or config.resume or config.overwrite:
        return
    held = [name for name in (CHECKPOINT_FILE, METRICS_FILE, "config.json")
            if os.path.exists(os.path.join(config.out_dir, name))]
    if held:
        raise ValueError(f"{config.out_dir} already holds a training run ({', '.join(held)}): pass --resume to "
                         "continue it, or --overwrite to start again")


def _trainable_state(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


def _atomic_save(obj: Any, path: str) -> None:
    # a run killed while writing leaves the previous checkpoint intact
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _max_steps(config: TrainConfig, num_samples: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    if config.epochs is None:
        raise ValueError("set max_steps or epochs")
    return max(1, math.ceil(config.epochs * num_samples / (config.batch_size * config.grad_accum)))


def _setup_distributed() -> bool:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU); True when this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _device(config: TrainConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _read_metrics(path: str, upto: int) -> list[dict[str, Any]]:
    """Logged lines of an earlier run up to step ``upto`` (a killed run may have logged past its checkpoint)."""
    kept = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
                if isinstance(row, dict) and row.get("step", upto + 1) <= upto:
                    kept.append(row)
    return kept


def run(trainee: nn.Module, dataset: ImageTextDataset,
        make_inputs: Callable[[dict[str, Any], int, int], dict[str, Any]], config: TrainConfig,
        save: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train ``trainee`` in place; returns the logged metrics (the same list on every rank).

    make_inputs(batch, step, micro) -> keyword arguments of ``trainee.forward`` (CPU tensors are moved
    to the device). ``save(directory)`` writes the final model; rank 0 calls it with ``config.out_dir``.
    """
    created_group = _setup_distributed()
    try:
        return _run(trainee, dataset, make_inputs, config, save)
    finally:
        if created_group:
            dist.destroy_process_group()


def _run(trainee: nn.Module, dataset: ImageTextDataset,
         make_inputs: Callable[[dict[str, Any], int, int], dict[str, Any]], config: TrainConfig,
         save: Callable[[str], None] | None) -> list[dict[str, Any]]:
    rank, world = rank_and_world()
    check_out_dir(config)  # on every rank, before any of them writes
    if world > 1:
        dist.barrier()
    device = _device(config)
    max_steps = _max_steps(config, len(dataset))
    loaded = _prepare(trainee, config, device)
    optimizer = adamw(trainee, config.lr, config.weight_decay, config.betas, config.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    model = trainee
    if world > 1:
        model = nn.parallel.DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None)

    step = 0
    out = config.out_dir
    ckpt_path = os.path.join(out, CHECKPOINT_FILE) if out else None
    if config.overwrite and ckpt_path and rank == 0 and os.path.exists(ckpt_path):
        os.remove(ckpt_path)  # the earlier run's: a later --resume must not continue it
    if config.resume and ckpt_path and os.path.exists(ckpt_path):
        step = _resume(ckpt_path, trainee, optimizer, scaler)
        if rank == 0:
            logger.info("resumed from %s at step %d", ckpt_path, step)

    def checkpoint() -> None:
        if ckpt_path and rank == 0:
            _atomic_save({"step": step, "trainable": _trainable_state(trainee), "optimizer": optimizer.state_dict(),
                          "scaler": scaler.state_dict(), "config": config.to_dict()}, ckpt_path)

    sampler = GlobalBatchSampler(len(dataset), config.batch_size, rank, world, config.seed,
                                 start=step * config.grad_accum)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda")
    batches = iter(loader)
    log = _MetricsLog(os.path.join(out, METRICS_FILE) if out else None, step, dataset.skipped, rank, world)
    end = max_steps if config.stop_at is None else min(max_steps, config.stop_at)
    while step < end:
        torch.manual_seed(derive_seed(config.seed, step, rank, 1))  # dropout: a function of (seed, step, rank)
        lr = lr_at(step, config, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        _optimizer_step(model, trainee, optimizer, scaler, batches, make_inputs, step, config, device, world, log)
        step += 1
        log.steps += 1
        if step % config.log_every == 0 or step == end:
            log.write(step, max_steps, lr, config, len(dataset))
        if config.save_every and step % config.save_every == 0 and step < end:
            checkpoint()

    del batches  # stop the DataLoader workers
    checkpoint()
    if out and save is not None and rank == 0 and step == max_steps:
        with _as_loaded(loaded):
            save(out)
    if world > 1:
        dist.barrier()
    return log.history


def _prepare(trainee: nn.Module, config: TrainConfig, device: torch.device) -> dict[nn.Parameter, Tensor]:
    """Frozen parts without gradients, in eval mode (and in ``frozen_dtype``); the rest in train mode, on
    ``device``, with the run's autocast dtype and gradient checkpointing. Returns the frozen weights as
    loaded where ``frozen_dtype`` changed them (``_cast_frozen``)."""
    frozen = trainee.frozen_modules(config.freeze_vision)  # type: ignore[operator]
    for module in frozen:
        module.requires_grad_(False)
    loaded = {} if config.frozen_dtype is None else _cast_frozen(trainee, frozen, parse_dtype(config.frozen_dtype))
    trainee.to(device)
    trainee.autocast_dtype = None if config.amp == "no" else parse_dtype(config.amp)  # type: ignore[assignment]
    for module in trainee.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = config.gradient_checkpointing
    trainee.train()
    for module in frozen:
        module.eval()
    return loaded


def _resume(ckpt_path: str, trainee: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
            ) -> int:
    """Load the trained weights, optimizer and loss-scaler state of a checkpoint; returns its step."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    params = dict(trainee.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def _optimizer_step(model: nn.Module, trainee: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, batches: Iterator[dict[str, Any]],
                    make_inputs: Callable[[dict[str, Any], int, int], dict[str, Any]], step: int,
                    config: TrainConfig, device: torch.device, world: int, log: _MetricsLog) -> None:
    """One update from ``config.grad_accum`` micro-batches (``model``: ``trainee``, or its DDP wrapper);
    the losses and the gradient norm go to ``log``."""
    for micro in range(config.grad_accum):
        batch = next(batches)
        log.bad += batch["bad"]
        inputs = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                  for k, v in make_inputs(batch, step, micro).items()}
        sync = micro == config.grad_accum - 1 or world == 1
        with contextlib.nullcontext() if sync else model.no_sync():  # type: ignore[operator]
            outputs = model(**inputs)
            scaler.scale(outputs["loss"] / config.grad_accum).backward()
        for key, value in outputs.items():
            if isinstance(value, Tensor) and value.ndim == 0:
                log.add(key, float(value.detach()) / config.grad_accum)
    if config.max_grad_norm is not None:
        scaler.unscale_(optimizer)
        grad_norm = float(nn.utils.clip_grad_norm_([p for p in trainee.parameters() if p.requires_grad],
                                                   config.max_grad_norm))
        log.add("grad_norm", grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    trainee.after_step()  # type: ignore[operator]


class _MetricsLog:
    """The logged values: their sums since the last row, and a row of means (over steps and ranks) every
    ``log_every`` steps, kept in ``history`` and appended to ``metrics.jsonl`` by rank 0.

    A resumed run starts from the earlier run's rows up to its checkpoint's step."""

    def __init__(self, path: str | None, step: int, skipped: int, rank: int, world: int) -> None:
        self.path, self.rank, self.world = path, rank, world
        self.history = _read_metrics(path, step) if path and step > 0 else []
        if path and rank == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in self.history)
        self.skipped_total = float(self.history[-1]["skipped"] if self.history else skipped)  # cumulative, all ranks
        self.sums: dict[str, float] = {}
        self.bad = 0.0  # records that failed to load since the last row, this rank
        self.steps = 0  # steps since the last row
        self.t_last = time.perf_counter()

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def write(self, step: int, max_steps: int, lr: float, config: TrainConfig, num_samples: int) -> None:
        names = sorted(self.sums)
        totals = torch.tensor([self.sums[n] for n in names] + [self.bad], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(totals)
            totals[:-1] /= self.world
        elapsed = time.perf_counter() - self.t_last
        self.skipped_total += float(totals[-1])
        samples = config.batch_size * config.grad_accum
        row = {"step": step, **{n: float(totals[i]) / self.steps for i, n in enumerate(names)}, "lr": lr,
               "samples_per_s": samples * self.steps / max(elapsed, 1e-9), "epoch": step * samples / num_samples,
               "skipped": int(self.skipped_total)}
        self.history.append(row)
        if self.rank == 0:
            if self.path:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            values = " ".join(f"{n} {row[n]:.4f}" for n in sorted(names, key=lambda n: n != "loss"))
            logger.info("step %d/%d %s lr %.3g %.1f samples/s", step, max_steps, values, lr, row["samples_per_s"])
        self.sums, self.bad, self.steps, self.t_last = {}, 0.0, 0, time.perf_counter()

"""``TrainConfig``: every training setting in one dataclass, the paper's settings as presets, YAML files.

Presets (``TrainConfig.preset(name)``) follow the paper (Li et al., 2023, section 3.4 and appendix) and,
where it is silent, LAVIS's ``lavis/projects/blip2/train/*.yaml``:

- ``stage1``: AdamW (0.9, 0.98), weight decay 0.05, cosine from 1e-4 to 1e-5 (LAVIS min_lr) after a
  linear warm-up of 2k steps from 1e-6, 250k steps, batch 1680 (ViT-g), 224 px images, text up to 32
  tokens, random resized crop (0.5, 1) and horizontal flip; frozen image encoder.
- ``stage2``: as stage 1, but 80k steps, batch 1520, minimum learning rate 5e-5 (the paper's second stage).
- ``finetune_caption``: COCO captioning (LAVIS caption_coco_ft.yaml): peak 1e-5, warm-up 1000 steps
  from 1e-8 to 1e-5, cosine to 0, AdamW (0.9, 0.999), 5 epochs, batch 1024, prompt "a photo of", the
  image encoder trained, gradient checkpointing.
- ``finetune_vqa``: VQAv2 (paper appendix): peak 1e-5, 5 epochs, batch 128, prompt "Question: {} Answer:"
  (use "Question: {} Short answer:" for Flan-T5), image encoder trained.

The paper keeps the frozen parts in fp16 (bf16 for Flan-T5) and trains with fp16 mixed precision; the
presets use bf16 for both, which needs no loss scaling and does not overflow in T5.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["PRESETS", "TrainConfig", "load_config_file"]


@dataclass
class TrainConfig:
    """Settings of a training run. Steps count optimizer updates."""

    max_steps: int | None = None  # None: from ``epochs``
    epochs: float | None = None
    # images per micro-step over all ranks: the pool of ITC negatives; each rank gets batch_size / world
    batch_size: int = 32
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 1e-5  # end of the cosine decay
    warmup_lr: float = 1e-6  # start of the linear warm-up
    warmup_steps: int = 0
    weight_decay: float = 0.05  # not applied to biases, norms, the temperature (parameters with ndim < 2)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    max_grad_norm: float | None = None  # clip the global gradient norm; None: no clipping (as LAVIS)
    amp: str = "no"  # autocast for the frozen/large parts: "no", "bf16" or "fp16" (with loss scaling)
    # run the frozen weights in "bf16"/"fp16" to save device memory; None: as loaded. The saved model keeps
    # them as loaded, bit for bit: a copy of them stays in host memory meanwhile
    frozen_dtype: str | None = None
    gradient_checkpointing: bool = False
    freeze_vision: bool = True  # False: train the image encoder too (fine-tuning)
    seed: int = 42
    num_workers: int = 0  # DataLoader worker processes per rank
    log_every: int = 10
    save_every: int = 0  # resumable checkpoint every N steps (0: only at the end)
    max_txt_len: int = 32
    augment: bool = True
    hflip: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    # "caption", "vqa" (stage 2 / fine-tuning), or "mixed": each record is a caption or a question-answer pair
    task: str = "caption"
    prompt: str = ""  # text before the target; VQA: with "{}" for the question (with "mixed": the VQA prompt)
    caption_prompt: str = ""  # with task "mixed": the prompt of the caption records
    # ITM hard negatives are drawn with probability softmax(similarity / t): None uses the learned ITC
    # temperature, as LAVIS does; a higher t (say 0.5) draws easier negatives, for a Q-Former trained from scratch
    itm_negative_temperature: float | None = None
    prefix_lm: bool = False  # T5 stage 2: split captions into encoder prefix and decoder target
    # stage 2: add this times the prefix alignment loss (``Blip2Stage2``): projected query i is pulled
    # toward the LM's input embedding of token i of the record's ``prefix`` text; 0: off (LAVIS)
    prefix_loss_weight: float = 0.0
    device: str | None = None  # default: cuda:LOCAL_RANK when CUDA is there, else cpu
    out_dir: str | None = None  # where metrics.jsonl, checkpoint/ and the final model go
    resume: bool = False  # continue from out_dir/checkpoint when it exists
    # start again in an out_dir that holds a run (its checkpoint is deleted); without resume or this, refused
    overwrite: bool = False
    # end this session after this step with a checkpoint, the schedule still that of max_steps (for jobs
    # with a time limit: run, resume, run, ...); the final model is written when max_steps is reached
    stop_at: int | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.crop_scale = tuple(self.crop_scale)  # type: ignore[assignment]
        if self.amp not in ("no", "bf16", "fp16"):
            raise ValueError(f"amp must be 'no', 'bf16' or 'fp16', got {self.amp!r}")
        if self.frozen_dtype not in (None, "bf16", "fp16", "fp32"):
            raise ValueError(f"frozen_dtype must be 'bf16', 'fp16', 'fp32' or None, got {self.frozen_dtype!r}")
        if self.task not in ("caption", "vqa", "mixed"):
            raise ValueError(f"task must be 'caption', 'vqa' or 'mixed', got {self.task!r}")
        if self.prefix_loss_weight < 0:
            raise ValueError(f"prefix_loss_weight must be >= 0, got {self.prefix_loss_weight}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be positive")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """``base`` (default: the defaults) with the fields named in ``d``; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(names)}")
        return dataclasses.replace(base or cls(), **d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, TrainConfig] = {
    "stage1": TrainConfig(max_steps=250_000, batch_size=1680, lr=1e-4, min_lr=1e-5, warmup_lr=1e-6,
                          warmup_steps=2000, amp="bf16", frozen_dtype="bf16", max_txt_len=32),
    "stage2": TrainConfig(max_steps=80_000, batch_size=1520, lr=1e-4, min_lr=5e-5, warmup_lr=1e-6,
                          warmup_steps=2000, amp="bf16", frozen_dtype="bf16", max_txt_len=32),
    "finetune_caption": TrainConfig(epochs=5, batch_size=1024, lr=1e-5, min_lr=0.0, warmup_lr=1e-8,
                                    warmup_steps=1000, betas=(0.9, 0.999), amp="bf16", frozen_dtype="bf16",
                                    freeze_vision=False, gradient_checkpointing=True, prompt="a photo of"),
    "finetune_vqa": TrainConfig(epochs=5, batch_size=128, lr=1e-5, min_lr=0.0, warmup_lr=1e-8, warmup_steps=1000,
                                betas=(0.9, 0.999), amp="bf16", frozen_dtype="bf16", freeze_vision=False,
                                gradient_checkpointing=True, task="vqa", prompt="Question: {} Answer:", max_txt_len=32),
}


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML (needs pyyaml: ``pip install 'blip2[train]'``) or JSON file holding one mapping."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        try:
            import yaml
        except ImportError:
            raise ImportError(f"{path}: reading YAML needs pyyaml (pip install 'blip2[train]'), or use a .json file") from None
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data

"""``blip2 train stage1|stage2|finetune``: the command line over ``train_stage1`` / ``train_stage2``.

Settings come from, later winning: the preset of the subcommand (``stage1``, ``stage2``,
``finetune_caption`` or, with ``--task vqa``, ``finetune_vqa``; or ``--preset``), a YAML/JSON file
(``--config``: ``TrainConfig`` field names, plus ``preset``, ``data``, ``out``, ``init``, ``bert``, ``vision``,
``stage1``, ``lm``), then the flags. Run it under ``torchrun --nproc_per_node N`` for several processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import torch

from blip2.checkpoint import CheckpointError
from blip2.config import ConfigError
from blip2.models.blip2 import Blip2ForConditionalGeneration
from blip2.processing import Blip2Processor
from blip2.train.loop import check_out_dir
from blip2.train.presets import PRESETS, TrainConfig, load_config_file
from blip2.train.stage1 import Blip2Stage1, build_stage1, train_stage1
from blip2.train.stage2 import build_stage2, load_stage1_into, train_stage2

__all__ = ["build_parser", "main"]

# flag -> (TrainConfig field, type or a constant for switches, help)
_SETTINGS: list[tuple[str, str, Any, str]] = [
    ("--max-steps", "max_steps", int, "optimizer steps (default: the preset's, or from --epochs)"),
    ("--epochs", "epochs", float, "passes over the data, when --max-steps is not set"),
    ("--batch-size", "batch_size", int, "images per micro-step over all processes (the ITC/ITM pool)"),
    ("--grad-accum", "grad_accum", int, "micro-steps per optimizer step"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr", "min_lr", float, "learning rate at the end of the cosine decay"),
    ("--warmup-lr", "warmup_lr", float, "learning rate at the start of the warm-up"),
    ("--warmup-steps", "warmup_steps", int, "linear warm-up steps"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--max-grad-norm", "max_grad_norm", float, "clip the gradient norm to this"),
    ("--amp", "amp", str, "autocast: no, bf16 or fp16"),
    ("--frozen-dtype", "frozen_dtype", str, "store frozen weights in bf16 or fp16"),
    ("--seed", "seed", int, "random seed"),
    ("--num-workers", "num_workers", int, "DataLoader workers per process"),
    ("--log-every", "log_every", int, "log (and write metrics.jsonl) every N steps"),
    ("--save-every", "save_every", int, "write a resumable checkpoint every N steps"),
    ("--max-txt-len", "max_txt_len", int, "text tokens per example"),
    ("--task", "task", str, "caption, vqa or mixed (each record a caption or a question-answer pair; stage2/finetune)"),
    ("--prompt", "prompt", str, "text before the target; for VQA (and mixed) with {} for the question"),
    ("--caption-prompt", "caption_prompt", str, "with --task mixed: the prompt of the caption records"),
    ("--itm-negative-temperature", "itm_negative_temperature", float,
     "stage 1: draw ITM negatives with softmax(cosine / T) (default: the ITC temperature, as LAVIS)"),
    ("--prefix-loss-weight", "prefix_loss_weight", float,
     "stage2/finetune: weight of the loss pulling projected query i toward the LM embedding of token i of "
     "each record's \"prefix\" text (default 0: off)"),
    ("--device", "device", str, "torch device (default: cuda:LOCAL_RANK or cpu)"),
    ("--gradient-checkpointing", "gradient_checkpointing", True, "recompute activations in backward"),
    ("--unfreeze-vision", "freeze_vision", False, "train the image encoder too"),
    ("--no-augment", "augment", False, "no random crop or flip"),
    ("--no-hflip", "hflip", False, "no horizontal flip (for text that says left and right)"),
    ("--prefix-lm", "prefix_lm", True, "T5: split captions into encoder prefix and decoder target"),
    ("--resume", "resume", True, "continue from OUT/checkpoint if it is there"),
    ("--overwrite", "overwrite", True, "start again in an OUT that holds a run (its checkpoint is deleted)"),
    ("--stop-at", "stop_at", int, "end this session after step N with a checkpoint (resume later)"),
]
_PATH_KEYS = ("data", "out", "init", "bert", "vision", "stage1", "lm", "preset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2 train", description="Train BLIP-2: stage 1, stage 2 or fine-tuning.")
    sub = parser.add_subparsers(dest="stage", required=True)
    helps = {"stage1": "Q-Former representation learning (ITC, ITM, ITG) against a frozen image encoder",
             "stage2": "generative learning against a frozen language model",
             "finetune": "captioning or VQA fine-tuning (stage 2's loss, image encoder trained by default)"}
    for stage, text in helps.items():
        p = sub.add_parser(stage, help=text, description=text, argument_default=argparse.SUPPRESS)
        p.add_argument("--data", action="append", help="JSONL manifest, CSV or Parquet table, tar shard (.tar, "
                       ".tar.gz, brace list), directory of shards, datasets save_to_disk folder (repeatable)")
        p.add_argument("--out", help="output directory: Hugging Face checkpoint, metrics.jsonl, checkpoint/")
        p.add_argument("--config", help="YAML or JSON file of settings")
        p.add_argument("--preset", choices=sorted(PRESETS), help="settings to start from")
        p.add_argument("--init", help="checkpoint to start from (stage1: a retrieval checkpoint; else a "
                                      "Blip2ForConditionalGeneration checkpoint)")
        if stage == "stage1":
            p.add_argument("--vision", help="without --init: BLIP-2 checkpoint whose image encoder to use")
            p.add_argument("--bert", help="without --init: Hugging Face BERT checkpoint to start the Q-Former from")
            p.add_argument("--num-query-tokens", type=int, default=32, help="learned queries (with --bert)")
            p.add_argument("--cross-attention-frequency", type=int, default=2, help="(with --bert)")
            p.add_argument("--embed-dim", type=int, default=256, help="ITC embedding width (with --bert)")
        if stage == "stage2":
            p.add_argument("--stage1", help="stage-1 checkpoint: its image encoder, queries and Q-Former start stage 2 "
                                            "(with --lm, or replacing those of --init)")
            p.add_argument("--lm", help="without --init: Hugging Face OPT or Flan-T5 checkpoint to use as the frozen LM")
        for flag, name, kind, text in _SETTINGS:
            if isinstance(kind, bool):
                p.add_argument(flag, dest=name, action="store_const", const=kind, help=text)
            else:
                p.add_argument(flag, dest=name, type=kind, help=text)
    return parser


def _settings(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """(TrainConfig, paths) from preset < config file < flags."""
    given = vars(args)
    from_file = load_config_file(given["config"]) if "config" in given else {}
    paths = {k: from_file.pop(k) for k in _PATH_KEYS if k in from_file}
    paths.update({k: given[k] for k in _PATH_KEYS if k in given})
    task = given.get("task", from_file.get("task", "caption"))
    default = {"stage1": "stage1", "stage2": "stage2"}.get(args.stage, "finetune_vqa" if task == "vqa" else "finetune_caption")
    config = TrainConfig.preset(paths.get("preset", default))
    config = TrainConfig.from_dict(from_file, config)
    flags = {name: given[name] for _, name, _, _ in _SETTINGS if name in given}
    config = TrainConfig.from_dict(flags, config)
    if not paths.get("data"):
        raise ValueError("give --data (a manifest, table, shard or directory of shards)")
    if not paths.get("out"):
        raise ValueError("give --out (the output directory)")
    if isinstance(paths["data"], str):
        paths["data"] = [paths["data"]]
    config.out_dir = paths["out"]
    return config, paths


def _run(args: argparse.Namespace) -> None:
    config, paths = _settings(args)
    check_out_dir(config)  # before loading anything; the loop checks again
    torch.manual_seed(config.seed)  # fresh weights (cross-attention, projections) depend on the seed only
    init = paths.get("init")
    if args.stage == "stage1":
        if init:
            model, processor = Blip2Stage1.from_pretrained(init), Blip2Processor.from_pretrained(init)
        elif paths.get("bert") and paths.get("vision"):
            model, processor = build_stage1(paths["vision"], paths["bert"], num_query_tokens=args.num_query_tokens,
                                            cross_attention_frequency=args.cross_attention_frequency,
                                            image_text_hidden_size=args.embed_dim)
        else:
            raise ValueError("stage1 needs --init, or --vision and --bert")
        train_stage1(model, processor, paths["data"], config, processor_source=init)
        return
    if init:
        # fast="none": a model in training keeps its modules; no inference layout comes and goes around evaluations
        model = Blip2ForConditionalGeneration.from_pretrained(init, fast="none")
        processor = Blip2Processor.from_pretrained(init)
        if paths.get("stage1"):
            load_stage1_into(model, paths["stage1"])
    elif args.stage == "stage2" and paths.get("stage1") and paths.get("lm"):
        model, processor = build_stage2(paths["stage1"], paths["lm"])
    else:
        raise ValueError(f"{args.stage} needs --init (a Blip2ForConditionalGeneration checkpoint)"
                         + (", or --stage1 and --lm" if args.stage == "stage2" else ""))
    train_stage2(model, processor, paths["data"], config, processor_source=init)


def main(argv: list[str] | None = None) -> int:
    """``blip2 train ...``; returns the exit status (0 done, 2 usage or setup error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        _run(args)
    except (ValueError, FileNotFoundError, CheckpointError, ConfigError, ImportError) as e:
        print(f"blip2 train: error: {e}", file=sys.stderr)
        return 2  # a usage or setup error, as the other blip2 commands report it
    except KeyboardInterrupt:
        return 130
    return 0

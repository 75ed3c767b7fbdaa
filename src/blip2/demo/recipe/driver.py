"""``python -m blip2.demo.recipe --out DIR [--quick]``: the demo model from scratch.

Steps (each writes ``DIR/work/<step>/``; ``--resume`` skips steps whose output exists):

1. ``tokenizer``: the word-level tokenizer (``recipe.tokenizer``).
2. ``vision``: pretrain the image encoder on scene labels (``recipe.vision``).
3. ``lm``: pretrain the OPT language model on the world's text (``recipe.lm``).
4. ``stage1``: freeze the encoder; train Q-Former + queries with ITC, ITM and ITG: the retrieval model,
   written to ``DIR/demo-retrieval``.
5. ``stage2``: freeze encoder and LM; train Q-Former + queries + projection with the LM loss on captions
   and answers: the generation model, written to ``DIR/demo``.

Stages 1 and 2 are ``blip2.train``'s (``recipe.stages``), on the frozen encoder's output computed once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
from safetensors.torch import load_file, save_file

from torch import nn

from blip2.demo.evaluate import evaluate
from blip2.config import Blip2Config, Blip2VisionConfig, OPTConfig
from blip2.generation import GenerationConfig
from blip2.hub import read_config
from blip2.images import Blip2ImageProcessor
from blip2.models.opt import OPTForCausalLM
from blip2.processing import Blip2Processor, TextTokenizer
from blip2.models.retrieval import Blip2ForImageTextRetrieval
from blip2.models.vision import Blip2VisionModel
from blip2.train import vision_states
from blip2.demo.recipe.config import RecipeConfig, full, quick
from blip2.demo.recipe.data import make_scene_data, normalize
from blip2.demo.recipe.lm import pretrain_lm
from blip2.demo.recipe.stages import build_stage2, new_retrieval_model, train_stage1, train_stage2
from blip2.demo.recipe.tokenizer import IMAGE_TOKEN, build_tokenizer
from blip2.demo.recipe.vision import evaluate_vision, pretrain_vision

__all__ = ["main", "run", "MAX_NEW_TOKENS"]

MAX_NEW_TOKENS = 24  # the longest caption is 15 tokens + eos


def _save_part(model: nn.Module, directory: str) -> None:
    """A pretrained part (encoder or LM) between steps: config.json + model.safetensors."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, os.path.join(directory, "model.safetensors"))


def _load_part(cls: type[nn.Module], config_cls: type, directory: str) -> nn.Module:
    model = cls(config_cls.from_dict(read_config(directory)))
    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")), strict=False)
    return model.eval()


def _done(directory: str, resume: bool) -> bool:
    return resume and os.path.exists(os.path.join(directory, "model.safetensors"))


def _processor(tokenizer: TextTokenizer, image_size: int, num_query_tokens: int | None) -> Blip2Processor:
    return Blip2Processor(Blip2ImageProcessor(size=image_size), tokenizer, num_query_tokens=num_query_tokens)


def run(out: str, cfg: RecipeConfig, resume: bool = False, stop_after: str | None = None) -> dict[str, float]:
    """Run the recipe; returns the validation numbers it printed."""
    work = os.path.join(out, "work")
    report: dict[str, float] = {}
    t0 = time.time()
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(os.path.join(work, "tokenizer"))
    train = make_scene_data(cfg.n_train, cfg.seed, cfg.variant_share, cfg.vision.image_size, cfg.vision.patch_size)
    val = make_scene_data(cfg.n_val, cfg.seed + 1, cfg.variant_share, cfg.vision.image_size, cfg.vision.patch_size)
    print(f"[data] {len(train)} training and {len(val)} validation scenes ({time.time() - t0:.0f}s)", flush=True)

    vision_dir = os.path.join(work, "vision")
    if _done(vision_dir, resume):
        vision = _load_part(Blip2VisionModel, Blip2VisionConfig, vision_dir)
    else:
        steps, batch, lr = cfg.vision_schedule
        pretrainer = pretrain_vision(cfg.vision, train, steps, batch, lr, cfg.seed, cfg.log_every)
        for k, v in evaluate_vision(pretrainer, val).items():
            report[f"vision_{k}"] = v
        print(f"[vision] validation {report}", flush=True)
        vision = pretrainer.encoder
        _save_part(vision, vision_dir)
    if stop_after == "vision":
        return report

    lm_dir = os.path.join(work, "lm")
    if _done(lm_dir, resume):
        lm = _load_part(OPTForCausalLM, OPTConfig, lm_dir)
    else:
        steps, batch, lr = cfg.lm_schedule
        lm = pretrain_lm(cfg.lm, tokenizer, train, steps, batch, lr, cfg.num_query_tokens, cfg.seed,
                         log_every=cfg.log_every)
        _save_part(lm, lm_dir)
    if stop_after == "lm":
        return report

    t = time.time()
    feats = vision_states(vision, normalize(train.pixels))
    print(f"[features] {tuple(feats.shape)} ({time.time() - t:.0f}s)", flush=True)

    retrieval_dir = os.path.join(out, "demo-retrieval")
    qformer1 = cfg.qformer.replace(use_qformer_text_input=True)
    if _done(retrieval_dir, resume):
        retrieval = Blip2ForImageTextRetrieval.from_pretrained(retrieval_dir)
    else:
        config1 = Blip2Config(vision_config=cfg.vision, qformer_config=qformer1, text_config=cfg.lm,
                              num_query_tokens=cfg.num_query_tokens, image_text_hidden_size=cfg.qformer.hidden_size,
                              image_token_index=None)
        torch.manual_seed(cfg.seed)  # the fresh Q-Former's init must not depend on what ran before (--resume)
        retrieval = new_retrieval_model(config1, vision)
        steps, batch, lr = cfg.stage1_schedule
        processor1 = _processor(build_tokenizer(add_eos=True), cfg.vision.image_size, None)
        train_stage1(retrieval, processor1, feats, train, steps, batch, lr, cfg.seed, cfg.log_every)
        retrieval.save_pretrained(retrieval_dir)
        processor1.save_pretrained(retrieval_dir)
    if stop_after == "stage1":
        return report

    demo_dir = os.path.join(out, "demo")
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config2 = Blip2Config(vision_config=cfg.vision, qformer_config=cfg.qformer.replace(use_qformer_text_input=False),
                          text_config=cfg.lm, num_query_tokens=cfg.num_query_tokens,
                          image_text_hidden_size=cfg.qformer.hidden_size, image_token_index=image_token)
    torch.manual_seed(cfg.seed)  # likewise the language projection's init
    model = build_stage2(config2, retrieval, lm.state_dict())
    model.generation_config = GenerationConfig(bos_token_id=cfg.lm.bos_token_id, eos_token_id=cfg.lm.eos_token_id,
                                               pad_token_id=cfg.lm.pad_token_id, max_new_tokens=MAX_NEW_TOKENS)
    processor2 = _processor(build_tokenizer(), cfg.vision.image_size, cfg.num_query_tokens)
    steps, batch, lr = cfg.stage2_schedule
    train_stage2(model, processor2, feats, train, steps, batch, lr, cfg.seed, cfg.log_every)
    model.save_pretrained(demo_dir)
    processor2.save_pretrained(demo_dir)
    report.update(evaluate(demo_dir, retrieval_dir, n=cfg.n_val))
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m blip2.demo.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (DIR/demo, DIR/demo-retrieval, DIR/work)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps: checks the pipeline in seconds")
    p.add_argument("--resume", action="store_true", help="reuse the finished steps found in DIR/work")
    p.add_argument("--stop-after", choices=("vision", "lm", "stage1"), help="stop after this step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.basicConfig(format="[%(name)s] %(message)s", level=logging.INFO)
    vocab = len(build_tokenizer())
    start = time.time()
    report = run(a.out, quick(vocab) if a.quick else full(vocab), a.resume, a.stop_after)
    print(f"[recipe] done in {time.time() - start:.0f}s: {report}", flush=True)

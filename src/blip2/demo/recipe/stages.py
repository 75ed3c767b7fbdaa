"""BLIP-2's two training stages for the demo model, run by ``blip2.train`` on cached image features.

The image encoder is frozen in both stages, so its output for every training image is computed once
(``blip2.train.vision_states``) and the stages read it from a ``blip2.train.FeatureDataset``: the same
losses and gradients as running the encoder each step (its output LayerNorm still trains), at a
fraction of the cost on a CPU. Everything else is ``blip2.train``: ``Blip2Stage1`` (ITC, ITM with hard
negatives, ITG), ``Blip2Stage2`` (the LM loss through the frozen LM), ``TrainConfig`` and its loop.

Recipe-specific choices:

- ITM negatives are drawn with probability softmax(cosine / 0.5) (``itm_negative_temperature``), not
  with the ITC temperature (~0.07) as LAVIS does: in this world the hardest captions differ by one size
  word, and a Q-Former trained from scratch offered only those from the first steps stays at the prior.
- Each scene's stage-1 record also carries a hard negative caption (``hard_negative``: one colour,
  shape or size wrong, or two colours swapped), which ITM learns to reject. A batch of 32 random scenes
  seldom holds two of the same layout, so the drawn negatives alone left ITM nearly colour-blind: on
  held-out retrieval, re-ranking by ITC + ITM gave 76.7% R@1 against ITC's 82.1%.
- Stage 2 trains on captions (no prompt) and answers to "Question: {q} Answer:" together (task
  "mixed"): per scene, the caption ``CAPTION_COPIES`` times and one question of each type the scene
  has, so rare types (colour, shape) are trained as often as counts.
- Stage 2 adds ``blip2.train``'s prefix alignment loss (weight ``PREFIX_LOSS_WEIGHT``): every record's
  ``prefix`` is its scene table ("small red circle large blue square", ``recipe.lm.scene_table``), the
  text the LM was pretrained to read where the image queries go, so the first queries are pulled toward
  those words' embeddings. With the LM loss alone the 3-layer LM answered 70% of held-out colour
  questions (it must find the word before the shape in a soft prompt); with it, 100%, and captions
  stayed at 99%. The queries after the table's last word stay free: the LM loss uses
  them (pinning them to padding too made the LM start every caption as a question).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn

from blip2.config import Blip2Config
from blip2.models.blip2 import Blip2ForConditionalGeneration
from blip2.processing import Blip2Processor, TextTokenizer
from blip2.models.retrieval import Blip2ForImageTextRetrieval
from blip2.train import Blip2Stage1, FeatureDataset, Record, TrainConfig
from blip2.train import train_stage1 as _train_stage1
from blip2.train import train_stage2 as _train_stage2
from blip2.demo.world import COLORS, SHAPES, SIZES, Scene, caption
from blip2.demo.recipe.data import SceneData
from blip2.demo.recipe.lm import scene_table
from blip2.demo.recipe.tokenizer import vqa_prompt

__all__ = ["CAPTION_COPIES", "PREFIX_LOSS_WEIGHT", "stage_config", "hard_negative", "stage1_dataset", "stage2_dataset", "new_retrieval_model",
           "train_stage1", "build_stage2", "train_stage2"]

CAPTION_COPIES = 3
PREFIX_LOSS_WEIGHT = 1.0
VQA_PROMPT = vqa_prompt("{}")


def stage_config(steps: int, batch_size: int, lr: float, seed: int, log_every: int, **overrides) -> TrainConfig:
    """The recipe's optimisation for both stages: AdamW (0.9, 0.98), weight decay 0.05, 5% linear warm-up,
    cosine to 10% of the peak, gradient norm clipped at 1, fp32, no augmentation (features are cached)."""
    return TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10, warmup_lr=lr / 100,
                       warmup_steps=max(1, steps // 20), weight_decay=0.05, max_grad_norm=1.0, seed=seed,
                       log_every=log_every, augment=False, max_txt_len=24, **overrides)


def _name(i: int) -> str:
    return f"scene-{i}"


def hard_negative(scene: Scene, rng: np.random.Generator) -> str:
    """The caption of ``scene`` with one thing wrong: an object's colour (most often: colour is what ITM
    misses when batches seldom hold two scenes of the same layout), two objects' colours swapped, an
    object's shape, or its size."""
    objects = list(scene.objects)
    kinds = ["color", "color", "shape", "size"]
    if len({o.color for o in objects}) > 1:
        kinds.append("swap")
    kind = kinds[rng.integers(len(kinds))]
    i = int(rng.integers(len(objects)))
    o = objects[i]
    if kind == "swap":
        j = int(rng.choice([k for k, other in enumerate(objects) if other.color != o.color]))
        objects[i], objects[j] = replace(o, color=objects[j].color), replace(objects[j], color=o.color)
    elif kind == "color":
        objects[i] = replace(o, color=str(rng.choice([c for c in COLORS if c != o.color])))
    elif kind == "shape":
        objects[i] = replace(o, shape=str(rng.choice([c for c in SHAPES if c != o.shape])))
    else:
        objects[i] = replace(o, size=next(c for c in SIZES if c != o.size))
    return caption(replace(scene, objects=tuple(objects)))


def stage1_dataset(states: Tensor, data: SceneData, seed: int = 0) -> FeatureDataset:
    """One (image, caption) record per scene, with a hard negative caption (``hard_negative``)."""
    rng = np.random.default_rng([seed, 1])
    return FeatureDataset(states, [Record(_name(i), caption=c, negative=hard_negative(scene, rng))
                                   for i, (c, scene) in enumerate(zip(data.captions, data.scenes))])


def stage2_dataset(states: Tensor, data: SceneData, seed: int, tokenizer: TextTokenizer) -> FeatureDataset:
    """Per scene: its caption ``CAPTION_COPIES`` times, and for each question type it has, one of those
    questions (drawn with ``seed``); each record's ``prefix`` is the scene table (``tokenizer``: the LM's)."""
    rng = np.random.default_rng(seed)
    records, index = [], []
    for i, (cap, qa) in enumerate(zip(data.captions, data.qa)):
        table = tokenizer.decode(scene_table(tokenizer, cap))
        records += [Record(_name(i), caption=cap, prefix=table)] * CAPTION_COPIES
        for kind in sorted({q["type"] for q in qa}):
            pick = [q for q in qa if q["type"] == kind]
            q = pick[rng.integers(len(pick))]
            records.append(Record(_name(i), question=q["question"], answer=q["answer"], prefix=table))
        index += [i] * (len(records) - len(index))
    return FeatureDataset(states, records, index)


def new_retrieval_model(config: Blip2Config, vision: nn.Module) -> Blip2ForImageTextRetrieval:
    """A fresh stage-1 model around the pretrained encoder; text embeddings and heads get BERT's init."""
    model = Blip2ForImageTextRetrieval(config)
    model.vision_model.load_state_dict(vision.state_dict())
    std = config.qformer_config.initializer_range
    for module in (model.embeddings.word_embeddings, model.embeddings.position_embeddings,
                   model.vision_projection, model.text_projection, model.itm_head):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
    return model


def train_stage1(model: Blip2ForImageTextRetrieval, processor: Blip2Processor, states: Tensor, data: SceneData,
                 steps: int, batch_size: int, lr: float, seed: int = 0, log_every: int = 50,
                 negative_temperature: float = 0.5) -> Blip2ForImageTextRetrieval:
    """Stage 1 with ``blip2.train.train_stage1``; the learned temperature ends in ``model.config.temperature``.
    ``processor``: the Q-Former's tokenizer (``build_tokenizer(add_eos=True)``)."""
    torch.manual_seed(seed)
    config = stage_config(steps, batch_size, lr, seed, log_every, itm_negative_temperature=negative_temperature)
    _train_stage1(Blip2Stage1(model), processor, stage1_dataset(states, data, seed), config)
    return model.eval()


def build_stage2(config: Blip2Config, stage1: Blip2ForImageTextRetrieval, lm_state: dict[str, Tensor]
                 ) -> Blip2ForConditionalGeneration:
    """The generation model: encoder, queries and Q-Former (query path) from stage 1, the pretrained LM."""
    model = Blip2ForConditionalGeneration(config)
    model.vision_model.load_state_dict(stage1.vision_model.state_dict())
    model.query_tokens.data.copy_(stage1.query_tokens.data)
    own = model.qformer.state_dict()
    model.qformer.load_state_dict({k: v for k, v in stage1.qformer.state_dict().items() if k in own})
    model.language_model.load_state_dict(lm_state)
    return model


def train_stage2(model: Blip2ForConditionalGeneration, processor: Blip2Processor, states: Tensor, data: SceneData,
                 steps: int, batch_size: int, lr: float, seed: int = 0, log_every: int = 50
                 ) -> Blip2ForConditionalGeneration:
    """Stage 2 with ``blip2.train.train_stage2``: Q-Former, queries, projection and the encoder's output
    LayerNorm learn; encoder and LM are frozen. ``model.generation_config`` must name the eos token."""
    torch.manual_seed(seed)
    config = stage_config(steps, batch_size, lr, seed, log_every, task="mixed", prompt=VQA_PROMPT, caption_prompt="",
                          prefix_loss_weight=PREFIX_LOSS_WEIGHT)
    _train_stage2(model, processor, stage2_dataset(states, data, seed, processor.tokenizer), config)
    return model.eval()

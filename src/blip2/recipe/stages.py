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
- Stage 2 trains on captions (no prompt) and answers to "Question: {q} Answer:" together (task
  "mixed"): per scene, the caption ``CAPTION_COPIES`` times and one question of each type the scene
  has, so rare types (colour, shape) are trained as often as counts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..config import Blip2Config
from ..modeling import Blip2ForConditionalGeneration
from ..processing import Blip2Processor
from ..retrieval import Blip2ForImageTextRetrieval
from ..train import Blip2Stage1, FeatureDataset, Record, TrainConfig
from ..train import train_stage1 as _train_stage1
from ..train import train_stage2 as _train_stage2
from .data import SceneData
from .tokenizer import vqa_prompt

__all__ = ["CAPTION_COPIES", "stage_config", "stage1_dataset", "stage2_dataset", "new_retrieval_model",
           "train_stage1", "build_stage2", "train_stage2"]

CAPTION_COPIES = 3
VQA_PROMPT = vqa_prompt("{}")


def stage_config(steps: int, batch_size: int, lr: float, seed: int, log_every: int, **overrides) -> TrainConfig:
    """The recipe's optimisation for both stages: AdamW (0.9, 0.98), weight decay 0.05, 5% linear warm-up,
    cosine to 10% of the peak, gradient norm clipped at 1, fp32, no augmentation (features are cached)."""
    return TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10, warmup_lr=lr / 100,
                       warmup_steps=max(1, steps // 20), weight_decay=0.05, max_grad_norm=1.0, seed=seed,
                       log_every=log_every, augment=False, max_txt_len=24, **overrides)


def _name(i: int) -> str:
    return f"scene-{i}"


def stage1_dataset(states: Tensor, data: SceneData) -> FeatureDataset:
    """One (image, caption) record per scene."""
    return FeatureDataset(states, [Record(_name(i), caption=c) for i, c in enumerate(data.captions)])


def stage2_dataset(states: Tensor, data: SceneData, seed: int) -> FeatureDataset:
    """Per scene: its caption ``CAPTION_COPIES`` times, and for each question type it has, one of those
    questions (drawn with ``seed``)."""
    rng = np.random.default_rng(seed)
    records, index = [], []
    for i, (cap, qa) in enumerate(zip(data.captions, data.qa)):
        records += [Record(_name(i), caption=cap)] * CAPTION_COPIES
        for kind in sorted({q["type"] for q in qa}):
            pick = [q for q in qa if q["type"] == kind]
            q = pick[rng.integers(len(pick))]
            records.append(Record(_name(i), question=q["question"], answer=q["answer"]))
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
    _train_stage1(Blip2Stage1(model), processor, stage1_dataset(states, data), config)
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
    config = stage_config(steps, batch_size, lr, seed, log_every, task="mixed", prompt=VQA_PROMPT, caption_prompt="")
    _train_stage2(model, processor, stage2_dataset(states, data, seed), config)
    return model.eval()

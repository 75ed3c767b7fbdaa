"""Training BLIP-2: stage 1 (Q-Former vs a frozen image encoder), stage 2 (vs a frozen LM), fine-tuning.

Programmatic use::

    from blip2.train import TrainConfig, train_stage1, train_stage2, Blip2Stage1, build_stage1

    stage1, processor = build_stage1("blip2-dir-with-a-vit", "bert-dir")
    metrics = train_stage1(stage1, processor, "data/captions.jsonl", TrainConfig(max_steps=1000, out_dir="out1"))
    model, processor = build_stage2("out1", "opt-2.7b-dir")  # or Blip2ForConditionalGeneration.from_pretrained
    metrics = train_stage2(model, processor, "data/captions.jsonl",
                           TrainConfig.preset("stage2", max_steps=1000, out_dir="out2"))

Command line: ``blip2 train stage1|stage2|finetune --data MANIFEST --out DIR ...`` (``main``), also
``python -m blip2.train ...``; under ``torchrun`` for DDP.
"""

from blip2.train.command import main
from blip2.train.common import vision_states
from blip2.train.data import (
    FeatureDataset,
    GlobalBatchSampler,
    ImageTextDataset,
    Record,
    TrainTransform,
    load_records,
)
from blip2.train.loop import lr_at
from blip2.train.presets import PRESETS, TrainConfig
from blip2.train.stage1 import (
    Blip2Stage1,
    QFormerLMHead,
    Stage1Text,
    build_stage1,
    load_bert_into,
    train_stage1,
)
from blip2.train.stage2 import Blip2Stage2, Stage2Text, build_stage2, finetune, load_stage1_into, train_stage2

__all__ = [
    "PRESETS",
    "Blip2Stage1",
    "Blip2Stage2",
    "FeatureDataset",
    "GlobalBatchSampler",
    "ImageTextDataset",
    "QFormerLMHead",
    "Record",
    "Stage1Text",
    "Stage2Text",
    "TrainConfig",
    "TrainTransform",
    "build_stage1",
    "build_stage2",
    "finetune",
    "load_bert_into",
    "load_records",
    "load_stage1_into",
    "lr_at",
    "main",
    "train_stage1",
    "train_stage2",
    "vision_states",
]

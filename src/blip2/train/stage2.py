"""Stage 2 and fine-tuning: the Q-Former's queries become a soft visual prompt of a frozen language model.

``Blip2Stage2`` wraps a ``Blip2ForConditionalGeneration`` and computes the language-modelling loss on the
text only, as LAVIS ``Blip2OPT.forward`` / ``Blip2T5.forward``:

- OPT (decoder-only): input ``[queries][BOS] prompt target EOS``, right-padded; the loss covers
  ``target EOS`` (query, BOS, prompt and padding positions are -100). EOS is the generation EOS
  (``"\\n"`` = 50118 for the BLIP-2 OPT checkpoints; LAVIS appends ``"\\n"`` to the text).
- Flan-T5 (encoder-decoder): encoder ``[queries] prompt``, decoder target ``target </s>``.

Captioning: prompt = ``config.prompt`` (LAVIS: "" in pre-training, "a photo of" for COCO fine-tuning).
VQA: prompt = ``config.prompt.format(question)``, target = answer. Stage-2 pre-training of T5 can use the
paper's prefix LM (``prefix_lm``): the caption is split at a random word, the first part goes to the
encoder after the prompt, the rest is the target.

Prefix alignment (optional, not in the paper; ``TrainConfig.prefix_loss_weight`` > 0): a record may carry a
``prefix`` text, and the loss adds ``w * sum_i |p_i - e(t_i)|^2 / (n * mean_v |e(v)|^2)`` over the prefix's
n tokens t_i, where p_i is projected query i and e the LM's (frozen) input embedding. The soft prompt then
starts as a readable description of the image, in the LM's own words (queries after the n-th stay free).
It helps a language model too small to learn, from the LM loss alone, to look things up in a soft prompt
(the bundled demo model's held-out colour answers: 70% without it, 100% with it).

Precision: the image encoder and the LM run under autocast when asked; the Q-Former and the projection
run in fp32 outside it, as the reference keeps them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from blip2.checkpoint import iter_checkpoint_tensors, load_into
from blip2.config import Blip2Config, OPTConfig, T5Config
from blip2.hub import read_config
from blip2.images import Blip2ImageProcessor
from blip2.models.blip2 import Blip2ForConditionalGeneration
from blip2.processing import Blip2Processor, TextTokenizer
from blip2.train.common import (
    autocast,
    encode_image,
    frozen_vision_modules,
    image_inputs,
    make_dataset,
    save_processor,
)
from blip2.train.data import FeatureDataset, ImageTextDataset
from blip2.train.loop import run
from blip2.train.losses import rank_and_world, token_cross_entropy
from blip2.train.presets import TrainConfig

__all__ = ["Blip2Stage2", "Stage2Text", "build_stage2", "finetune", "load_stage1_into", "train_stage2"]


class Blip2Stage2(nn.Module):
    """The stage-2 / fine-tuning training model: forward -> ``{"loss"}``."""

    def __init__(self, model: Blip2ForConditionalGeneration, prefix_loss_weight: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.autocast_dtype: torch.dtype | None = None  # set by the training loop
        self.prefix_loss_weight = prefix_loss_weight
        self._embedding_scale: Tensor | None = None  # mean squared norm of the LM's input embeddings

    def frozen_modules(self, freeze_vision: bool) -> list[nn.Module]:
        frozen: list[nn.Module] = [self.model.language_model]
        return frozen + (frozen_vision_modules(self.model.vision_model) if freeze_vision else [])

    def after_step(self) -> None:
        """Nothing to clamp in stage 2 (the loop calls this after every optimizer step)."""

    def prefix_loss(self, lm_inputs: Tensor, prefix_ids: Tensor, prefix_mask: Tensor) -> Tensor:
        """The prefix alignment loss (module docstring): lm_inputs [b, Q, D] projected queries, prefix_ids
        [b, Q] token ids, prefix_mask [b, Q] 1 where a row's prefix has a token (the loss is only there)."""
        embed = self.model.language_model.get_input_embeddings()
        if self._embedding_scale is None:
            with torch.no_grad():
                self._embedding_scale = embed.weight.float().pow(2).sum(-1).mean()
        keep = prefix_mask.to(lm_inputs.dtype)  # [b, Q]
        with torch.no_grad():
            target = embed(prefix_ids).to(lm_inputs.dtype)  # [b, Q, D]
        dist = (lm_inputs - target).pow(2).sum(-1)  # [b, Q]
        return (dist * keep).sum() / keep.sum().clamp(min=1) / self._embedding_scale.to(lm_inputs.device)

    def forward(self, pixel_values: Tensor | None, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                decoder_attention_mask: Tensor | None = None, vision_states: Tensor | None = None,
                prefix_ids: Tensor | None = None, prefix_mask: Tensor | None = None) -> dict[str, Tensor]:
        """LM loss for this rank's rows, normalised by the global number of target tokens (plus the
        weighted prefix alignment loss when ``prefix_ids``/``prefix_mask`` [b, Q] are given).

        Decoder-only: input_ids/attention_mask/labels [b, L] (labels -100 where no loss). Encoder-decoder:
        input_ids/attention_mask [b, L] for the encoder, labels/decoder_attention_mask [b, Td]. Images:
        pixel_values [b, 3, H, W], or None with vision_states [b, N+1, Dv] (a frozen ViT's cached output).
        """
        m = self.model
        device = m.query_tokens.device
        image_embeds = encode_image(m.vision_model, pixel_values, self.autocast_dtype, vision_states)  # [b, N+1, Dv]
        queries = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = m.qformer(queries, image_embeds.to(queries.dtype)).last_hidden_state  # [b, Q, Dq], fp32
        lm_inputs = m.language_projection(query_output.to(m.language_projection.weight.dtype))  # [b, Q, D_lm]
        input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
        with autocast(device, self.autocast_dtype):
            embeds, mask = m.merge_image_inputs(lm_inputs, input_ids, attention_mask)
            if m.config.use_decoder_only_language_model:
                logits = m.language_model(embeds, mask)[:, -labels.shape[1]:]  # [b, L, V]
            else:
                dmask = None if decoder_attention_mask is None else decoder_attention_mask.to(device)
                logits = m.language_model(embeds, mask, decoder_attention_mask=dmask, labels=labels)  # [b, Td, V]
        total, count = token_cross_entropy(logits, labels, shift=m.config.use_decoder_only_language_model)
        world = rank_and_world()[1]
        if world > 1:
            count = count.clone()
            torch.distributed.all_reduce(count)
        loss = total / count.clamp(min=1) * world
        if prefix_ids is None or prefix_mask is None or not self.prefix_loss_weight:
            return {"loss": loss}
        prefix = self.prefix_loss(lm_inputs, prefix_ids.to(device), prefix_mask.to(device))
        return {"loss": loss + self.prefix_loss_weight * prefix, "lm": loss.detach(), "prefix": prefix.detach()}


class Stage2Text:
    """Builds the LM inputs and labels of a batch (see the module docstring for the layout).

    task: "caption" (fields ``caption``) or "vqa" (``question``, ``answer``; ``prompt`` must contain ``{}``),
    or "mixed": rows with a question are VQA rows (``prompt``), the others captions (``caption_prompt``).
    """

    def __init__(self, tokenizer: TextTokenizer, model: Blip2ForConditionalGeneration, *, task: str = "caption",
                 prompt: str = "", max_txt_len: int = 32, prefix_lm: bool = False, seed: int = 0,
                 caption_prompt: str = "", prefix_ids: bool = False) -> None:
        if task not in ("caption", "vqa", "mixed"):
            raise ValueError(f"task must be 'caption', 'vqa' or 'mixed', got {task!r}")
        if task in ("vqa", "mixed") and "{}" not in prompt:
            raise ValueError(f"a VQA prompt needs a {{}} for the question, got {prompt!r}")
        self.tokenizer = tokenizer
        self.task, self.prompt, self.max_txt_len, self.seed = task, prompt, max_txt_len, seed
        self.caption_prompt = caption_prompt
        config = model.config
        self.prefix_length = config.num_query_tokens if prefix_ids else 0  # > 0: also return "prefix_ids"
        self.decoder_only = config.use_decoder_only_language_model
        self.prefix_lm = prefix_lm and not self.decoder_only and task == "caption"
        self.image_prefix = [config.image_token_index] * config.num_query_tokens if config.image_token_index is not None else []
        eos = model.generation_config.eos_token_id
        self.eos = eos[0] if isinstance(eos, list) else eos
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.text_config.bos_token_id
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else config.text_config.pad_token_id

    def _split(self, caption: str, key: int) -> tuple[str, str]:
        """Prefix LM: (prefix, suffix) split at a word drawn from the sample's key (never an empty suffix)."""
        words = caption.split()
        k = int(np.random.default_rng([self.seed, 7, key]).integers(0, len(words))) if words else 0
        return " ".join(words[:k]), " ".join(words[k:])

    def _ids(self, texts: list[str], special: bool) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=special)["input_ids"]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        keys: Sequence[int] = batch["key"].tolist()
        if self.task == "vqa":
            prompts = [self.prompt.format(q) for q in batch["question"]]
            targets = list(batch["answer"])
        elif self.task == "mixed":
            prompts = [self.caption_prompt if q is None else self.prompt.format(q) for q in batch["question"]]
            targets = [c if q is None else a for c, q, a in zip(batch["caption"], batch["question"], batch["answer"])]
        else:
            prompts, targets = [self.prompt] * len(keys), list(batch["caption"])
            if self.prefix_lm:
                split = [self._split(t, k) for t, k in zip(targets, keys)]
                prompts = [" ".join(s for s in (p, pre) if s) for p, (pre, _) in zip(prompts, split)]
                targets = [suf for _, suf in split]
        out = self._decoder_only(prompts, targets) if self.decoder_only else self._encoder_decoder(prompts, targets)
        if self.prefix_length:
            out["prefix_ids"], out["prefix_mask"] = self._prefix_ids(batch.get("prefix") or [None] * len(keys))
        return out

    def _prefix_ids(self, prefixes: list[str | None]) -> tuple[Tensor, Tensor]:
        """(ids, mask) [b, Q]: each prefix's tokens (no special tokens) cut to Q, then padding (mask 0)."""
        ids = torch.full((len(prefixes), self.prefix_length), self.pad, dtype=torch.long)
        mask = torch.zeros(len(prefixes), self.prefix_length, dtype=torch.long)
        present = [(i, p) for i, p in enumerate(prefixes) if p]
        if present:
            for (i, _), row in zip(present, self._ids([p for _, p in present], special=False)):
                row = row[: self.prefix_length]
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, : len(row)] = 1
        return ids, mask

    def _decoder_only(self, prompts: list[str], targets: list[str]) -> dict[str, Tensor]:
        # Prompt and target are tokenized apart so the loss boundary is exact; the target gets the space
        # that joins it to a prompt, so its tokens are those of the joined text for BPE tokenizers.
        prompt_ids = self._ids([p.rstrip() for p in prompts], special=False)
        target_ids = self._ids([(" " + t if p.strip() else t) for p, t in zip(prompts, targets)], special=False)
        rows, labels = [], []
        for p, t in zip(prompt_ids, target_ids):
            ids = ([self.bos] + p + t + [self.eos])[: self.max_txt_len]
            lab = ([-100] * (1 + len(p)) + t + [self.eos])[: self.max_txt_len]
            rows.append(self.image_prefix + ids)
            labels.append([-100] * len(self.image_prefix) + lab)
        input_ids, attention_mask = _pad_right(rows, self.pad)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": _pad_right(labels, -100)[0]}

    def _encoder_decoder(self, prompts: list[str], targets: list[str]) -> dict[str, Tensor]:
        enc = [self.image_prefix + ids[: self.max_txt_len] for ids in self._ids(prompts, special=True)]
        dec = [ids[: self.max_txt_len] for ids in self._ids(targets, special=True)]
        input_ids, attention_mask = _pad_right(enc, self.pad)
        labels, decoder_attention_mask = _pad_right(dec, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "decoder_attention_mask": decoder_attention_mask}


def _pad_right(rows: list[list[int]], value: int) -> tuple[Tensor, Tensor]:
    """Right-pad id lists to one length: (ids [B, L], mask [B, L])."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


# Keys of a stage-1 (retrieval) checkpoint that stage 2 keeps: the image encoder, the queries and the
# Q-Former's query path. LAVIS drops the rest when it starts stage 2 from stage 1 (Qformer.cls, the
# word/position embeddings, every layer's text FFN ``intermediate``/``output``).
def _stage2_key(key: str) -> bool:
    if key.startswith(("vision_model.", "query_tokens")):
        return True
    if not key.startswith("qformer."):
        return False
    parts = key.split(".")
    return not (len(parts) > 4 and parts[1] == "encoder" and parts[4] in ("intermediate", "output"))


_QFORMER_SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "cross_attention_frequency")


def _check_same_architecture(config: Blip2Config, stage1: Blip2Config, stage1_dir: str) -> None:
    ours = {k: getattr(config.qformer_config, k) for k in _QFORMER_SHAPE} | {"num_query_tokens": config.num_query_tokens}
    theirs = {k: getattr(stage1.qformer_config, k) for k in _QFORMER_SHAPE} | {"num_query_tokens": stage1.num_query_tokens}
    if ours != theirs or config.vision_config.to_dict() != stage1.vision_config.to_dict():
        diff = {k: (theirs[k], ours[k]) for k in ours if ours[k] != theirs[k]}
        raise ValueError(f"{stage1_dir}: its image encoder or Q-Former differs from the model's "
                         f"(stage 1 vs model: {diff or 'vision_config'}); start stage 2 with build_stage2 / --lm instead")


def load_stage1_into(model: Blip2ForConditionalGeneration, stage1_dir: str) -> list[str]:
    """Copy a stage-1 checkpoint's image encoder, queries and Q-Former into ``model`` (same architecture);
    re-initialise the language projection (it maps a new Q-Former). Returns the keys copied."""
    _check_same_architecture(model.config, Blip2Config.from_pretrained(stage1_dir), stage1_dir)
    own = model.state_dict()
    wanted = {k for k in own if _stage2_key(k)}
    copied: list[str] = []
    with torch.no_grad():
        for key, tensor in iter_checkpoint_tensors(stage1_dir):
            if key in wanted:
                if tuple(tensor.shape) != tuple(own[key].shape):
                    raise ValueError(f"{stage1_dir}: {key} has shape {tuple(tensor.shape)}, the model expects "
                                     f"{tuple(own[key].shape)}")
                own[key].copy_(tensor)
                copied.append(key)
        model.language_projection.reset_parameters()
    missing = sorted(wanted - set(copied))
    if missing:
        raise ValueError(f"{stage1_dir}: not a stage-1 checkpoint for this model, missing {missing[:5]}")
    return copied


def build_stage2(stage1_dir: str, lm_dir: str) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """A stage-2 model as LAVIS starts one: image encoder, queries and Q-Former from a stage-1 checkpoint,
    a Hugging Face OPT or T5 checkpoint as the language model, a fresh language projection.

    The processor is the stage-1 image processor with the LM's tokenizer, to which it adds an ``<image>``
    token when there is none; the projected queries go where the processor puts the ``num_query_tokens``
    image tokens (transformers 5 needs them). The token must fall inside the LM's embedding table, as
    it does for OPT (50272 rows, 50265 tokens) and Flan-T5 (32128 rows, 32100 tokens).
    """
    stage1 = Blip2Config.from_pretrained(stage1_dir)
    lm_raw = read_config(lm_dir)
    text_classes = {"opt": OPTConfig, "t5": T5Config}
    if lm_raw.get("model_type") not in text_classes:
        raise ValueError(f"{lm_dir}: expected an OPT or T5 checkpoint, got model_type {lm_raw.get('model_type')!r}")
    text_config = text_classes[lm_raw["model_type"]].from_dict(lm_raw, source=lm_dir)
    processor = Blip2Processor(Blip2ImageProcessor.from_pretrained(stage1_dir), TextTokenizer.from_pretrained(lm_dir),
                               num_query_tokens=stage1.num_query_tokens)
    if processor.image_token_id >= text_config.vocab_size:
        raise ValueError(f"{lm_dir}: the image token gets id {processor.image_token_id}, outside the LM's "
                         f"{text_config.vocab_size} embeddings")
    config = Blip2Config(vision_config=stage1.vision_config,
                         qformer_config=stage1.qformer_config.replace(use_qformer_text_input=False),
                         text_config=text_config, num_query_tokens=stage1.num_query_tokens,
                         image_text_hidden_size=stage1.image_text_hidden_size,
                         image_token_index=processor.image_token_id)
    with torch.device("meta"):  # the LM is assigned from its checkpoint, never allocated at random
        model = Blip2ForConditionalGeneration(config)
    load_into(model.language_model, lm_dir)
    tensors = {k: v for k, v in iter_checkpoint_tensors(stage1_dir) if _stage2_key(k)}
    projection = nn.Linear(config.qformer_config.hidden_size, text_config.hidden_size)  # as LAVIS's opt_proj/t5_proj
    tensors.update({"language_projection.weight": projection.weight.data, "language_projection.bias": projection.bias.data})
    missing = sorted(k for k in model.state_dict() if not k.startswith("language_model.") and k not in tensors)
    if missing:
        raise ValueError(f"{stage1_dir}: not a stage-1 checkpoint, missing {missing[:5]}")
    model.load_state_dict(tensors, strict=False, assign=True)
    return model.eval(), processor


def train_stage2(model: Blip2ForConditionalGeneration, processor: Blip2Processor,
                 data: ImageTextDataset | FeatureDataset | Sequence[str] | str, config: TrainConfig,
                 processor_source: str | None = None) -> list[dict[str, Any]]:
    """Stage-2 training or fine-tuning (the same objective) of ``model`` in place; returns the logged metrics.

    The language model is always frozen; the image encoder (but for its output LayerNorm, see
    ``common.frozen_vision_modules``) is frozen unless ``config.freeze_vision`` is False. data: an
    ``ImageTextDataset``, a ``FeatureDataset`` (cached frozen-encoder states) or manifests / tar shards for
    ``config.task`` ("caption", "vqa" or "mixed"). With
    ``config.out_dir`` the final model is written there in the Hugging Face format with the processor
    files (copied from ``processor_source`` when given).
    """
    if config.amp == "fp16" and not model.config.use_decoder_only_language_model:
        raise ValueError("fp16 overflows in Flan-T5's feed-forward layers (BLIP-2 trained it in bf16): use amp='bf16'")
    trainee = Blip2Stage2(model, prefix_loss_weight=config.prefix_loss_weight)
    dataset = make_dataset(data, processor.image_processor, config)
    text = Stage2Text(processor.tokenizer, model, task=config.task, prompt=config.prompt,
                      max_txt_len=config.max_txt_len, prefix_lm=config.prefix_lm, seed=config.seed,
                      caption_prompt=config.caption_prompt, prefix_ids=config.prefix_loss_weight > 0)

    def make_inputs(batch: dict[str, Any], step: int, micro: int) -> dict[str, Any]:
        return {**image_inputs(batch), **text(batch)}

    def save(directory: str) -> None:
        model.save_pretrained(directory)
        save_processor(processor, directory, processor_source)

    return run(trainee, dataset, make_inputs, config, save)


# fine-tuning is stage 2's objective with other settings: TrainConfig.preset("finetune_caption" / "finetune_vqa")
finetune = train_stage2

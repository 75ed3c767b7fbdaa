"""Stage 1: the Q-Former learns to extract text-relevant visual features from a frozen image encoder.

``Blip2Stage1`` wraps a ``Blip2ForImageTextRetrieval`` (the Hugging Face layout: ``vision_model``,
``query_tokens``, ``embeddings``, ``qformer``, ``vision_projection``, ``text_projection``, ``itm_head``)
with what only training needs: the ITG language-model head (``QFormerLMHead``, LAVIS
``Qformer.cls.predictions``, decoder tied to the word embeddings) and the learned ITC temperature.
Its ``forward`` computes the three losses of LAVIS ``Blip2Qformer.forward`` (see ``losses``).

On disk the retrieval model stays a plain Hugging Face checkpoint (``model.safetensors``, loadable by
transformers' and our ``Blip2ForImageTextRetrieval``); the ITG head goes beside it in
``itg_head.safetensors`` under BERT's names (``cls.predictions.*``) and the temperature into
``config.temperature``.

``build_stage1`` starts a Q-Former the way LAVIS does: BERT weights for self-attention, text FFN and
embeddings, the query FFN copied from the text FFN, fresh cross-attention, a [DEC] token added to the
vocabulary as BOS for ITG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2.checkpoint import iter_checkpoint_tensors
from blip2.config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig
from blip2.hub import read_config
from blip2.images import Blip2ImageProcessor
from blip2.processing import Blip2Processor, TextTokenizer
from blip2.models.retrieval import Blip2ForImageTextRetrieval
from blip2.models.layers import activation
from blip2.train.common import encode_image, frozen_vision_modules, image_inputs, make_dataset, save_processor
from blip2.train.data import FeatureDataset, ImageTextDataset
from blip2.train.loop import derive_seed, run
from blip2.train.losses import (
    ITG_LABEL_SMOOTHING,
    gather_no_grad,
    gather_with_grad,
    itc_loss,
    itc_similarity,
    itm_loss,
    negative_weights,
    rank_and_world,
    sample_negatives,
    token_cross_entropy,
)
from blip2.train.presets import TrainConfig

__all__ = [
    "DEFAULT_TEMPERATURE",
    "ITG_HEAD_FILE",
    "Blip2Stage1",
    "QFormerLMHead",
    "Stage1Text",
    "build_stage1",
    "load_bert_into",
    "qformer_config_from_bert",
    "train_stage1",
]

ITG_HEAD_FILE = "itg_head.safetensors"
ITG_HEAD_PREFIX = "cls.predictions."  # BERT's (and LAVIS's, under Qformer.) names for the LM head
DEFAULT_TEMPERATURE = 0.07  # LAVIS: self.temp = nn.Parameter(0.07 * torch.ones([]))
DEC_TOKEN = "[DEC]"  # LAVIS init_tokenizer: add_special_tokens({"bos_token": "[DEC]"})


class _HeadTransform(nn.Module):
    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class QFormerLMHead(nn.Module):
    """BERT's LM head: dense -> activation -> LayerNorm -> decoder tied to the word embeddings (+ bias).

    The decoder weight is passed to ``forward`` instead of being held, so the tie to the Q-Former's
    ``embeddings.word_embeddings`` cannot come undone, and the head's own state is just
    ``transform.*`` and ``bias``.
    """

    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.transform = _HeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        std = config.initializer_range
        nn.init.normal_(self.transform.dense.weight, std=std)
        nn.init.zeros_(self.transform.dense.bias)

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        """hidden [B, T, D], word_embeddings [V, D] -> logits [B, T, V]."""
        return F.linear(self.transform(hidden), word_embeddings, self.bias)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        tensors = {ITG_HEAD_PREFIX + k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, path, metadata={"format": "pt"})

    def load_bert_state(self, tensors: dict[str, Tensor]) -> None:
        """Load ``cls.predictions.*`` tensors (BERT, LAVIS without ``Qformer.``, or ``save``), strictly.

        The decoder weight in BERT files is the tied word embedding: not part of this head. A bias
        shorter than ours (BERT before the [DEC] token was added) fills the first rows.
        """
        own = self.state_dict()
        got = {k[len(ITG_HEAD_PREFIX):]: v for k, v in tensors.items()
               if k.startswith(ITG_HEAD_PREFIX) and k != ITG_HEAD_PREFIX + "decoder.weight"}
        got.pop("decoder.bias", None)  # transformers writes the bias twice (tied); `bias` is the one
        missing = sorted(set(own) - set(got))
        unexpected = sorted(set(got) - set(own))
        if missing or unexpected:
            raise ValueError(f"ITG head: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for k, v in got.items():
                if k == "bias" and v.shape[0] < own[k].shape[0]:
                    own[k][: v.shape[0]].copy_(v)
                else:
                    own[k].copy_(v)


class Stage1Text:
    """Tokenizes captions for stage 1 as LAVIS does: padded to ``max_txt_len`` (so every rank's batch has
    the same shape and can be gathered), CLS first; for ITG the CLS is replaced by BOS ([DEC]) and
    padding carries no loss."""

    def __init__(self, tokenizer: TextTokenizer, max_txt_len: int = 32) -> None:
        if tokenizer.bos_token_id is None:
            raise ValueError("the stage-1 tokenizer needs a bos_token ([DEC]) for ITG; see build_stage1")
        self.tokenizer = tokenizer
        self.max_txt_len = max_txt_len

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_txt_len,
                             return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        itg_ids = ids.clone()
        itg_ids[:, 0] = self.tokenizer.bos_token_id
        return {"input_ids": ids, "attention_mask": mask, "itg_input_ids": itg_ids,
                "itg_labels": itg_ids.masked_fill(mask == 0, -100)}


class Blip2Stage1(nn.Module):
    """The stage-1 training model: retrieval model + ITG head + learned temperature; forward -> losses."""

    def __init__(self, model: Blip2ForImageTextRetrieval, itg_head: QFormerLMHead | None = None,
                 temperature: float | None = None, negative_temperature: float | None = None) -> None:
        super().__init__()
        self.model = model
        if not model.config.qformer_config.use_qformer_text_input:
            raise ValueError("stage 1 needs a Q-Former with text input (qformer_config.use_qformer_text_input)")
        self.itg_head = itg_head if itg_head is not None else QFormerLMHead(model.config.qformer_config)
        if temperature is None:
            temperature = model.config.temperature or DEFAULT_TEMPERATURE
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        # ITM negatives ~ softmax(cosine / t); None: t = the learned ITC temperature (LAVIS)
        self.negative_temperature = negative_temperature
        # set by the training loop: the dtype the frozen image encoder runs in under autocast
        self.autocast_dtype: torch.dtype | None = None

    def frozen_modules(self, freeze_vision: bool) -> list[nn.Module]:
        return frozen_vision_modules(self.model.vision_model) if freeze_vision else []

    def after_step(self) -> None:
        """Keep the temperature in (0.001, 0.5) as BLIP does (BLIP-2 leaves it free; a no-op in practice)."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

    def forward(self, pixel_values: Tensor | None, input_ids: Tensor, attention_mask: Tensor, itg_input_ids: Tensor,
                itg_labels: Tensor, negatives_seed: int, vision_states: Tensor | None = None,
                negative_ids: Tensor | None = None, negative_mask: Tensor | None = None,
                has_negative: Tensor | None = None) -> dict[str, Tensor]:
        """This rank's share of a global batch -> ``{"loss", "itc", "itm", "itg", "neg_image", "neg_text"}``.

        pixel_values [b, 3, H, W], or None with vision_states [b, N+1, Dv] (the frozen ViT's output computed
        beforehand, see ``FeatureDataset``); input_ids/attention_mask/itg_input_ids/itg_labels [b, T] (``Stage1Text``).
        ``negatives_seed`` must be the same on every rank: hard negatives are drawn from the gathered
        similarity with a generator seeded by it, so a run gives the same draws on any number of ranks.
        ``neg_image``/``neg_text`` are the global batch indices of the drawn negatives, [b] each.
        Given hard negative captions (``negative_ids``/``negative_mask`` [b, T], ``has_negative`` [b] bool:
        the rows that have one), ITM also scores each with its image as a non-match.
        """
        m = self.model
        rank, world = rank_and_world()
        b, Q = input_ids.shape[0], m.config.num_query_tokens
        # the Q-Former runs in fp32, outside autocast
        image_feats = encode_image(m.vision_model, pixel_values, self.autocast_dtype,
                                   vision_states).to(m.query_tokens.dtype)

        # ITC: queries vs text CLS, against every rank's rows
        image_embeds = m.image_embeds_from_features(image_feats)  # [b, Q, E]
        text_cls = m.text_outputs(input_ids, attention_mask).last_hidden_state[:, 0]  # [b, D]
        text_embeds = F.normalize(m.text_projection(text_cls), dim=-1)  # [b, E]
        image_embeds_all = gather_with_grad(image_embeds)  # [G, Q, E]
        text_embeds_all = gather_with_grad(text_embeds)  # [G, E]
        loss_itc = itc_loss(image_embeds, text_embeds, image_embeds_all, text_embeds_all, self.temp, rank * b)

        # ITM: each pair, a negative image for its text, a negative text for its image
        ids_all, mask_all = gather_no_grad(input_ids), gather_no_grad(attention_mask)  # [G, T]
        feats_all = gather_with_grad(image_feats)  # [G, N+1, Dv] (post_layernorm is trained)
        with torch.no_grad():
            t = self.temp if self.negative_temperature is None else self.negative_temperature
            sim = itc_similarity(image_embeds_all, text_embeds_all) / t  # [G_img, G_txt]
            text_class = torch.unique(torch.cat([ids_all, mask_all], dim=1), dim=0, return_inverse=True)[1]
            same_text = text_class[:, None] == text_class[None, :]  # [G, G]; includes the diagonal
            generator = torch.Generator().manual_seed(negatives_seed)
            rows = slice(rank * b, rank * b + b)
            # as LAVIS: first a negative image for every text, then a negative text for every image
            neg_image = sample_negatives(negative_weights(sim.t(), same_text), generator)[rows]  # [b]
            neg_text = sample_negatives(negative_weights(sim, same_text), generator)[rows]  # [b]
        feats = [image_feats, feats_all[neg_image], image_feats]  # [3b, N+1, Dv]: pos, neg image, pos
        ids = [input_ids, input_ids, ids_all[neg_text]]  # [3b, T]: pos, pos, neg text
        masks = [attention_mask, attention_mask, mask_all[neg_text]]
        if negative_ids is not None and negative_mask is not None and has_negative is not None:
            keep = has_negative.to(image_feats.device).bool()  # [b]: + k pairs (image, its hard negative)
            feats.append(image_feats[keep])
            ids.append(negative_ids.to(input_ids.device)[keep])
            masks.append(negative_mask.to(input_ids.device)[keep])
        itm_logits = m.itm_logits_from_features(torch.cat(feats), torch.cat(ids), torch.cat(masks))
        loss_itm = itm_loss(itm_logits, positives=b)

        # ITG: text generation from the queries (queries see queries, text sees queries and earlier text)
        queries = m.query_tokens.expand(b, -1, -1)
        joint_mask = torch.cat([attention_mask.new_ones(b, Q), attention_mask], dim=1)  # [b, Q+T]
        hidden = m.qformer(m.embeddings(itg_input_ids, queries), image_feats, query_length=Q,
                           attention_mask=joint_mask, causal_text=True).last_hidden_state  # [b, Q+T, D]
        logits = self.itg_head(hidden[:, Q:], m.embeddings.word_embeddings.weight)  # [b, T, V]
        total, count = token_cross_entropy(logits, itg_labels, shift=True, label_smoothing=ITG_LABEL_SMOOTHING)
        if world > 1:  # normalise by the global token count: DDP's mean over ranks then gives the global mean
            count = count.clone()
            torch.distributed.all_reduce(count)
        loss_itg = total / count.clamp(min=1) * world

        loss = loss_itc + loss_itm + loss_itg
        return {"loss": loss, "itc": loss_itc.detach(), "itm": loss_itm.detach(), "itg": loss_itg.detach(),
                "neg_image": neg_image, "neg_text": neg_text}

    # -- files ---------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str) -> None:
        """The retrieval model in the Hugging Face format (temperature in its config) + itg_head.safetensors."""
        self.model.config.temperature = float(self.temp.detach())
        self.model.save_pretrained(directory)
        self.itg_head.save(os.path.join(directory, ITG_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, directory: str) -> Blip2Stage1:
        """A retrieval checkpoint (ours or transformers'); the ITG head from itg_head.safetensors if there."""
        model = Blip2ForImageTextRetrieval.from_pretrained(directory)
        head = QFormerLMHead(model.config.qformer_config)
        path = os.path.join(directory, ITG_HEAD_FILE)
        if os.path.exists(path):
            from safetensors.torch import load_file

            head.load_bert_state(load_file(path))
        return cls(model, head)


# -- starting from BERT ---------------------------------------------------------------------------------

_BERT_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                     "initializer_range", "layer_norm_eps", "pad_token_id")


def qformer_config_from_bert(bert_config: dict[str, Any], encoder_hidden_size: int,
                             cross_attention_frequency: int = 2) -> Blip2QFormerConfig:
    """The Q-Former config for a BERT ``config.json`` (LAVIS init_Qformer: cross-attention every 2nd layer)."""
    kw = {k: bert_config[k] for k in _BERT_CONFIG_KEYS if k in bert_config}
    return Blip2QFormerConfig(**kw, cross_attention_frequency=cross_attention_frequency,
                              encoder_hidden_size=encoder_hidden_size, use_qformer_text_input=True)


def _bert_key_targets(key: str) -> list[str]:
    """Where a BERT weight goes in a Blip2ForImageTextRetrieval ([] = not used); ``bert.`` already stripped."""
    if key in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        return [key]
    if key.startswith("embeddings.LayerNorm."):
        return ["qformer.layernorm." + key.rsplit(".", 1)[1]]
    if key.startswith("encoder.layer."):
        _, _, i, rest = key.split(".", 3)
        layer = f"qformer.encoder.layer.{i}."
        if rest.startswith("attention.self."):
            return [layer + "attention.attention." + rest[len("attention.self."):]]
        if rest.startswith("attention.output."):
            return [layer + rest]
        if rest.startswith(("intermediate.", "output.")):
            # the query FFN starts as a copy of the text FFN (LAVIS: params with "_query" copied)
            head, tail = rest.split(".", 1)
            return [layer + rest, layer + f"{head}_query.{tail}"]
    # token_type_embeddings (LAVIS's Q-Former has none), pooler, position_ids: not used
    return []


def load_bert_into(stage1: Blip2Stage1, bert_dir: str) -> list[str]:
    """Initialise the Q-Former's text side from a Hugging Face BERT checkpoint; returns the keys it set.

    Accepts BertModel files (``embeddings.*``) and BertFor* files (``bert.embeddings.*``, ``cls.*``).
    Word embeddings: BERT's rows are copied, rows past BERT's vocabulary (the [DEC] token) keep their
    fresh initialisation. The ITG head takes BERT's ``cls.predictions`` when the file has it.
    """
    model = stage1.model
    own = model.state_dict()
    head_tensors: dict[str, Tensor] = {}
    done: list[str] = []
    with torch.no_grad():
        for key, tensor in iter_checkpoint_tensors(bert_dir):
            if key.startswith(ITG_HEAD_PREFIX):
                head_tensors[key] = tensor
                continue
            key = key.removeprefix("bert.")
            for target in _bert_key_targets(key):
                dst = own[target]
                if target == "embeddings.word_embeddings.weight" and tensor.shape[0] <= dst.shape[0]:
                    dst[: tensor.shape[0]].copy_(tensor)
                elif tuple(tensor.shape) != tuple(dst.shape):
                    raise ValueError(f"{bert_dir}: {key} has shape {tuple(tensor.shape)}, the Q-Former's {target} "
                                     f"expects {tuple(dst.shape)}")
                else:
                    dst.copy_(tensor)
                done.append(target)
    if head_tensors:
        stage1.itg_head.load_bert_state(head_tensors)
    return done


def build_stage1(vision_dir: str, bert_dir: str, *, num_query_tokens: int = 32, cross_attention_frequency: int = 2,
                 image_text_hidden_size: int = 256) -> tuple[Blip2Stage1, Blip2Processor]:
    """A fresh stage-1 model: the image encoder of a BLIP-2 checkpoint, a Q-Former started from BERT.

    vision_dir: any BLIP-2 checkpoint directory with ``vision_model.*`` weights (its image processor is
    used when it has one). bert_dir: a Hugging Face BERT checkpoint with ``tokenizer.json``; [DEC] is
    added as BOS when the tokenizer has none. Returns the model and the processor (BERT tokenizer,
    no image tokens: the retrieval model reads plain text ids).
    """
    tokenizer = TextTokenizer.from_pretrained(bert_dir)
    if tokenizer.bos_token_id is None:
        tokenizer.add_tokens([DEC_TOKEN], special_tokens=True)
        tokenizer.special_tokens["bos_token"] = DEC_TOKEN
    vision_config = Blip2VisionConfig.from_dict(read_config(vision_dir)["vision_config"])
    qformer_config = qformer_config_from_bert(read_config(bert_dir),
                                              vision_config.hidden_size, cross_attention_frequency)
    qformer_config.vocab_size = max(qformer_config.vocab_size, len(tokenizer))
    config = Blip2Config(vision_config=vision_config, qformer_config=qformer_config,
                         num_query_tokens=num_query_tokens, image_text_hidden_size=image_text_hidden_size,
                         image_token_index=None)
    stage1 = Blip2Stage1(Blip2ForImageTextRetrieval(config))
    vision_state = {k[len("vision_model."):]: v for k, v in iter_checkpoint_tensors(vision_dir)
                    if k.startswith("vision_model.")}
    stage1.model.vision_model.load_state_dict(vision_state, strict=True)
    load_bert_into(stage1, bert_dir)
    try:
        image_processor = Blip2ImageProcessor.from_pretrained(vision_dir)
    except FileNotFoundError:
        image_processor = Blip2ImageProcessor(size=vision_config.image_size)
    return stage1, Blip2Processor(image_processor, tokenizer, num_query_tokens=None)


def train_stage1(model: Blip2Stage1 | Blip2ForImageTextRetrieval, processor: Blip2Processor,
                 data: ImageTextDataset | FeatureDataset | Sequence[str] | str, config: TrainConfig,
                 processor_source: str | None = None) -> list[dict[str, Any]]:
    """Stage-1 training (ITC + ITM + ITG) of ``model`` in place; returns the logged metrics.

    model: a ``Blip2Stage1`` (keeps its ITG head), or a bare retrieval model (a fresh ITG head is made
    and dropped after training; the learned temperature ends in ``model.config.temperature`` either way).
    processor: BERT tokenizer (with a BOS token) and image processor. data: an ``ImageTextDataset``, a
    ``FeatureDataset`` (cached frozen-encoder states) or caption manifests / tar shards. With ``config.out_dir`` the final model is written there in the
    Hugging Face format with ``itg_head.safetensors`` and the processor files (copied from
    ``processor_source`` when given).
    """
    if config.task != "caption":
        raise ValueError("stage 1 trains on image-caption pairs (task 'caption')")
    stage1 = model if isinstance(model, Blip2Stage1) else Blip2Stage1(model)
    if config.itm_negative_temperature is not None:
        stage1.negative_temperature = config.itm_negative_temperature
    dataset = make_dataset(data, processor.image_processor, config)
    text = Stage1Text(processor.tokenizer, config.max_txt_len)

    def make_inputs(batch: dict[str, Any], step: int, micro: int) -> dict[str, Any]:
        inputs = {**image_inputs(batch), **text(batch["caption"]),
                  "negatives_seed": derive_seed(config.seed, step, micro, 2)}
        negatives = batch.get("negative") or []
        if any(negatives):  # hard negative captions (Record.negative)
            enc = text([n or "" for n in negatives])
            inputs.update(negative_ids=enc["input_ids"], negative_mask=enc["attention_mask"],
                          has_negative=torch.tensor([bool(n) for n in negatives]))
        return inputs

    def save(directory: str) -> None:
        stage1.save_pretrained(directory)
        save_processor(processor, directory, processor_source)

    metrics = run(stage1, dataset, make_inputs, config, save)
    stage1.model.config.temperature = float(stage1.temp.detach())
    return metrics

"""Convert BLIP-2 checkpoints of Salesforce LAVIS to the Hugging Face format.

Kinds (the LAVIS model each one comes from -> the class that loads the result):

    feature_extractor  blip2 / blip2_feature_extractor (Blip2Qformer, stage 1) -> Blip2ForImageTextRetrieval
    itm                blip2_image_text_matching (Blip2ITM, the same weights)   -> Blip2ForImageTextRetrieval
    opt                blip2_opt                                                -> Blip2ForConditionalGeneration
    t5                 blip2_t5                                                 -> Blip2ForConditionalGeneration

Every LAVIS key is mapped by ``KEY_MAP``, or dropped by ``DROPPED`` / ``TIED`` (each with its reason);
any other key is an error that names it. LAVIS applies ``ln_vision`` to the ViT output before the
Q-Former: that is transformers' ``vision_model.post_layernorm``. EVA's attention has a query and a
value bias but no key bias: the fused ``qkv.bias`` is ``[q_bias; 0; v_bias]``. The learned ITC
temperature ``temp``, which transformers drops, goes to ``config.temperature``.

The published LAVIS ``.pth`` files hold only what was trained (Q-Former, queries, projections,
``ln_vision``); LAVIS fills the frozen ViT and language model from other files when it builds the
model. Convert the full ``state_dict()`` of a built LAVIS model, or pass several ``.pth`` files
that together hold every weight; a missing weight is an error naming it.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from blip2.checkpoint import save_state_dict
from blip2.config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, T5Config
from blip2.models.qformer import Blip2QFormerModel
from blip2.models.retrieval import Blip2ForImageTextRetrieval
from blip2.models.vision import Blip2VisionModel

__all__ = [
    "Kind",
    "KEY_MAP",
    "DROPPED",
    "TIED",
    "LavisConversionError",
    "lavis_key_target",
    "convert_lavis_state_dict",
    "load_lavis_state_dict",
    "convert_lavis_checkpoint",
    "lavis_config",
]

Kind = Literal["feature_extractor", "itm", "opt", "t5"]
STAGE1: tuple[str, ...] = ("feature_extractor", "itm")
LM: tuple[str, ...] = ("opt", "t5")
ALL: tuple[str, ...] = STAGE1 + LM

TEMPERATURE = "config.temperature"  # the target of LAVIS's `temp`: a config field, not a tensor


class LavisConversionError(ValueError):
    """A LAVIS state dict that cannot be converted: names the key and what was expected."""


@dataclass(frozen=True)
class Rule:
    lavis: str  # regular expression, matched against the whole LAVIS key
    target: str  # transformers key (``\\1`` refers to groups), or TEMPERATURE
    kinds: tuple[str, ...]
    fuse: Literal["q", "v"] | None = None  # one third of a fused [q; k; v] bias


_VIT = r"visual_encoder\.blocks\.(\d+)\."
_HF_VIT = r"vision_model.encoder.layers.\1."
_QF = r"Qformer\.bert\.encoder\.layer\.(\d+)\."
_HF_QF = r"qformer.encoder.layer.\1."

# The key map, LAVIS -> transformers, for every kind.
KEY_MAP: tuple[Rule, ...] = (
    # EVA ViT-g image encoder
    Rule(r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding", ALL),
    Rule(r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding", ALL),
    Rule(r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1", ALL),
    Rule(_VIT + r"norm([12])\.(weight|bias)", _HF_VIT + r"layer_norm\2.\3", ALL),
    Rule(_VIT + r"attn\.qkv\.weight", _HF_VIT + "self_attn.qkv.weight", ALL),
    Rule(_VIT + r"attn\.q_bias", _HF_VIT + "self_attn.qkv.bias", ALL, fuse="q"),
    Rule(_VIT + r"attn\.v_bias", _HF_VIT + "self_attn.qkv.bias", ALL, fuse="v"),
    Rule(_VIT + r"attn\.proj\.(weight|bias)", _HF_VIT + r"self_attn.projection.\2", ALL),
    Rule(_VIT + r"mlp\.(fc[12])\.(weight|bias)", _HF_VIT + r"mlp.\2.\3", ALL),
    Rule(r"ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1", ALL),
    # Q-Former: BERT embeddings LayerNorm -> qformer.layernorm; `attention.self` -> `attention.attention`
    Rule(r"query_tokens", "query_tokens", ALL),
    Rule(r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.layernorm.\1", ALL),
    Rule(r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.weight", r"embeddings.\1_embeddings.weight", STAGE1),
    Rule(_QF + r"(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
         _HF_QF + r"\2.attention.\3.\4", ALL),
    Rule(_QF + r"(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
         _HF_QF + r"\2.output.\3.\4", ALL),
    Rule(_QF + r"intermediate_query\.dense\.(weight|bias)", _HF_QF + r"intermediate_query.dense.\2", ALL),
    Rule(_QF + r"output_query\.(dense|LayerNorm)\.(weight|bias)", _HF_QF + r"output_query.\2.\3", ALL),
    Rule(_QF + r"intermediate\.dense\.(weight|bias)", _HF_QF + r"intermediate.dense.\2", STAGE1),  # text FFN
    Rule(_QF + r"output\.(dense|LayerNorm)\.(weight|bias)", _HF_QF + r"output.\2.\3", STAGE1),
    # stage-1 heads
    Rule(r"vision_proj\.(weight|bias)", r"vision_projection.\1", STAGE1),
    Rule(r"text_proj\.(weight|bias)", r"text_projection.\1", STAGE1),
    Rule(r"itm_head\.(weight|bias)", r"itm_head.\1", STAGE1),
    Rule(r"temp", TEMPERATURE, STAGE1),
    # stage 2: projection into the LM, and the LM itself (LAVIS keeps transformers' OPT/T5 names)
    Rule(r"opt_proj\.(weight|bias)", r"language_projection.\1", ("opt",)),
    Rule(r"opt_model\.(.+)", r"language_model.\1", ("opt",)),
    Rule(r"t5_proj\.(weight|bias)", r"language_projection.\1", ("t5",)),
    Rule(r"t5_model\.(.+)", r"language_model.\1", ("t5",)),
)

# LAVIS keys with no place in the transformers classes: (pattern, kinds, why).
DROPPED: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (r"Qformer\.cls\..+", ALL, "the Q-Former's captioning (ITG) LM head; no transformers class has it"),
    (r"(.+\.)?position_ids", ALL, "a buffer of position indices, rebuilt when the model is built"),
    (r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.weight", LM,
     "Q-Former text input, unused by the LM models (LAVIS sets it to None)"),
    (_QF + r"(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)", LM,
     "Q-Former text feed-forward, unused by the LM models (LAVIS sets it to None)"),
)

# Copies of another weight in the LAVIS state dict (tied modules): dropped after checking they are
# equal, as transformers' save_pretrained does. (alias, source, kinds, config flag that ties them)
TIED: tuple[tuple[str, str, tuple[str, ...], str | None], ...] = (
    ("opt_model.lm_head.weight", "opt_model.model.decoder.embed_tokens.weight", ("opt",), "tie_word_embeddings"),
    ("t5_model.encoder.embed_tokens.weight", "t5_model.shared.weight", ("t5",), None),
    ("t5_model.decoder.embed_tokens.weight", "t5_model.shared.weight", ("t5",), None),
    ("t5_model.lm_head.weight", "t5_model.shared.weight", ("t5",), "tie_word_embeddings"),
)

_COMPILED = tuple((re.compile(r.lavis), r) for r in KEY_MAP)
_COMPILED_DROPPED = tuple((re.compile(p), kinds, why) for p, kinds, why in DROPPED)


def _check_kind(kind: str) -> None:
    if kind not in ALL:
        raise LavisConversionError(f"kind: expected one of {list(ALL)}, got {kind!r}")


def lavis_key_target(key: str, kind: Kind) -> str | None:
    """The transformers key (or ``config.temperature``) a LAVIS key becomes; None if it is dropped.

    Tied copies (``TIED``) map like their module; ``convert_lavis_state_dict`` drops them.
    Raises ``LavisConversionError`` naming a key that is neither mapped nor dropped.
    """
    _check_kind(kind)
    for pattern, kinds, _ in _COMPILED_DROPPED:
        if kind in kinds and pattern.fullmatch(key):
            return None
    for pattern, rule in _COMPILED:
        if kind in rule.kinds and (m := pattern.fullmatch(key)):
            return rule.target if rule.target == TEMPERATURE else m.expand(rule.target)
    raise LavisConversionError(f"LAVIS key {key!r} is not known for kind {kind!r} (neither mapped nor dropped)")


def _fuse_rule(key: str, kind: str) -> Rule | None:
    for pattern, rule in _COMPILED:
        if rule.fuse and kind in rule.kinds and pattern.fullmatch(key):
            return rule
    return None


def _expected_shapes(config: Blip2Config, kind: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the target model, except the language model's (built on the meta device)."""
    with torch.device("meta"):
        if kind in STAGE1:
            parts = {"": Blip2ForImageTextRetrieval(config)}
        else:
            D, D_lm = config.qformer_config.hidden_size, config.text_config.hidden_size
            parts = {"vision_model.": Blip2VisionModel(config.vision_config),
                     "qformer.": Blip2QFormerModel(config.qformer_config),
                     "language_projection.": torch.nn.Linear(D, D_lm)}
    shapes = {prefix + k: tuple(v.shape) for prefix, m in parts.items() for k, v in m.state_dict().items()}
    if kind in LM:
        shapes["query_tokens"] = (1, config.num_query_tokens, config.qformer_config.hidden_size)
    return shapes


def _check_config(config: Blip2Config, kind: str) -> None:
    text_input = config.qformer_config.use_qformer_text_input
    if kind in STAGE1 and not text_input:
        raise LavisConversionError(f"kind {kind!r} needs a config with qformer_config.use_qformer_text_input=True")
    if kind in LM and text_input:
        raise LavisConversionError(f"kind {kind!r} needs a config with qformer_config.use_qformer_text_input=False")
    want = {"opt": OPTConfig, "t5": T5Config}.get(kind)
    if want is not None and not isinstance(config.text_config, want):
        raise LavisConversionError(f"kind {kind!r} needs a {want.__name__} text_config, "
                                   f"got {type(config.text_config).__name__}")


def convert_lavis_state_dict(state_dict: dict[str, Tensor], kind: Kind, config: Blip2Config) -> dict[str, Tensor]:
    """Rename a LAVIS BLIP-2 state dict to transformers' keys, for the model ``config`` describes.

    ``config.temperature`` is set (in place) from LAVIS's ``temp`` when the state dict has it.
    Raises ``LavisConversionError`` naming unknown, missing or mis-shaped keys.
    """
    _check_kind(kind)
    _check_config(config, kind)
    out: dict[str, Tensor] = {}
    bias_parts: dict[str, dict[str, Tensor]] = {}  # fused qkv bias key -> {"q": ..., "v": ...}
    unknown: list[str] = []
    tied = {alias: (source, flag) for alias, source, kinds, flag in TIED if kind in kinds}
    for key, tensor in state_dict.items():
        if key in tied:
            source, flag = tied[key]
            if flag is None or getattr(config.text_config, flag):
                if source not in state_dict:
                    raise LavisConversionError(f"{key!r} is a tied copy of {source!r}, which is missing")
                if not torch.equal(tensor, state_dict[source]):
                    raise LavisConversionError(f"{key!r} should be a tied copy of {source!r} (the config ties "
                                               f"them) but holds different values")
                continue
        try:
            target = lavis_key_target(key, kind)
        except LavisConversionError:
            unknown.append(key)
            continue
        if target is None:
            continue
        if target == TEMPERATURE:
            config.temperature = float(tensor)
        elif (rule := _fuse_rule(key, kind)) is not None:
            bias_parts.setdefault(target, {})[rule.fuse] = tensor  # type: ignore[index]
        else:
            out[target] = tensor
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise LavisConversionError(f"LAVIS keys not known for kind {kind!r} (neither mapped nor dropped): {shown}")
    for target, parts in bias_parts.items():
        if set(parts) != {"q", "v"}:
            raise LavisConversionError(f"{target}: LAVIS has only the {'/'.join(parts)} bias; need q_bias and v_bias")
        q, v = parts["q"], parts["v"]
        out[target] = torch.cat([q, torch.zeros_like(q), v])  # [3D]: EVA has no key bias
    _check_against_model(out, config, kind)
    return out


def _check_against_model(out: dict[str, Tensor], config: Blip2Config, kind: str) -> None:
    expected = _expected_shapes(config, kind)
    extra = [k for k in out if k not in expected and not k.startswith("language_model.")]
    if extra:
        raise LavisConversionError(f"converted keys the {kind!r} model of this config does not have: {extra[:10]}")
    missing = [k for k in expected if k not in out]
    if missing:
        raise LavisConversionError(f"the LAVIS state dict lacks weights for: {missing[:10]}"
                                   + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    if kind in LM and not any(k.startswith("language_model.") for k in out):
        raise LavisConversionError(f"the LAVIS state dict has no {kind}_model.* (language model) weights")
    for k, shape in expected.items():
        if tuple(out[k].shape) != shape:
            raise LavisConversionError(f"{k}: shape {tuple(out[k].shape)} in the LAVIS state dict, "
                                       f"the config gives {shape}")


def load_lavis_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of a LAVIS ``.pth`` file (``{"model": state_dict, ...}`` or a bare state dict)."""
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, truncated, or not a plain tensor file: one message
        raise LavisConversionError(f"{os.fspath(path)}: cannot read a PyTorch checkpoint ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise LavisConversionError(f"{os.fspath(path)}: expected a state dict (or {{'model': state_dict}})")
    return obj


def convert_lavis_checkpoint(checkpoint: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                             kind: Kind, config: Blip2Config, max_shard_size: int | str = "5GB") -> Blip2Config:
    """Convert LAVIS ``.pth`` file(s) into a Hugging Face directory (config.json + safetensors).

    Several files are merged (a later file may not repeat a key). The directory loads in our
    classes and in transformers'. Returns the config written (``temperature`` set from ``temp``).
    """
    paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
    merged: dict[str, Tensor] = {}
    for path in paths:
        sd = load_lavis_state_dict(path)
        repeated = sorted(set(sd) & set(merged))
        if repeated:
            raise LavisConversionError(f"{os.fspath(path)}: keys already read from an earlier file: {repeated[:10]}")
        merged.update(sd)
    config = copy.deepcopy(config)
    converted = convert_lavis_state_dict(merged, kind, config)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    d = config.to_dict()
    d["architectures"] = ["Blip2ForImageTextRetrieval" if kind in STAGE1 else "Blip2ForConditionalGeneration"]
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")
    save_state_dict(converted, out_dir, max_shard_size=max_shard_size)
    return config


def lavis_config(kind: Kind, image_size: int = 224, text_config: OPTConfig | T5Config | None = None) -> Blip2Config:
    """The architecture of the published LAVIS BLIP-2 models (``image_size=364`` for the ``-coco`` ones).

    Stage 1: BERT vocabulary + the [DEC] token (30523), Q-Former text input. ``opt``: facebook/opt-2.7b
    (vocabulary 50272: LAVIS does not resize it). ``t5``: google/flan-t5-xl with the exact GELU, as
    transformers' own conversion set it. Pass ``text_config`` for the 6.7b / XXL models. The queries
    are prepended to the prompt (``image_token_index=None``), as in transformers' conversion.
    """
    _check_kind(kind)
    vision = Blip2VisionConfig(image_size=image_size)
    if kind in STAGE1:
        return Blip2Config(vision_config=vision, image_token_index=None,
                           qformer_config=Blip2QFormerConfig(vocab_size=30523, use_qformer_text_input=True))
    if text_config is None:
        text_config = OPTConfig(vocab_size=50272) if kind == "opt" else T5Config(dense_act_fn="gelu", bos_token_id=1)
    return Blip2Config(vision_config=vision, qformer_config=Blip2QFormerConfig(), text_config=text_config,
                       image_token_index=None)

"""Configs for BLIP-2, read from and written to Hugging Face ``config.json`` files.

Each config is a dataclass whose field names are the Hugging Face attribute names, so a
``config.json`` written by ``transformers`` loads unchanged and ours loads in ``transformers``.
Keys we do not model are kept in ``extra`` and written back, so a round trip loses nothing.
Defaults equal the Salesforce/blip2-opt-2.7b architecture.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from blip2.hub import CONFIG_FILE, read_json, resolve_dir

__all__ = [
    "Blip2VisionConfig",
    "Blip2QFormerConfig",
    "OPTConfig",
    "T5Config",
    "Blip2Config",
    "ConfigError",
]


class ConfigError(ValueError):
    """A config file or dict that cannot be understood (names the file and field)."""


# Keys written by transformers' PretrainedConfig that carry no architecture: dropped on read,
# not written back (transformers fills its own defaults for them).
_BOOKKEEPING = {"transformers_version", "_name_or_path", "_commit_hash", "_attn_implementation_autoset"}


@dataclass
class _Config:
    model_type: ClassVar[str] = ""
    # old spelling -> current field name
    renames: ClassVar[dict[str, str]] = {}
    # the values a model can be built from: sizes above 0, layer counts of 0 or more, probabilities in [0, 1]
    # (a file saying num_query_tokens: -5 is an error naming the field, not a failure deep inside torch)
    positive: ClassVar[tuple[str, ...]] = ()
    counts: ClassVar[tuple[str, ...]] = ()
    probabilities: ClassVar[tuple[str, ...]] = ()
    # (width, heads): the width splits evenly into heads
    heads: ClassVar[tuple[str, str] | None] = None

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | _Config | None, source: str = "config") -> _Config:
        if d is None:
            return cls()
        if isinstance(d, cls):
            return copy.deepcopy(d)
        if isinstance(d, _Config):
            raise ConfigError(f"{source}: expected a {cls.__name__}, got a {type(d).__name__}")
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in d.items():
            key = cls.renames.get(key, key)
            if key in _BOOKKEEPING or key == "model_type":
                continue
            if key in known:
                kwargs[key] = value
            else:
                extra[key] = value
        try:
            cfg = cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None
        cfg.extra = extra
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        for f in dataclasses.fields(self):
            if f.name in ("extra",) or f.type not in ("int", "float", "bool"):
                continue
            v = getattr(self, f.name)
            ok = {"int": (int,), "float": (int, float), "bool": (bool,)}[f.type]
            if not isinstance(v, ok) or (f.type == "int" and isinstance(v, bool)):
                raise ConfigError(f"{source}: field {f.name!r} expected {f.type}, got {v!r}")
        rules = [(self.positive, lambda v: v > 0, "above 0"), (self.counts, lambda v: v >= 0, "0 or more"),
                 (self.probabilities, lambda v: 0 <= v <= 1, "between 0 and 1")]
        for names, ok_value, wanted in rules:
            for name in names:
                v = getattr(self, name)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not ok_value(v):
                    raise ConfigError(f"{source}: field {name!r} must be {wanted}, got {v!r}")
        if self.heads is not None:
            width, heads = (getattr(self, n) for n in self.heads)
            if width % heads:
                raise ConfigError(f"{source}: field {self.heads[0]!r} ({width}) must be a multiple of "
                                  f"{self.heads[1]!r} ({heads})")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, _Config) else copy.deepcopy(v)
        out["model_type"] = self.model_type
        return out

    def replace(self, **changes: Any) -> _Config:
        new = dataclasses.replace(self, **changes)
        new.extra = dict(self.extra)
        return new


@dataclass
class Blip2VisionConfig(_Config):
    """The EVA ViT-g image encoder (1408 wide, 39 layers, patch 14, 224 px by default)."""

    model_type: ClassVar[str] = "blip_2_vision_model"
    positive: ClassVar[tuple[str, ...]] = ("hidden_size", "intermediate_size", "num_attention_heads", "image_size",
                                           "patch_size", "layer_norm_eps")
    counts: ClassVar[tuple[str, ...]] = ("num_hidden_layers",)
    probabilities: ClassVar[tuple[str, ...]] = ("attention_dropout",)
    heads: ClassVar[tuple[str, str] | None] = ("hidden_size", "num_attention_heads")

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 1e-10
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class Blip2QFormerConfig(_Config):
    """The Q-Former: a BERT-base-sized encoder with cross-attention to the image every k-th layer."""

    model_type: ClassVar[str] = "blip_2_qformer"
    positive: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                                           "max_position_embeddings", "layer_norm_eps", "cross_attention_frequency",
                                           "encoder_hidden_size")
    counts: ClassVar[tuple[str, ...]] = ("num_hidden_layers",)
    probabilities: ClassVar[tuple[str, ...]] = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    heads: ClassVar[tuple[str, str] | None] = ("hidden_size", "num_attention_heads")

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False


@dataclass
class OPTConfig(_Config):
    """OPT decoder (defaults: facebook/opt-2.7b as used by blip2-opt-2.7b)."""

    model_type: ClassVar[str] = "opt"
    is_encoder_decoder: ClassVar[bool] = False
    positive: ClassVar[tuple[str, ...]] = ("vocab_size", "hidden_size", "ffn_dim", "num_attention_heads",
                                           "max_position_embeddings", "word_embed_proj_dim")
    counts: ClassVar[tuple[str, ...]] = ("num_hidden_layers",)
    probabilities: ClassVar[tuple[str, ...]] = ("dropout", "attention_dropout")
    heads: ClassVar[tuple[str, str] | None] = ("hidden_size", "num_attention_heads")

    vocab_size: int = 50304
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    ffn_dim: int = 10240
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    init_std: float = 0.02
    bos_token_id: int = 2
    eos_token_id: int | list[int] = 50118
    pad_token_id: int = 1
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size


@dataclass
class T5Config(_Config):
    """T5 / T5 v1.1 / Flan-T5 encoder-decoder (defaults: google/flan-t5-xl as used by blip2-flan-t5-xl).

    Keys are interpreted as transformers 5 interprets a ``config.json``:

    - ``feed_forward_proj`` is ``"ACT"`` or ``"gated-ACT"``; it gives ``is_gated_act`` and ``dense_act_fn``
      (the legacy ``"gated-gelu"`` means the tanh approximation ``"gelu_new"``) unless the file names them:
      an explicit ``dense_act_fn`` wins (blip2-flan-t5-xl says ``"gelu"``, the exact erf GELU).
    - ``tie_word_embeddings`` here means ``lm_head`` shares ``shared.weight``.
    - ``scale_decoder_outputs``: multiply the decoder output by ``d_model**-0.5`` before ``lm_head``.
      Files written before transformers 5 do not have it; it then follows ``tie_word_embeddings``
      (original T5: tied and scaled; T5 v1.1 / Flan-T5 say ``tie_word_embeddings: false``: untied and
      unscaled). transformers 5 writes ``tie_word_embeddings: true`` for every T5 (and unties on load
      when the checkpoint's ``lm_head.weight`` differs), so there ``scale_decoder_outputs`` is the only
      trustworthy bit.
    - Keys missing from a file take transformers' defaults (``d_model`` 512, ``feed_forward_proj`` "relu",
      ``tie_word_embeddings`` true, ...), not the Flan-T5-XL defaults of this dataclass.
    """

    model_type: ClassVar[str] = "t5"
    is_encoder_decoder: ClassVar[bool] = True
    positive: ClassVar[tuple[str, ...]] = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "layer_norm_epsilon",
                                           "relative_attention_num_buckets", "relative_attention_max_distance")
    counts: ClassVar[tuple[str, ...]] = ("num_layers", "num_decoder_layers")
    probabilities: ClassVar[tuple[str, ...]] = ("dropout_rate",)
    renames: ClassVar[dict[str, str]] = {"hidden_size": "d_model", "num_attention_heads": "num_heads",
                                          "num_hidden_layers": "num_layers", "head_dim": "d_kv"}
    # transformers' T5Config defaults where they differ from ours; applied to keys absent from a file
    file_defaults: ClassVar[dict[str, Any]] = {"d_model": 512, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
                                               "num_decoder_layers": None, "feed_forward_proj": "relu",
                                               "tie_word_embeddings": True}

    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64
    d_ff: int = 5120
    num_layers: int = 24
    num_decoder_layers: int | None = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "gated-gelu"
    dense_act_fn: str | None = None
    is_gated_act: bool | None = None
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    decoder_start_token_id: int = 0
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj: expected 'ACT' or 'gated-ACT', got {self.feed_forward_proj!r}")
        if self.is_gated_act is None:
            self.is_gated_act = parts[0] == "gated"
        if self.dense_act_fn is None:
            self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings

    @classmethod
    def from_dict(cls, d: dict[str, Any] | _Config | None, source: str = "config") -> T5Config:
        if isinstance(d, dict):
            present = {cls.renames.get(k, k) for k in d}
            d = {**{k: v for k, v in cls.file_defaults.items() if k not in present}, **d}
        return super().from_dict(d, source)  # type: ignore[return-value]

    @property
    def hidden_size(self) -> int:
        return self.d_model


_TEXT_CONFIGS: dict[str, type[_Config]] = {"opt": OPTConfig, "t5": T5Config}


@dataclass
class Blip2Config(_Config):
    """The whole model: vision, Q-Former and language-model configs plus the glue."""

    model_type: ClassVar[str] = "blip-2"
    renames: ClassVar[dict[str, str]] = {"image_token_id": "image_token_index"}
    positive: ClassVar[tuple[str, ...]] = ("num_query_tokens", "image_text_hidden_size")

    vision_config: Blip2VisionConfig = field(default_factory=Blip2VisionConfig)
    qformer_config: Blip2QFormerConfig = field(default_factory=Blip2QFormerConfig)
    text_config: OPTConfig | T5Config = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: int | None = 50265
    initializer_factor: float = 1.0
    initializer_range: float = 0.02
    # ITC temperature of retrieval checkpoints; transformers drops it, we keep it when known.
    temperature: float | None = None

    def __post_init__(self) -> None:
        # the Q-Former cross-attends to the image encoder output: its width follows the encoder
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size

    @property
    def image_token_id(self) -> int | None:
        return self.image_token_index

    @property
    def is_encoder_decoder(self) -> bool:
        return self.text_config.is_encoder_decoder

    @property
    def use_decoder_only_language_model(self) -> bool:
        return not self.text_config.is_encoder_decoder

    @classmethod
    def from_vision_qformer_text_configs(
        cls,
        vision_config: Blip2VisionConfig,
        qformer_config: Blip2QFormerConfig,
        text_config: OPTConfig | T5Config | None = None,
        **kwargs: Any,
    ) -> Blip2Config:
        return cls(
            vision_config=copy.deepcopy(vision_config),
            qformer_config=copy.deepcopy(qformer_config),
            text_config=copy.deepcopy(text_config) if text_config is not None else OPTConfig(),
            **kwargs,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | Blip2Config | None, source: str = "config") -> Blip2Config:
        if d is None or isinstance(d, (cls, _Config)):
            return super().from_dict(d, source)  # type: ignore[return-value]
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        if d.get("model_type", "blip-2") not in ("blip-2", "blip_2"):
            raise ConfigError(f"{source}: model_type expected 'blip-2', got {d.get('model_type')!r}")
        vision = Blip2VisionConfig.from_dict(d.pop("vision_config", None), f"{source}: vision_config")
        qformer = Blip2QFormerConfig.from_dict(d.pop("qformer_config", None), f"{source}: qformer_config")
        text_d = d.pop("text_config", None)
        if text_d is None:
            text = OPTConfig()
        else:
            if not isinstance(text_d, dict):
                raise ConfigError(f"{source}: text_config expected a JSON object, got {type(text_d).__name__}")
            mt = text_d.get("model_type", "opt")
            if mt not in _TEXT_CONFIGS:
                raise ConfigError(
                    f"{source}: text_config.model_type {mt!r} is not supported (expected one of {sorted(_TEXT_CONFIGS)})"
                )
            text = _TEXT_CONFIGS[mt].from_dict(text_d, f"{source}: text_config")
        for k in ("use_decoder_only_language_model", "is_encoder_decoder"):
            d.pop(k, None)  # derived from text_config
        cfg: Blip2Config = super().from_dict(d, source)  # type: ignore[assignment]
        cfg.vision_config, cfg.qformer_config, cfg.text_config = vision, qformer, text  # type: ignore[assignment]
        cfg.__post_init__()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("temperature") is None:
            out.pop("temperature", None)
        out["use_decoder_only_language_model"] = self.use_decoder_only_language_model
        out["is_encoder_decoder"] = self.is_encoder_decoder
        return out

    # -- files --------------------------------------------------------------------------------

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Blip2Config:
        return cls.from_dict(read_json(path, ConfigError), source=os.fspath(path))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, **hub_kwargs: Any) -> Blip2Config:
        directory = resolve_dir(path_or_id, **hub_kwargs)
        return cls.from_json_file(os.path.join(directory, CONFIG_FILE))

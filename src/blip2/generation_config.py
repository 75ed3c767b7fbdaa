"""Decoding settings: ``GenerationConfig``, and how one ``generate`` call's settings are resolved.

As in transformers 5, a field left ``None`` is "not set": a call's settings come from its keyword arguments,
then the ``generation_config`` it was given (ours, transformers' ``GenerationConfig`` or a dict), then the
model's ``generation_config``, then transformers' defaults (``DEFAULTS``). ``resolve`` does that and refuses
what blip2 does not implement, naming it, instead of ignoring it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULTS", "GenerationConfig", "resolve"]

GENERATION_CONFIG_NAME = "generation_config.json"

# transformers' values for the fields nobody set
DEFAULTS: dict[str, Any] = {
    "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "length_penalty": 1.0, "early_stopping": False,
    "output_scores": False, "output_logits": False, "return_dict_in_generate": False,
}

# transformers' decoding settings that blip2 does not implement, each with the value that leaves decoding as it
# is (None always does). A config or call that sets one to anything else is refused.
UNSUPPORTED: dict[str, Any] = {
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "top_h": None,
    "diversity_penalty": 0.0, "num_beam_groups": 1, "penalty_alpha": None, "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "guidance_scale": 1.0, "constraints": None,
    "force_words_ids": None, "renormalize_logits": False, "output_attentions": False, "output_hidden_states": False,
    "max_time": None, "stop_strings": None, "token_healing": False, "low_memory": False, "watermarking_config": None,
    "dola_layers": None, "prompt_lookup_num_tokens": None, "assistant_early_exit": None,
}

# transformers' settings for how its own loop runs (caches, compilation, assisted decoding's tuning): they do not
# change the tokens, and blip2's loop has its own, so any value is accepted
RUNTIME_ONLY = frozenset({
    "use_cache", "cache_implementation", "cache_config", "compile_config", "disable_compile", "max_cache_len",
    "prefill_chunk_size", "return_legacy_cache", "is_assistant", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
    "max_matching_ngram_size", "continuous_batching_config", "use_mtp", "speculation_type", "assistant_ensemble_weight",
})

# transformers' generate() arguments for what blip2 does not do (assisted and constrained decoding, several
# processes in step, embeddings instead of ids): refused when given (None and False pass)
REFUSED_ARGUMENTS = ("assistant_model", "prefix_allowed_tokens_fn", "negative_prompt_ids",
                     "negative_prompt_attention_mask", "custom_generate", "inputs_embeds", "decoder_input_ids",
                     "synced_gpus")


@dataclass
class GenerationConfig:
    """Decoding settings, with ``transformers.GenerationConfig``'s field names; ``None``: not set (see the
    module doc). ``seed`` is ours: it seeds sampling's own ``torch.Generator`` (unset: torch's global one,
    as transformers draws).

    ``generation_config.json`` holds the fields that are set, and unknown keys (kept in ``extra``).
    """

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens; 20 new tokens when neither is set
    min_new_tokens: int | None = None
    min_length: int | None = None  # prompt + new tokens
    do_sample: bool | None = None
    num_beams: int | None = None
    num_return_sequences: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    bad_words_ids: list[list[int]] | None = None
    length_penalty: float | None = None
    early_stopping: bool | str | None = None  # True, False or "never"
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    output_scores: bool | None = None
    output_logits: bool | None = None
    return_dict_in_generate: bool | None = None
    seed: int | None = None

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.name != "extra"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationConfig:
        known = cls.names()
        cfg = cls(**{k: v for k, v in d.items() if k in known and v is not None})
        cfg.extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in known and k != "transformers_version"}
        return cfg

    @classmethod
    def from_any(cls, config: Any) -> GenerationConfig:
        """Ours, transformers' ``GenerationConfig`` (anything with ``to_dict()``) or a dict."""
        if isinstance(config, GenerationConfig):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        if callable(getattr(config, "to_dict", None)):
            return cls.from_dict(config.to_dict())
        raise TypeError(f"generation_config: expected a GenerationConfig (blip2's or transformers') or a dict, "
                        f"got {type(config).__name__}")

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.extra)
        out.update({name: copy.deepcopy(getattr(self, name)) for name in sorted(self.names())
                    if getattr(self, name) is not None})
        return out

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with ``changes`` applied."""
        new = dataclasses.replace(self, **changes)
        new.extra = copy.deepcopy(self.extra)
        return new

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GenerationConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GenerationConfig:
        return cls.from_json_file(os.path.join(directory, GENERATION_CONFIG_NAME))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(os.path.join(directory, GENERATION_CONFIG_NAME))


def _validate(cfg: GenerationConfig) -> None:
    """Check the fields that are set (``None`` passes)."""
    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"{name}: expected {expected}, got {getattr(cfg, name)!r}")

    if cfg.early_stopping not in (None, True, False, "never"):
        raise bad("early_stopping", "True, False or 'never'")
    for name in ("num_beams", "num_return_sequences"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise bad(name, "an integer >= 1")
    if cfg.temperature is not None and cfg.temperature <= 0:
        raise bad("temperature", "a number > 0 (do_sample=False for greedy decoding)")
    for name in ("top_k", "no_repeat_ngram_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise bad(name, "an integer >= 0")
    if cfg.top_p is not None and not 0.0 <= cfg.top_p <= 1.0:
        raise bad("top_p", "a number in [0, 1]")
    if cfg.repetition_penalty is not None and cfg.repetition_penalty <= 0:
        raise bad("repetition_penalty", "a number > 0")
    words = cfg.bad_words_ids
    if words is not None and not (isinstance(words, list) and words and all(
            isinstance(w, list) and w and all(isinstance(t, int) and t >= 0 for t in w) for w in words)):
        raise bad("bad_words_ids", "a non-empty list of non-empty lists of token ids")


def _check_extra(extra: dict[str, Any]) -> None:
    """Refuse the transformers settings blip2 does not implement when they would change decoding."""
    used = sorted(k for k, v in extra.items() if k in UNSUPPORTED and v is not None and v != UNSUPPORTED[k])
    if used:
        settings = ", ".join(f"{k}={extra[k]!r}" for k in used)
        raise ValueError(f"generate(): {settings} not supported by blip2 (it would change the tokens, so it is "
                         f"refused rather than ignored; generate(..., {used[0]}=None) drops a value that a "
                         "generation config set); see docs/TRANSFORMERS.md for the supported settings")


def resolve(model_config: GenerationConfig, generation_config: Any = None,
            kwargs: dict[str, Any] | None = None) -> GenerationConfig:
    """One call's settings, every field of ``DEFAULTS`` filled: ``kwargs`` over ``generation_config`` over
    ``model_config`` over the defaults. Unknown keyword arguments raise TypeError; settings blip2 does not
    implement, set to change decoding, raise ValueError."""
    kwargs = dict(kwargs or {})
    for name in REFUSED_ARGUMENTS:
        if kwargs.pop(name, None) not in (None, False):
            raise TypeError(f"generate(): {name} is not supported by blip2")
    kwargs.pop("tokenizer", None)  # transformers reads it for stop_strings only, which are refused
    unknown = sorted(set(kwargs) - GenerationConfig.names() - set(UNSUPPORTED) - RUNTIME_ONLY)
    if unknown:
        raise TypeError(f"generate() got unknown options {unknown}; see blip2.GenerationConfig for the names")
    layers = [model_config.to_dict()]
    if generation_config is not None:
        layers.append(GenerationConfig.from_any(generation_config).to_dict())
    layers.append(kwargs)
    merged: dict[str, Any] = dict(DEFAULTS)
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    for name in UNSUPPORTED.keys() & {k for k, v in kwargs.items() if v is None}:
        merged.pop(name, None)  # an unsupported setting from a config, dropped on purpose by this call
    cfg = GenerationConfig.from_dict(merged)
    _check_extra(cfg.extra)
    return cfg

"""The arguments of ``from_pretrained``: transformers' names, checked before anything is read.

Each argument either does what it does in transformers, or is refused with an error that names it and says
why (docs/TRANSFORMERS.md lists them). ``LoadOptions.parse(kwargs)`` is the one place they are read.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ATTN_IMPLEMENTATIONS", "LoadOptions", "check_flash_attention", "config_dtype"]

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")

# accepted and without effect here, each for its reason (docs/TRANSFORMERS.md)
_NO_EFFECT = {
    "low_cpu_mem_usage": "loading always assigns the read tensors to a model built on the meta device",
    "trust_remote_code": "blip2 runs no code from a checkpoint",
    "resume_download": "huggingface_hub always resumes",
    "_fast_init": "nothing is initialised before the weights are assigned",
}
# refused, each with its reason
_REFUSED = {
    "offload_folder": "blip2 does not offload weights to disk; use device_map='cpu' or a quantization_config",
    "offload_state_dict": "blip2 does not offload weights to disk",
    "offload_buffers": "blip2 does not offload weights to disk",
    "ignore_mismatched_sizes": "a tensor whose shape differs from the config's is an error, never re-initialised",
    "from_tf": "only PyTorch and safetensors weights are read",
    "from_flax": "only PyTorch and safetensors weights are read",
    "gguf_file": "only PyTorch and safetensors weights are read",
    "tp_plan": "tensor parallelism is not supported; device_map splits the language model's layers",
    "key_mapping": "state-dict keys are the reference's and are never renamed",
    "proxies": "set HTTP(S)_PROXY for huggingface_hub instead",
    "config": "the config is read from the checkpoint's config.json",
}


@dataclass
class LoadOptions:
    """What ``from_pretrained`` was asked for, checked."""

    dtype: torch.dtype | str | None = None  # "auto": the checkpoint's (config_dtype)
    device: Any = None  # blip2's own: one device for the whole model
    device_map: Any = None
    max_memory: dict[Any, Any] | None = None
    quantization_config: Any = None
    attn_implementation: str | None = None
    hub: dict[str, Any] = field(default_factory=dict)  # revision, cache_dir, token, local_files_only, force_download
    subfolder: str = ""
    variant: str | None = None
    use_safetensors: bool | None = None

    @classmethod
    def parse(cls, kwargs: dict[str, Any]) -> LoadOptions:
        kw = dict(kwargs)
        opts = cls(subfolder=kw.pop("subfolder", "") or "", variant=kw.pop("variant", None),
                   use_safetensors=kw.pop("use_safetensors", None), max_memory=kw.pop("max_memory", None),
                   device=kw.pop("device", None), device_map=kw.pop("device_map", None))
        opts.dtype = _one_of(kw, "dtype", "torch_dtype")
        opts.quantization_config = _quantization(kw)
        opts.attn_implementation = _attn_implementation(kw.pop("attn_implementation", None))
        opts.hub = {k: kw.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only", "force_download")
                    if k in kw}
        if "use_auth_token" in kw:  # transformers' old name for token
            opts.hub.setdefault("token", kw.pop("use_auth_token"))
        for name in _NO_EFFECT:
            kw.pop(name, None)
        for name, why in _REFUSED.items():
            if kw.get(name) not in (None, False):
                raise TypeError(f"from_pretrained(): {name} is not supported: {why}")
            kw.pop(name, None)
        if kw:
            raise TypeError(f"from_pretrained() got unexpected arguments {sorted(kw)}; the accepted ones are "
                            f"listed in docs/TRANSFORMERS.md (config fields cannot be overridden here: load, "
                            f"then change model.config)")
        if opts.device is not None and opts.device_map is not None:
            raise TypeError("from_pretrained(): give device or device_map, not both")
        if opts.variant is not None and not isinstance(opts.variant, str):
            raise TypeError(f"from_pretrained(): variant expected a string such as 'fp16', got {opts.variant!r}")
        return opts


def _one_of(kw: dict[str, Any], name: str, alias: str) -> Any:
    a, b = kw.pop(name, None), kw.pop(alias, None)
    if a is not None and b is not None and a != b:
        raise TypeError(f"from_pretrained(): {name}={a!r} and {alias}={b!r} disagree; give one")
    return a if a is not None else b


def _quantization(kw: dict[str, Any]) -> Any:
    """``quantization_config``, or the one transformers' older ``load_in_8bit`` / ``load_in_4bit`` stand for."""
    config = kw.pop("quantization_config", None)
    flags = {k: kw.pop(k) for k in ("load_in_8bit", "load_in_4bit") if kw.get(k)}
    if flags and config is not None:
        raise TypeError(f"from_pretrained(): give quantization_config or {', '.join(flags)}, not both")
    if len(flags) > 1:
        raise TypeError("from_pretrained(): load_in_8bit and load_in_4bit exclude each other")
    kw.pop("load_in_8bit", None), kw.pop("load_in_4bit", None)
    return {"quant_method": "bitsandbytes", **flags} if flags else config


def _attn_implementation(name: str | None) -> str | None:
    """Every name gives the same attention (PyTorch's scaled_dot_product_attention, which picks its flash
    kernel on CUDA in fp16/bf16 by itself; explicit weights when output_attentions asks for them)."""
    if name is None:
        return None
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={name!r}: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError("attn_implementation='flash_attention_2' needs the flash-attn package, which is not "
                          "installed; 'sdpa' (the default) uses PyTorch's own flash kernel on CUDA in fp16/bf16")
    return name


def check_flash_attention(name: str | None, device: torch.device, dtype: torch.dtype | None) -> None:
    """flash_attention_2 runs on CUDA in fp16/bf16 only, as in transformers."""
    if name != "flash_attention_2":
        return
    if device.type != "cuda":
        raise ValueError(f"attn_implementation='flash_attention_2' runs on CUDA only; the model goes to {device} "
                         f"(use 'sdpa')")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attn_implementation='flash_attention_2' needs dtype float16 or bfloat16, got {dtype}")


def config_dtype(raw: dict[str, Any]) -> str | None:
    """The dtype a checkpoint's config.json names (transformers 5 writes ``dtype``, 4.x ``torch_dtype``), the
    language model's where the top level has none; None where it names none."""
    for d in (raw, raw.get("text_config") or {}):
        name = d.get("dtype") or d.get("torch_dtype")
        if isinstance(name, str):
            return name.removeprefix("torch.")
    return None

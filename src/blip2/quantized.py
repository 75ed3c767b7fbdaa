"""``from_pretrained(quantization_config=...)``: the language model's linear layers quantized at load time, from
outside the model files, as transformers does.

- bitsandbytes (``BitsAndBytesConfig`` or a dict with ``load_in_8bit`` / ``load_in_4bit``; transformers'
  ``load_in_8bit=True`` too), on CUDA: each ``nn.Linear`` of the language model but its head becomes a
  ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8(), outliers above ``llm_int8_threshold`` in fp16) or ``Linear4bit``
  (``bnb_4bit_quant_type`` "nf4" or "fp4", ``bnb_4bit_compute_dtype``, ``bnb_4bit_use_double_quant``); the
  weights are quantized as they move to the GPU.
- torchao (``TorchAoConfig`` or a dict): weight-only int8 (any device) or int4 (CUDA) through
  ``torchao.quantization.quantize_``.

Where CUDA or the library is missing, ``QuantizationError`` says what is, and names the CPU alternative:
``blip2.fast.apply(model, "int8")``. The vision encoder and the Q-Former (small, kept in fp32) are not quantized.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["QuantizationError", "QuantizationSpec", "parse_quantization_config", "quantize_language_model"]

CPU_ALTERNATIVE = 'on CPU, blip2.fast.apply(model, "int8") quantizes the language model to int8 instead'
_TORCHAO_TYPES = {"int8_weight_only": "int8", "Int8WeightOnlyConfig": "int8",
                  "int4_weight_only": "int4", "Int4WeightOnlyConfig": "int4"}


class QuantizationError(ValueError):
    """A quantization_config that cannot apply here: names what is missing or wrong."""


@dataclass(frozen=True)
class QuantizationSpec:
    method: str  # "bitsandbytes" or "torchao"
    bits: int  # 8 or 4
    quant_type: str = "nf4"  # bitsandbytes 4-bit: "nf4" or "fp4"
    compute_dtype: torch.dtype | None = None  # bitsandbytes 4-bit: the dtype products run in
    double_quant: bool = False  # bitsandbytes 4-bit: quantize the quantization constants too
    threshold: float = 6.0  # bitsandbytes 8-bit: LLM.int8() outlier threshold
    skip: tuple[str, ...] = ("lm_head",)  # module names left in floating point
    source: Any = None  # what the user gave (kept on the model as quantization_config)
    torchao_config: Any = None  # torchao: the user's config object, applied as given (group size, packing...)


_FIELDS = ("quant_method", "quant_type", "load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type",
           "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "llm_int8_threshold", "llm_int8_skip_modules",
           "llm_int8_has_fp16_weight", "llm_int8_enable_fp32_cpu_offload")


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "quant_method"):  # transformers' config objects: the attributes they document
        return {k: getattr(config, k, None) for k in _FIELDS}
    raise QuantizationError(f"quantization_config: expected transformers' BitsAndBytesConfig or TorchAoConfig, "
                            f"or a dict, got {type(config).__name__}")


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise QuantizationError(f"quantization_config: bnb_4bit_compute_dtype {value!r} is not a torch dtype")
    return getattr(torch, name)


def parse_quantization_config(config: Any) -> QuantizationSpec:
    """transformers' config object or its dict -> what to do; unknown methods and options are errors."""
    d = _as_dict(config)
    method = str(getattr(d.get("quant_method"), "value", d.get("quant_method")) or "bitsandbytes")
    if method == "torchao":
        kind = d.get("quant_type")
        name = kind if isinstance(kind, str) else type(kind).__name__
        if name not in _TORCHAO_TYPES:
            raise QuantizationError(f"quantization_config: torchao quant_type {name!r} is not supported "
                                    f"(expected int8_weight_only or int4_weight_only, or their config objects)")
        bits = 8 if _TORCHAO_TYPES[name] == "int8" else 4
        given = None if isinstance(kind, str) else kind  # a config object: its options (group size...) apply
        return QuantizationSpec("torchao", bits, source=config, torchao_config=given)
    if method != "bitsandbytes":
        raise QuantizationError(f"quantization_config: quant_method {method!r} is not supported "
                                f"(expected bitsandbytes or torchao)")
    eight, four = bool(d.get("load_in_8bit")), bool(d.get("load_in_4bit"))
    if eight == four:
        raise QuantizationError("quantization_config: set exactly one of load_in_8bit and load_in_4bit")
    if d.get("llm_int8_has_fp16_weight") or d.get("llm_int8_enable_fp32_cpu_offload"):
        raise QuantizationError("quantization_config: llm_int8_has_fp16_weight and llm_int8_enable_fp32_cpu_offload "
                                "are not supported")
    quant_type = d.get("bnb_4bit_quant_type") or "fp4"  # transformers' default
    if quant_type not in ("nf4", "fp4"):
        raise QuantizationError(f"quantization_config: bnb_4bit_quant_type expected nf4 or fp4, got {quant_type!r}")
    skip = tuple(d.get("llm_int8_skip_modules") or ("lm_head",))
    return QuantizationSpec("bitsandbytes", 8 if eight else 4, quant_type, _dtype(d.get("bnb_4bit_compute_dtype")),
                            bool(d.get("bnb_4bit_use_double_quant")), float(d.get("llm_int8_threshold") or 6.0),
                            skip, config)


def check_available(spec: QuantizationSpec, device: torch.device) -> None:
    """Raise ``QuantizationError`` naming what is missing (CUDA, the library) before anything is loaded."""
    library = "bitsandbytes" if spec.method == "bitsandbytes" else "torchao"
    needs_cuda = spec.method == "bitsandbytes" or spec.bits == 4
    missing = []
    if needs_cuda and device.type != "cuda":
        where = "this machine has no CUDA device" if not torch.cuda.is_available() else f"the model goes to {device}"
        missing.append(f"a CUDA device ({where}; pass device_map='auto' or 'cuda')")
    if importlib.util.find_spec(library) is None:
        missing.append(f"the {library} package (pip install {library})")
    if missing:
        what = f"{spec.bits}-bit {library} quantization"
        raise QuantizationError(f"quantization_config: {what} needs {' and '.join(missing)}; {CPU_ALTERNATIVE}")


def _targets(lm: nn.Module, skip: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every plain nn.Linear of ``lm`` not named in ``skip``."""
    out = []
    for name, module in lm.named_modules():
        if type(module) is nn.Linear and not any(name == s or name.endswith("." + s) or name.startswith(s + ".")
                                                 for s in skip):
            owner, _, leaf = name.rpartition(".")
            out.append((lm.get_submodule(owner), leaf, module))
    return out


def _bnb_linear(layer: nn.Linear, spec: QuantizationSpec) -> nn.Module:
    import bitsandbytes as bnb

    has_bias = layer.bias is not None
    if spec.bits == 8:
        new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=has_bias, has_fp16_weights=False,
                                  threshold=spec.threshold)
        new.weight = bnb.nn.Int8Params(layer.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=has_bias,
                                compute_dtype=spec.compute_dtype or layer.weight.dtype,
                                compress_statistics=spec.double_quant, quant_type=spec.quant_type)
        new.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type=spec.quant_type,
                                       compress_statistics=spec.double_quant)
    if has_bias:
        new.bias = nn.Parameter(layer.bias.data, requires_grad=False)
    return new


def quantize_language_model(model: nn.Module, spec: QuantizationSpec, device: torch.device) -> None:
    """Quantize ``model.language_model``'s linear layers (its head and ``spec.skip`` left out) for ``device``,
    in place. bitsandbytes quantizes as the layers move to ``device``; so call it on a model still on the CPU."""
    lm = getattr(model, "language_model", None)
    if lm is None:
        raise QuantizationError(f"quantization_config: {type(model).__name__} has no language model to quantize")
    targets = _targets(lm, spec.skip)
    if spec.method == "bitsandbytes":
        for parent, leaf, layer in targets:
            setattr(parent, leaf, _bnb_linear(layer, spec).to(device))
    else:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        chosen = {id(layer) for _, _, layer in targets}
        lm.to(device)
        how = spec.torchao_config if spec.torchao_config is not None else (
            Int8WeightOnlyConfig() if spec.bits == 8 else Int4WeightOnlyConfig())
        quantize_(lm, how, filter_fn=lambda m, _name: id(m) in chosen)
    model.quantization_config = spec.source

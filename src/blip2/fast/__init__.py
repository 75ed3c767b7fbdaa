"""Speed-ups, applied to a loaded model from outside: ``blip2.fast.apply(model, mode)``.

    from blip2 import Blip2ForConditionalGeneration, fast
    model = fast.apply(Blip2ForConditionalGeneration.from_pretrained(path), "native")

Modes (``MODES``; the commands' ``--fast``), each giving the plain model's tokens unless it says otherwise:
- ``"none"``: the model as loaded.
- ``"auto"``: the fastest exact mode this machine runs: ``"native"`` on a CPU where the kernels build (the
  vision encoder and Q-Former left as loaded, their fp32 products routed through oneDNN where that pays: see
  ``native`` and ``route``), ``"cuda-graph"`` on a GPU, else ``"fuse"``; the model unchanged where none
  applies (a PEFT adapter, weights quantized at load, a model split over devices, no language model).
- ``"fuse"``: the language model's projections that read one input in one product, every linear layer in
  the fastest weight layout for the device (on CPU: blip2's blocked layout for the language model where the
  native kernels build, oneDNN's for the vision encoder and Q-Former).
- ``"int8"``: ``"fuse"`` with the language model's weights in int8 (one scale per output channel); most
  tokens the same.
- ``"int8-dynamic"`` (CPU): int8 products in the language model and the vision encoder, each input rounded to
  8 bits as it comes; most tokens the same.
- ``"native"`` (CPU): the whole language-model decoder in one C++ call per token, for every row
  (``blip2.fast.native``), and a greedy head that screens the vocabulary in bf16; nothing compiled.
- ``"compile"``: the one-token step compiled with ``torch.compile`` for ``batch`` rows (on CPU the native step
  stands in front where it covers the model: ``compile_decoding(native=False)`` keeps the compiled one).
- ``"cuda-graph"`` (CUDA): ``"fuse"``, and the step replayed as a CUDA graph.

Modes combine where it makes sense: ``apply(model, "int8")`` then ``apply(model, "compile", batch=8)``.
``from_pretrained(...).generate()`` applies ``"auto"`` by itself (at the first call; on a CPU, for a large language
model, one row a call decodes natively on the weights as loaded and several rows lay out at the second such call),
undone by anything that needs the plain modules (``blip2.fast.lazy``). Where
the language model is laid out in blocks, the layout of a checkpoint is written to disk once and mapped by later
loads (``blip2.fast.layout_cache``). A model given a mode here is for inference: it cannot be cast, moved or
reloaded until ``unfuse(model)``; its state dict keeps the reference keys, so ``save_pretrained`` writes a normal
checkpoint. Where a mode cannot apply (device, dtype, kernels not built) it raises ``Unsupported`` (a
``ValueError``) saying why, before changing anything. The measured speeds are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from blip2.fast import attention, layout_cache, onednn
from blip2.fast.decoding import (BlockedEmbedding, LanguageModel, compile_step, fuse_language_model, lay_out_for,
                                table, unfuse_language_model)
from blip2.fast.graphs import graph_step
from blip2.fast.linear import (INT8_FORMATS, FusedLinear, default_format, fused_format, pack_linears,
                              unfuse_linears, walk)
from blip2.fast.native import NativeOPTStep, NativeT5Step, Unsupported, check, try_native
from blip2.models.opt import OPTForCausalLM

__all__ = ["MODES", "Unsupported", "apply", "compile_decoding", "cuda_graph", "fuse", "held_bytes", "native",
           "native_as_loaded", "quantize_int8", "route", "unfuse"]

MODES = ("none", "auto", "fuse", "int8", "int8-dynamic", "native", "compile", "cuda-graph")


def apply(model: nn.Module, mode: str, batch: int = 1, **compile_kwargs: Any) -> nn.Module:
    """``model`` (a ``Blip2ForConditionalGeneration``/``Blip2Model``, or its language model alone) with the
    speed-up ``mode`` (one of ``MODES``); ``batch`` and ``compile_kwargs`` for "compile". Returns the model."""
    if mode not in MODES:
        raise ValueError(f"fast mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "none":
        return model
    with layout_cache.laying_out(model, mode):  # a checkpoint's blocked layout mapped from disk, or written there
        return _apply(model, mode, batch, **compile_kwargs)


def _apply(model: nn.Module, mode: str, batch: int, **compile_kwargs: Any) -> nn.Module:
    auto = mode == "auto"
    if auto:
        try:
            mode = _fastest_exact(_language_model(model))
        except Unsupported:  # no speed-up applies (adapters, quantized at load, split, no language model)
            return model
    lm = _language_model(model)  # a model the speed-ups do not cover is refused before anything changes
    if mode == "fuse":
        return fuse(model)
    if mode in ("int8", "int8-dynamic"):
        dynamic = mode == "int8-dynamic"
        return quantize_int8(model, vision=dynamic, dynamic=dynamic)
    if mode == "native":
        return native(model, towers=not auto)
    if mode == "compile":
        return compile_decoding(model, batch, **compile_kwargs)
    if table(lm).device.type != "cuda":
        raise Unsupported(f"CUDA graphs need a CUDA device; the model is on {table(lm).device}")
    if fused_format(lm) is None:
        fuse(model)
    return cuda_graph(model)


def _fastest_exact(lm: LanguageModel) -> str:
    weight = table(lm)
    if weight.device.type == "cuda":
        return "cuda-graph"
    try:
        check(weight)
    except Unsupported:
        return "fuse"
    return "native"


def _refuse_foreign_layers(model: nn.Module) -> None:
    """The speed-ups rewrite nn.Linear layers they know; layers they do not (PEFT adapters, bitsandbytes or
    torchao weights) and models split over devices are refused here, before anything changes, rather than
    silently dropped."""
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "merge"):  # peft's tuner layers (LoRA, ...)
            raise Unsupported(f"{name} carries a PEFT adapter, which the speed-ups would drop; merge it into the "
                              f"weights first (model = model.merge_and_unload()), then apply the speed-up")
        if type(module).__module__.startswith("bitsandbytes") or any(
                type(p).__module__.startswith("torchao") for p in module.parameters(recurse=False)):
            raise Unsupported(f"{name} is quantized at load time (quantization_config), which the speed-ups do not "
                              f"read; load without quantization_config to use blip2.fast")
    if len(set(getattr(model, "hf_device_map", {"": None}).values())) > 1:
        raise Unsupported("the model is split over several devices (device_map); the speed-ups run on one device")


def _language_model(model: nn.Module) -> LanguageModel:
    _refuse_foreign_layers(model)
    lm = getattr(model, "language_model", model)
    if not isinstance(lm, LanguageModel):
        raise Unsupported(f"{type(model).__name__} has no language model to speed up (only the generation "
                          f"models do)")
    return lm


def _towers(model: nn.Module) -> list[nn.Module]:
    """The vision encoder and Q-Former of a BLIP-2 model (none for a language model alone)."""
    return [model.vision_model, model.qformer] if hasattr(model, "language_model") else []


def _pack(tower: nn.Module, fmt: str | None = None) -> None:
    pack_linears(tower, fmt or default_format(next(tower.parameters())))


def fuse(model: nn.Module, fmt: str | None = None) -> nn.Module:
    """The language model fused (``fuse_language_model``: its format ``fmt``, by default the fastest for decoding
    on the device), the vision encoder and Q-Former packed in the fastest layout for their many rows."""
    fuse_language_model(_language_model(model), fmt)
    for tower in _towers(model):
        _pack(tower)
    return model


def quantize_int8(model: nn.Module, vision: bool = False, dynamic: bool = False) -> nn.Module:
    """``fuse`` with the language model's weights in int8 (one scale per output channel). The Q-Former (small,
    kept fp32) is never quantized; ``save_pretrained`` writes dequantized weights under the reference keys.

    ``dynamic=False`` (weight-only): activations stay float and the weights are widened as they are read,
    which pays where decoding is bound by weight bytes. ``dynamic=True`` (CPU): each product's input is
    rounded to 8 bits as it is computed and the product runs on the CPU's integer units, which pays where
    products are bound by arithmetic (a prefill, several images, the vision encoder). ``vision``: the vision
    encoder in int8 too (with ``dynamic=False`` less memory, but slower on CPU)."""
    fmt = "int8-dynamic" if dynamic else "int8"
    fuse_language_model(_language_model(model), fmt)
    for tower in _towers(model):
        _pack(tower, fmt if vision and tower is model.vision_model else None)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Undo every speed-up: plain ``nn.Linear`` layers with parameters (int8 weights stay rounded), the eager
    step, the model's own attention."""
    unfuse_language_model(_language_model(model))
    for tower in _towers(model):
        unfuse_linears(tower)
    onednn.unroute(model)  # after the layers a fused layout kept are back in the model
    attention.unroute(model)
    return model


def route(model: nn.Module, auto: bool = False) -> nn.Module:
    """CPU, for what runs as loaded, on its own weights (nothing copied): the fp32 products of every plain
    linear layer of ``model`` (but the smallest: ``onednn.MIN_WEIGHTS``) through oneDNN (``blip2.fast.onednn``:
    on an AMD CPU 1.1-2x torch's fp32 products), and the vision encoder's bf16 self-attention through the
    native kernel (``blip2.fast.attention``: 1.9x torch's); ``auto``: each only where it pays (``onednn.pays``,
    ``attention.pays``), as ``"auto"`` routes. Any module will do (a vision encoder, a retrieval model). Undone
    by ``unfuse``. Raises ``Unsupported`` for a model the speed-ups do not cover (adapters, weights quantized
    at load, split over devices), before changing anything."""
    _refuse_foreign_layers(model)
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cpu":
        onednn.route(model, auto)
        attention.route(model, auto)
    return model


def _native_step_class(lm: LanguageModel) -> type[NativeOPTStep] | type[NativeT5Step]:
    return NativeOPTStep if isinstance(lm, OPTForCausalLM) else NativeT5Step


def compile_decoding(model: nn.Module, batch: int = 1, native: bool = True, **compile_kwargs: Any) -> nn.Module:
    """The language model's one-token step compiled with ``torch.compile(**compile_kwargs)``, with the weights
    laid out for ``batch`` rows (images x beams; ``decoding.compile_format``). Shapes are static within a
    ``generate`` call, so it compiles once per batch size and length. Combines with ``quantize_int8`` (call
    it first). ``native`` (CPU): a step runs as one native call where ``blip2.fast.native`` covers the model,
    the compiled step otherwise; False: always the compiled step."""
    lm = _language_model(model)
    lay_out_for(lm, batch)
    step = compile_step(lm._decode_step, table(lm).device, **compile_kwargs)
    lm.decode_step = (native and try_native(_native_step_class(lm), lm, step)) or step
    return model


def native(model: nn.Module, towers: bool = True) -> nn.Module:
    """CPU: decode with the native step (``blip2.fast.native``: the whole decoder in one C++ call per token,
    for all rows); nothing is compiled. The language model is laid out for any number of rows (blocked where
    the kernels take the dtype; int8 stays int8: one row natively, several with the eager step), and with
    ``towers`` the vision encoder and Q-Former packed as ``fuse`` packs them (the vision encoder's bf16 attention
    through the native kernel where that pays: ``blip2.fast.attention``). ``"auto"`` leaves them as loaded,
    routed where that pays (``route``): at blip2-opt-2.7b's size packing them costs about 4 s of the first call
    (a copy of 4 GB) and on an AVX2 CPU their calls ran no faster packed (docs/BENCHMARKS.md, "Real size"). Raises
    ``Unsupported`` saying why where the native steps do not cover the model (GPU, fp16, kernels not built),
    before changing anything."""
    lm = _language_model(model)
    check(table(lm))  # before changing the layout
    lay_out_for(lm, None)
    lm.decode_step = _native_step_class(lm)(lm, lm._decode_step)
    for tower in _towers(model):
        if not towers:
            route(tower, auto=True)
        else:
            if fused_format(tower) is None:
                _pack(tower)
            attention.route(tower, auto=True)  # packing leaves the attention itself as it is
    return model


def native_as_loaded(model: nn.Module) -> nn.Module:
    """CPU: decode one row at a time with the native step over the language model's weights as they are (not
    fused, nothing copied or laid out: q/k/v read apart), several rows with the eager step, and the greedy head
    unscreened (its screen is a copy of half the head), and every plain linear layer routed where that pays
    (``route``: the prefill's and the vision encoder's fp32 products). For a call that should not pay for a
    layout: a large model's ``generate`` of one row (``blip2.fast.lazy``), whose weights are still the
    checkpoint's pages. Raises
    ``Unsupported`` where the native step does not cover the model as it is (GPU, fp16, a fused layout)."""
    lm = _language_model(model)
    check(table(lm))
    if fused_format(lm) is not None or lm.decode_step != lm._decode_step:
        raise Unsupported("the language model is laid out already")
    lm.decode_step = _native_step_class(lm)(lm, lm._decode_step, screen=False)
    route(model, auto=True)
    return model


def cuda_graph(model: nn.Module) -> nn.Module:
    """On a GPU, replay the language model's one-token step (eager, or compiled before) as a CUDA graph: one
    launch instead of hundreds of small kernels per token (``blip2.fast.graphs``). A graph is recorded at the
    first step of each ``generate`` call. Fusing, unfusing and compiling put the plain step back."""
    lm = _language_model(model)
    lm.decode_step = graph_step(lm.decode_step, table(lm).device)
    return model


def held_bytes(module: nn.Module) -> int:
    """The bytes of the weights ``module`` holds, each counted in the plain layout of the dtype it is laid out in
    (a fused layer its layers' weights, a matrix tied to a head once; an int8 layer its int8 weights, or their
    packing, its scales and bias), found without the walks that undo a layout made by ``blip2.fast.lazy``: what a
    model weighs whatever its layout, the measure of its memory ratios."""
    sizes: dict[int, int] = {}
    for m in walk(module):
        if isinstance(m, FusedLinear):
            if m.fmt in INT8_FORMATS:  # (a tied head's int8 copy included: a copy, beside the embedding's matrix)
                sizes[id(m)] = m.packed_bytes + sum(t.numel() * t.element_size() for t in (m.w, m.scale, m.b)
                                                    if t is not None)
            elif not m.tied:  # (a tied head's copy: the embedding counts the matrix)
                sizes[id(m)] = (m.out_features * m.in_features + m.out_features * (m.b is not None)) * m.dtype.itemsize
            continue
        sizes.update((id(t), t.numel() * t.element_size()) for t in (*m._parameters.values(), *m._buffers.values())
                     if t is not None)
        if isinstance(m, BlockedEmbedding):  # (its parameter is empty: the head's copy holds the matrix)
            p = m._parameters["weight"]
            sizes[id(p)] = m.num_embeddings * m.embedding_dim * p.element_size()
    return sum(sizes.values())

"""Fast by default: ``from_pretrained(...).generate()`` runs the fastest exact path (``apply(model, "auto")``)
without being asked, and the model stays an ordinary ``nn.Module`` for everything else.

The speed-ups lay weights out for inference (fused projections, packed layouts held as buffers), which training,
moving, casting, reloading and adapters cannot use. So the default waits for the first ``generate`` of a model
in eval mode, and undoes itself the moment anything reaches for the plain modules. ``model.fast`` is the mode:
"auto" after ``from_pretrained`` (its ``fast`` argument: "none" keeps the model as written, any other mode of
``blip2.fast.MODES`` is applied at load, as ``blip2.fast.apply`` does), "none" for a model built in code.

When: at the first ``generate``, except on a CPU for a language model of more than ``LATER_BYTES``. There a
``generate`` that decodes one row (one image, one sequence) runs the native step on the checkpoint's own weights
(``blip2.fast.native_as_loaded``: nothing copied, q/k/v read apart), at every such call: one row reads each weight
once a token in any layout (blip2-opt-2.7b in bf16 on a 2-core VM: 11 tokens in 1.0-1.1 s on either), so laying
out would fill fresh memory (5.3 GB, 4-8 s; 10.6 GB and 9-10 s in fp32) for nothing, and the first call takes 3.9 s
against 6.5-7.0 s with the eager step. A ``generate`` of several rows (images, beams, returned sequences) needs the
layout, which reads each weight once for all rows: the first runs as loaded (eagerly), the next lays out, or maps
the layout from the cache (``blip2.fast.layout_cache``), since laying out costs about a call, which a process that
captions once never gets back. A cached layout is mapped at the first such ``generate`` where the memory can keep
it cached beside the checkpoint (``layout_cache.mappable``: blip2-opt-2.7b in bf16, 7.5 + 5.3 GB); where it cannot,
mapping it reads the disk (fp32 on a 23 GB VM: a first call of 13-19 s, 40-43 s after a reboot, against 10 s and
24-27 s as loaded). Each later call runs laid out, one row included. What runs as loaded (the vision encoder and
Q-Former always; the language model's prefill, and its eager steps of several rows) multiplies its fp32 weights
through oneDNN where that pays, and the vision encoder its bf16 attention through the native kernel
(``blip2.fast.route``: class swaps, nothing copied; a routed module records gradients through the model's own
code, so a first call's routing needs no guard). ``lay_out(model)`` lays it out at once (a server, before its
first request). A load that converts such a language model to another dtype (the published fp32 checkpoints in
bf16, before a converted copy is cached: ``blip2.converted``) lays it out at once (``deferred``): converting fills
fresh memory with its weights and laying out fills it again, so each weight goes from the file's pages straight
into the layout, converted piece by piece (``linear.LAY_OUT_DTYPE``), and every call runs laid out.

What undoes it, on the model or on one of its three parts (vision encoder, Q-Former, language model):
``train()``, every move or cast (``to``, ``cuda``, ``half``, ...), ``load_state_dict``, ``parameters``,
``named_parameters``, ``modules``, ``named_modules``, ``children``, ``named_children`` (an optimizer, PEFT, a
freezing loop), ``requires_grad_``, ``apply``, a forward pass that records gradients, pickling and copying,
``get_output_embeddings`` and what sets or resizes the embeddings or the head. ``get_input_embeddings`` does
not (generate looks tokens up through it): where a tied OPT head's blocked copy holds the table, reading its
``weight`` brings the plain matrix back (``decoding.BlockedEmbedding``).
Undoing hands back the very ``nn.Linear`` modules and ``nn.Parameter`` objects the model had (``FusedLinear``
keeps them, their storage released while fused), so an optimizer built before a ``generate`` still trains the
model; the next ``generate`` in eval mode lays the weights out again. ``state_dict`` and ``save_pretrained`` need
no undoing (they write the reference keys). Reaching past the parts into a deeper module
(``model.qformer.encoder.layer[0].parameters()``) finds the inference layout: call ``blip2.fast.unfuse(model)``
first, or load with ``fast="none"``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from blip2.fast import (MODES, Unsupported, apply, held_bytes, kernels, layout_cache, native, native_as_loaded, route,
                        unfuse)
from blip2.fast.decoding import LanguageModel, table
from blip2.fast.linear import LAY_OUT_DTYPE, FusedLinear, walk
from blip2.mapped import convert
from blip2.models.blip2 import Blip2Model
from blip2.models.opt import OPTForCausalLM

__all__ = ["LATER_BYTES", "before_generate", "deferred", "lay_out", "laid_out", "loaded", "release"]

# a CPU language model of more weight bytes than this decodes one row on its weights as loaded, and is laid out at
# its second generate of several rows, not its first
LATER_BYTES = 1 << 30

# what reaches for the plain modules; ``train`` and ``forward`` only in some calls (below)
_RELEASING = ("_apply", "load_state_dict", "parameters", "named_parameters", "modules", "named_modules", "children",
              "named_children", "requires_grad_", "apply", "__reduce_ex__",  # pickle, copy, deepcopy
              # the head and the vocabulary (where the class has them): a laid-out head has no ``weight``
              "get_output_embeddings", "set_input_embeddings", "set_output_embeddings", "tie_weights",
              "resize_token_embeddings")
log = logging.getLogger("blip2.fast.lazy")
_lock = threading.Lock()  # one layout at a time: two threads' first generate must not both lay a model out
_guarded_classes: dict[type, type] = {}


def deferred(model: nn.Module, dtype: torch.dtype | None) -> Callable[[str], bool] | None:
    """For ``from_pretrained(fast="auto")`` onto the CPU (``model`` on the meta device): the keys of the language
    model's linear weights, which a load converting them to ``dtype`` leaves in the files' dtype, for ``loaded``
    to lay out at once, converted straight into the layout; None where it would not lay them out (no language
    model, at most ``LATER_BYTES``, no blocked kernels for ``dtype``). Converting fills fresh memory with the
    weights, and so does laying them out, which costs as much again (blip2-opt-2.7b in bf16: 5.3 GB, 4-8 s on
    a 2-core VM): once converted, several rows a call would run their first call eagerly and fill it twice.
    OPT's embedding table, where the head is tied to it, is laid out too: the head's blocked copy holds it
    (``decoding.BlockedEmbedding``); T5's native step reads its table plain, which is converted at load."""
    lm = getattr(model, "language_model", None)
    if dtype is None or not isinstance(lm, LanguageModel):
        return None
    size = sum(p.numel() for p in {id(p): p for p in lm.parameters()}.values()) * dtype.itemsize
    if size <= LATER_BYTES or not kernels.load() or not kernels.blocked_supports(dtype):
        return None
    embedding = lm.get_input_embeddings().weight
    holds = isinstance(lm, OPTForCausalLM)  # whether a tied head's copy holds the table
    keys = {f"language_model.{name}.weight" for name, m in nn.Module.named_modules(lm)
            if isinstance(m, nn.Linear) and (holds or m.weight is not embedding)}
    if holds and lm.lm_head.weight is embedding:
        keys.add("language_model.model.decoder.embed_tokens.weight")
    return keys.__contains__


def loaded(model: Blip2Model) -> None:
    """After ``from_pretrained``: lay out a language model its load left in the files' dtype (``deferred``),
    check ``model.fast``, and apply an explicit mode now (its errors at load)."""
    later = model.__dict__.pop("_deferred", None)
    if later:
        _lay_out_at_load(model, later)
    if model.fast not in MODES:
        raise ValueError(f"from_pretrained(): fast={model.fast!r}: expected one of {', '.join(MODES)}")
    if model.fast not in ("auto", "none"):
        apply(model, model.fast)
        model.fast = "none"  # applied for good, as blip2.fast.apply does


def before_generate(model: Blip2Model, rows: int | None = None) -> None:
    """Lay ``model`` out with ``model.fast`` ("auto") for a ``generate`` that decodes ``rows`` rows (None: not
    known) if it is in eval mode and not laid out yet, unless laying out waits (see the module's docstring); a
    model the speed-ups do not cover is left as it is (and not asked again until its device or dtype changes)."""
    _lay_out(model, wait=True, rows=rows)


def lay_out(model: Blip2Model) -> None:
    """What ``generate`` lays out, laid out now: for a process that will make many calls (a server) and should
    not spend its second call on it. Nothing for a model in training mode or loaded with ``fast="none"``."""
    _lay_out(model, wait=False)


def _lay_out(model: Blip2Model, wait: bool, rows: int | None = None) -> None:
    if model.fast == "none" or model.training or _settled(model):
        return
    weight = model.query_tokens  # never laid out: where and in what the model runs, without walking it
    key = (weight.device, table(model.language_model).dtype)
    if model.__dict__.get("_fast_plain") == key:
        return
    with _lock:
        if _settled(model):
            return
        as_loaded = model.__dict__.get("_fast_as_loaded", False)
        if not as_loaded and _laid_out(model.language_model):  # laid out by hand (blip2.fast.apply): the caller's
            return
        if wait and _waits(model, rows, as_loaded):
            return
        release(model)  # the native step over the weights as loaded, if any
        try:
            apply(model, model.fast)
        except Unsupported:
            pass
        if not _laid_out(model.language_model):
            model.__dict__["_fast_plain"] = key
            return
        _guard(model)


def _lay_out_at_load(model: Blip2Model, later: dict[str, torch.dtype]) -> None:
    """``model`` laid out as "auto" lays it out (the native step), the language model's weights ``later`` (key ->
    dtype, still the files' pages) converted into the layout as each is laid out, its pages released; any the
    layout did not take converted as the load would have. Not through the layout cache: a later load maps the
    converted copy (``blip2.converted``), not these files, and a layout is cached under the files it came from."""
    params = {key: model.get_parameter(key) for key in later}
    dtypes = set(later.values())
    try:
        if len(dtypes) == 1:  # (one dtype, as every load of the language model asks)
            with _lock:
                token = LAY_OUT_DTYPE.set(dtypes.pop())
                try:
                    native(model, towers=False)
                except Unsupported as e:
                    log.info("blip2: not laid out at load (%s)", e)
                finally:
                    LAY_OUT_DTYPE.reset(token)
    finally:
        for key, p in params.items():
            if p.numel() and p.dtype != later[key]:
                p.data = convert(p.data, later[key])
    if _laid_out(model.language_model):
        _guard(model)


def _waits(model: Blip2Model, rows: int | None, as_loaded: bool) -> bool:
    """Whether this ``generate`` of ``rows`` rows runs on the weights as loaded (``as_loaded``: with the native
    step there already): every one of one row where the native step runs, else the first (once per model),
    the layout left to the next."""
    if rows == 1 and as_loaded:  # (its size checked when the step was made)
        return True
    lm = model.language_model
    if model.fast != "auto" or table(lm).device.type != "cpu":
        return False  # a GPU lays out at its memory's speed
    size = held_bytes(lm)
    if size <= LATER_BYTES:
        return False
    if rows == 1 and _as_loaded(model):
        return True
    if model.__dict__.get("_fast_waited"):
        return False
    model.__dict__["_fast_waited"] = True
    if layout_cache.mappable(model, model.fast):
        log.info("blip2: the language model's layout is mapped from the cache at the first generate")
        return False
    log.info("blip2: the first generate of several rows runs as loaded; the language model (%.1f GB) is laid out "
             "for the fast path at the next (blip2.fast.lazy)", size / 1e9)
    try:
        route(model, auto=True)  # its fp32 products through oneDNN, on the weights as loaded
    except Unsupported:
        pass
    return True


def laid_out(model: Blip2Model) -> bool:
    """Whether the language model's weights are laid out for the fast path (by ``generate`` or by hand); the
    native step on the weights as loaded is no layout. Undoes nothing."""
    return _fused(model.language_model)


def _fused(lm: LanguageModel) -> bool:
    return any(isinstance(m, FusedLinear) for m in walk(lm))


def _settled(model: Blip2Model) -> bool:
    """Laid out for good (not just the first generate's step as loaded)."""
    return getattr(model, "_fast_guard", None) is not None and not model.__dict__.get("_fast_as_loaded")


def _as_loaded(model: Blip2Model) -> bool:
    """Whether the native step on the checkpoint's own weights (``blip2.fast.native_as_loaded``) now decodes
    the model's calls of one row, guarded like a layout."""
    try:
        native_as_loaded(model)
    except Unsupported:
        return False
    _guard(model)
    model.__dict__["_fast_as_loaded"] = True
    return True


def _laid_out(lm: LanguageModel) -> bool:
    return lm.decode_step != lm._decode_step or _fused(lm)


def release(model: Blip2Model) -> None:
    """Undo what ``before_generate`` laid out: the model's own modules and parameters, the eager step."""
    guard = model.__dict__.pop("_fast_guard", None)
    model.__dict__.pop("_fast_as_loaded", None)
    if guard is None:
        return
    for module in guard:
        module.__class__ = module.__class__._fast_base
        module.__dict__.pop("_fast_root", None)
    unfuse(model)


def _guard(model: Blip2Model) -> None:
    parts = [model, model.vision_model, model.qformer, model.language_model]
    for module in parts:
        module.__class__ = _guarded(type(module))
        if module is not model:
            module.__dict__["_fast_root"] = model
    model.__dict__["_fast_guard"] = parts


def _root(module: nn.Module) -> Blip2Model:
    return module.__dict__.get("_fast_root", module)


# set while a guarded module runs nn.Module's own code, which walks the children through their (guarded) methods
_inside = threading.local()


def _base_call(base: type, name: str, self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``base.<name>(self, ...)``, its walk over the guarded children passing through them."""
    outer = getattr(_inside, "on", False)
    _inside.on = True
    try:
        return getattr(base, name)(self, *args, **kwargs)
    finally:
        _inside.on = outer


def _releasing(name: str) -> Any:
    def method(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        base = type(self)._fast_base
        if getattr(_inside, "on", False):
            return _base_call(base, name, self, *args, **kwargs)
        release(_root(self))
        return getattr(base, name)(self, *args, **kwargs)  # ``self`` is a ``base`` again
    method.__name__ = name
    return method


def _guarded(base: type) -> type:
    """``base`` with the methods that reach for the plain modules undoing the layout first."""
    if base in _guarded_classes:
        return _guarded_classes[base]

    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        if not mode or getattr(_inside, "on", False):
            return _base_call(base, "train", self, mode)
        release(_root(self))
        return base.train(self, mode)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():  # gradients for the weights need the parameters
            release(_root(self))
        return base.forward(self, *args, **kwargs)

    namespace: dict[str, Any] = {name: _releasing(name) for name in _RELEASING if hasattr(base, name)}
    namespace.update(train=train, forward=forward, _fast_base=base, __module__=base.__module__,
                     __qualname__=base.__qualname__, __doc__=base.__doc__)
    if issubclass(base, Blip2Model):  # ``model.device``/``dtype`` in generate, without walking the parameters
        # (the first parameter, as the unguarded properties find it)
        namespace["device"] = property(lambda self: self.query_tokens.device)
        namespace["dtype"] = property(lambda self: self.query_tokens.dtype)
    cls = _guarded_classes[base] = type(base.__name__, (base,), namespace)
    return cls

"""The native steps take their weights and scalars by name (blip2.fast.native, kernels/slots.cpp): the
Python lists follow the C++ op's schema by name, a name one side has and the other lacks fails the build
naming it, and the op refuses a call whose names differ from its schema (a slot reordered, missing or
extra, a scalar missing or extra) before reading anything."""

from __future__ import annotations

import importlib

import pytest
import torch

from blip2.fast.native import NativeOPTStep, NativeT5Step, SchemaError, _ordered, _values, try_native
from test_kernels import needs_kernel
from test_native_steps import _opt, _t5

# the module, to patch its schema lookup: ``from blip2.fast import native`` is the function fast.native
native = importlib.import_module("blip2.fast.native")

# a small schema: two slots outside the layers, four a layer
SLOTS = ["table", "layers.norm.weight", "layers.proj.weight", "layers.proj.scale", "layers.proj.bias", "head.weight"]
OUTER = {"table": "T", "head.weight": "H"}
LAYERS = [{"norm.weight": f"n{i}", "proj.weight": f"w{i}", "proj.scale": None, "proj.bias": f"b{i}"} for i in range(2)]


def test_the_lists_follow_the_schema_by_name():
    assert _ordered("op", SLOTS, OUTER, LAYERS) == ["T", "n0", "w0", None, "b0", "n1", "w1", None, "b1", "H"]
    # the op's schema reordered: every tensor moves with its name
    reordered = [SLOTS[0], SLOTS[2], SLOTS[1], *SLOTS[3:]]
    assert _ordered("op", reordered, OUTER, LAYERS) == ["T", "w0", "n0", None, "b0", "w1", "n1", None, "b1", "H"]
    assert _values("op", ["heads", "eps"], {"eps": 0.5, "heads": 4}) == [4.0, 0.5]


def test_a_slot_one_side_lacks_fails_naming_it():
    with pytest.raises(SchemaError, match=r"op reads the slots \['head.bias'\] the Python step does not give"):
        _ordered("op", [*SLOTS, "head.bias"], OUTER, LAYERS)
    extra = [LAYERS[0], {**LAYERS[1], "proj.extra": None}]
    with pytest.raises(SchemaError, match=r"op does not read the layer slots \['proj.extra'\] the Python step gives"):
        _ordered("op", SLOTS, OUTER, extra)
    renamed = [s.replace("norm", "ln") for s in SLOTS]
    with pytest.raises(SchemaError, match=r"reads the layer slots \['ln.weight'\] .* and does not read the layer slots "
                                          r"\['norm.weight'\]"):
        _ordered("op", renamed, OUTER, LAYERS)


def test_a_missing_or_extra_scalar_fails_naming_it():
    with pytest.raises(SchemaError, match=r"opt_step reads the scalars \['heads'\] the Python step does not give"):
        _values("opt_step", ["eps", "heads"], {"eps": 1e-5})
    with pytest.raises(SchemaError, match=r"opt_step does not read the scalars \['want_hidden'\]"):
        _values("opt_step", ["eps"], {"eps": 1e-5, "want_hidden": 1})


# ---- against the C++ ops -----------------------------------------------------------------------------

def _state(rows: int = 1) -> tuple:
    """An OPT decoding state for the op (3 layers, 4 heads of 8, 5 cache slots): x, positions, key_valid,
    caches, cache slot."""
    return (torch.zeros(rows, 1, 32), torch.zeros(rows, 1, dtype=torch.long), torch.ones(rows, 5, dtype=torch.bool),
            [torch.zeros(rows, 4, 5, 8) for _ in range(2 * 3)], torch.tensor([0]))


def _names(step) -> list[str]:
    """The name of every entry of a step's weight list, as the op's messages give them: the schema holds a
    layer's slots once (``layers.<name>``), the list once per layer (``layers.<l>.<name>``)."""
    per_layer = [n[len("layers."):] for n in step.slots if n.startswith("layers.")]
    first = step.slots.index("layers." + per_layer[0])
    layers = (len(step.weights) - len(step.slots)) // len(per_layer) + 1
    return (step.slots[:first] + [f"layers.{i}.{n}" for i in range(layers) for n in per_layer]
            + step.slots[first + len(per_layer):])


def _holds(step, name: str, tensor: torch.Tensor) -> bool:
    """Whether the step's slot ``name`` holds ``tensor`` (itself or a view of the same memory)."""
    t = step.weights[_names(step).index(name)]
    return t.data_ptr() == tensor.data_ptr() and t.shape == tensor.shape


@needs_kernel
def test_the_steps_hand_over_the_ops_schema_with_each_tensor_in_its_named_slot():
    lm = _opt({}, torch.float32)
    step = NativeOPTStep(lm, None)
    assert (step.slots, step.params) == tuple(torch.ops.blip2_kernels.step_schema("opt_step"))
    layers = lm.model.decoder.layers
    assert _holds(step, "layers.1.fc1.weight", layers[1].fc1.w)
    assert _holds(step, "layers.2.ffn_norm.bias", layers[2].final_layer_norm.bias)
    assert _holds(step, "lm_head.weight", lm.lm_head.w)
    scalars = dict(zip(step.params, step.values))
    assert (scalars["heads"], scalars["pre_norm"], scalars["want_hidden"]) == (4, 1, 0)
    assert dict(zip(step.params, step.hidden_values)) == {**scalars, "want_hidden": 1}
    t5 = _t5({}, torch.float32)
    s5 = NativeT5Step(t5, None)
    assert (s5.slots, s5.params) == tuple(torch.ops.blip2_kernels.step_schema("t5_step"))
    assert _holds(s5, "layers.2.cross_q.weight", t5.decoder.block[2].layer[1].EncDecAttention.q.w)
    assert _holds(s5, "final_norm.weight", t5.decoder.final_layer_norm.weight)
    assert dict(zip(s5.params, s5.values))["d_kv"] == 8


@needs_kernel
def test_the_op_refuses_a_reordered_slot(monkeypatch):
    lm = _opt({}, torch.float32)
    slots, params = torch.ops.blip2_kernels.step_schema("opt_step")
    i, j = slots.index("layers.qkv.weight"), slots.index("layers.out_proj.weight")
    slots[i], slots[j] = slots[j], slots[i]
    # Python's idea of the order with two slots swapped: the step builds its lists by those names...
    monkeypatch.setattr(native, "_schema", lambda op: (list(slots), list(params)))
    step = NativeOPTStep(lm, None)
    attn = lm.model.decoder.layers[0].self_attn
    assert _holds(step, "layers.0.qkv.weight", attn.qkv.w) and _holds(step, "layers.0.out_proj.weight", attn.out_proj.w)
    assert step.weights[i] is attn.out_proj.w  # where the op reads q/k/v
    # ...and the op, whose order is not that, refuses the call naming the slot
    x, positions, valid, _, cache_slot = _state()
    with pytest.raises(RuntimeError, match="opt_step: slot 6 is 'layers.out_proj.weight' where the op reads "
                                           "'layers.qkv.weight'"):
        step(x, positions, valid, [], cache_slot)  # no caches: the names are checked before anything is read


@needs_kernel
def test_the_op_refuses_a_missing_or_extra_slot_or_scalar():
    step = NativeOPTStep(_opt({}, torch.float32), None)
    op = torch.ops.blip2_kernels.opt_step
    state = _state()
    with pytest.raises(RuntimeError, match="opt_step: the call has no slot 'lm_head.bias'"):
        op(*state, step.slots[:-1], step.weights[:-1], step.params, step.values)
    with pytest.raises(RuntimeError, match=f"opt_step: slot {len(step.slots)} 'lm_head.extra' is not one the op reads"):
        op(*state, [*step.slots, "lm_head.extra"], [*step.weights, None], step.params, step.values)
    with pytest.raises(RuntimeError, match="opt_step: the call has no scalar 'want_hidden'"):
        op(*state, step.slots, step.weights, step.params[:-1], step.values[:-1])
    with pytest.raises(RuntimeError, match="opt_step: scalar 7 'rope_theta' is not one the op reads"):
        op(*state, step.slots, step.weights, [*step.params, "rope_theta"], [*step.values, 1e4])
    with pytest.raises(RuntimeError, match="opt_step: 6 values for 7 scalars"):
        op(*state, step.slots, step.weights, step.params, step.values[:-1])
    heads = [4.5 if n == "heads" else v for n, v in zip(step.params, step.values)]
    with pytest.raises(RuntimeError, match="opt_step: heads must be a whole number, got 4.5"):
        op(*state, step.slots, step.weights, step.params, heads)
    with pytest.raises(RuntimeError, match="step_schema: no step op 'gpt_step'"):
        torch.ops.blip2_kernels.step_schema("gpt_step")


@needs_kernel
def test_a_name_python_does_not_know_fails_the_build(monkeypatch):
    lm = _opt({}, torch.float32)
    slots, params = torch.ops.blip2_kernels.step_schema("opt_step")
    renamed = [n.replace("fc1", "fc_in") for n in slots]
    monkeypatch.setattr(native, "_schema", lambda op: (renamed, list(params)))
    with pytest.raises(SchemaError, match=r"reads the layer slots \['fc_in.weight', 'fc_in.scale', 'fc_in.bias'\]"):
        NativeOPTStep(lm, None)
    # a bug, not a model the steps do not cover: not swallowed into the fallback
    with pytest.raises(SchemaError):
        try_native(NativeOPTStep, lm, None)
    monkeypatch.setattr(native, "_schema", lambda op: (list(slots), [*params, "rope_theta"]))
    with pytest.raises(SchemaError, match=r"opt_step reads the scalars \['rope_theta'\] the Python step does not"):
        NativeOPTStep(lm, None)

"""``device_map``: where a loaded model's parts live, and, across several GPUs, how activations follow them.

One device (``"cpu"``, ``"cuda:1"``, ``1``, ``{"": 0}``, or ``"auto"`` on a machine with at most one GPU) puts
the whole model there. ``"auto"`` / ``"balanced"`` / ``"sequential"`` with several GPUs, or a dict naming
modules, split the model: the vision encoder, the Q-Former, the projection and the language model's embeddings
stay on the first device, the language model's layers are spread over the devices in order (``"balanced"``:
about equal bytes each; ``"sequential"``: fill each device up to its ``max_memory`` before the next), and the
head goes with the last layer (or with the embeddings, when it is tied to them). Every module whose weights
sit on one device gets a hook that moves its tensor inputs there, and the head's output comes back to the first
device, so a model that does not fit one GPU runs with no change to the model files. A split model's KV
caches live with their layers (the models allocate each on its layer's device).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["AUTO_MAPS", "Placement", "device_for_key", "dispatch", "placement_of", "plan_layers", "resolve_device_map"]

AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
Placement = dict[str, torch.device]  # module or parameter name ("" = everything) -> device


def _device(value: Any, what: str) -> torch.device:
    """A device_map value -> a device that this machine has: "cpu", "cuda", "cuda:N", N, torch.device."""
    if value in ("disk", "meta"):
        raise ValueError(f"{what}={value!r}: blip2 does not offload weights to {value}; use 'cpu' or a GPU")
    try:
        device = torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what}={value!r}: expected 'cpu', 'cuda', 'cuda:N', a GPU index or a dict") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{what}={value!r}: this machine has no CUDA device (use 'cpu' or 'auto')")
        if (device.index or 0) >= count:
            raise ValueError(f"{what}={value!r}: this machine has {count} CUDA device(s)")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"{what}={value!r}: unsupported device type {device.type!r}")
    return device


def resolve_device_map(device_map: Any, device: Any = None) -> torch.device | Placement | str:
    """One device for the whole model, a placement by name, or an AUTO_MAPS name to plan once the model is
    built (only where this machine has several GPUs: with one it is that GPU, without any the CPU)."""
    if device_map is None:
        return _device(device if device is not None else "cpu", "device")
    if isinstance(device_map, str) and device_map in AUTO_MAPS:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return torch.device("cpu") if count == 0 else torch.device("cuda:0") if count == 1 else device_map
    if isinstance(device_map, dict):
        if not device_map:
            raise ValueError("device_map={}: names no device")
        placement = {str(k): _device(v, f"device_map[{k!r}]") for k, v in device_map.items()}
        devices = set(placement.values())
        return devices.pop() if len(devices) == 1 and "" in placement else placement
    return _device(device_map, "device_map")


def device_for_key(placement: Placement, key: str) -> torch.device:
    """The device of parameter ``key``: its longest named prefix in ``placement``."""
    best = None
    for name, device in placement.items():
        if name == "" or key == name or key.startswith(name + "."):
            if best is None or len(name) > len(best):
                best = name
    if best is None:
        raise ValueError(f"device_map names no device for {key!r} (add it, a module above it, or \"\")")
    return placement[best]


def _lm_units(lm: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The language model's parts in the order activations pass them: every layer of a ModuleList on its own,
    the modules around them whole."""
    for name, child in lm.named_children():
        if isinstance(child, nn.ModuleList):
            yield from ((f"{name}.{i}", layer) for i, layer in enumerate(child))
        elif any(isinstance(m, nn.ModuleList) for m in child.modules()):
            yield from ((f"{name}.{sub}", m) for sub, m in _lm_units(child))
        else:
            yield name, child


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _parse_bytes(size: Any) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", str(size), flags=re.I)
    if not m:
        raise ValueError(f"max_memory: expected bytes or e.g. '20GiB', got {size!r}")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(unit[0]))


def plan_layers(model: nn.Module, devices: list[torch.device], strategy: str = "balanced",
                max_memory: dict[Any, Any] | None = None) -> Placement:
    """A placement splitting ``model``'s language model over ``devices`` (see the module doc). ``max_memory``
    ({index or "cuda:N": bytes or "20GiB"}) caps each device; a model that does not fit is an error."""
    first = devices[0]
    lm = model.language_model
    units = list(_lm_units(lm))
    placement: Placement = {"": first}
    caps = {d: float("inf") for d in devices}
    for key, size in (max_memory or {}).items():
        d = torch.device(f"cuda:{key}" if isinstance(key, int) else key)
        if d in caps:
            caps[d] = _parse_bytes(size)
    used = {d: 0 for d in devices}
    used[first] = _nbytes(model) - _nbytes(lm)  # vision encoder, Q-Former, projection
    total = sum(_nbytes(m) for _, m in units)
    share = total / len(devices) if strategy.startswith("balanced") else float("inf")
    index, on_this = 0, 0
    # embeddings and the position-bias tables stay on the first device, where inputs and masks are made
    pinned = {n for n, m in units if isinstance(m, nn.Embedding) or
              any(isinstance(s, nn.Embedding) for s in m.modules())}
    for name, module in units:
        size = _nbytes(module)
        if name not in pinned:
            while index < len(devices) - 1 and (on_this + size > share
                                                or used[devices[index]] + size > caps[devices[index]]):
                index, on_this = index + 1, 0
        device = first if name in pinned else devices[index]
        if used[device] + size > caps[device]:
            raise ValueError(f"the model does not fit max_memory: language_model.{name} ({size} bytes) has no room "
                             f"on {device}")
        used[device] += size
        on_this += 0 if name in pinned else size
        placement[f"language_model.{name}"] = device
    head = getattr(lm, "lm_head", None)
    if head is not None:
        tied = head.weight is lm.get_input_embeddings().weight
        placement["language_model.lm_head"] = first if tied else devices[index]
    return placement


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def dispatch(model: nn.Module, placement: Placement) -> None:
    """Move every parameter and buffer to its device of ``placement``, then hook the modules whose weights sit on
    one device so their inputs follow (see the module doc). The language model's head returns to the first
    device."""
    for name, p in model.named_parameters():
        p.data = p.data.to(device_for_key(placement, name))
    for name, module in model.named_modules():
        for leaf, b in list(module.named_buffers(recurse=False)):
            if b is not None:
                setattr(module, leaf, b.to(device_for_key(placement, f"{name}.{leaf}" if name else leaf)))
    for module in model.modules():
        devices = {t.device for t in (*module.parameters(), *module.buffers())}
        if len(devices) == 1:
            device = devices.pop()
            module.register_forward_pre_hook(
                lambda _m, args, kwargs, d=device: (_move(args, d), _move(kwargs, d)), with_kwargs=True)
    first = placement.get("", next(iter(placement.values())))
    head = getattr(getattr(model, "language_model", None), "lm_head", None)
    if head is not None:
        head.register_forward_hook(lambda _m, _args, out: out.to(first))
    model.hf_device_map = {k: str(v) for k, v in placement.items()}


def placement_of(model: nn.Module, where: torch.device | dict[str, torch.device] | str, dtype: torch.dtype | None,
                 max_memory: dict[Any, Any] | None) -> dict[str, torch.device] | None:
    """None for one device; the device of each named part where ``device_map`` splits the model."""
    if isinstance(where, torch.device):
        return None
    if isinstance(where, dict):
        return where
    if not hasattr(model, "language_model"):
        return {"": torch.device("cuda:0")}  # nothing to split: the towers are small
    if dtype is not None:
        model.to(dtype)  # on the meta device: only for the sizes the plan weighs
    return plan_layers(model, [torch.device("cuda", i) for i in range(torch.cuda.device_count())], where, max_memory)

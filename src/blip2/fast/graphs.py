"""The one-token decoding step replayed as a CUDA graph.

On a GPU a small language model's decoding step is a few hundred tiny kernels, and launching them costs
more than running them: a batch of 8 images decodes no faster than one. A CUDA graph records the step's
kernels once and replays them with one launch.

A graph replays fixed memory addresses. The step's arguments are of two kinds:

- the *per-step* tensors passed at the top level (the new token ids or their embeddings, the masks,
  positions and cache slots): small, new or changed every step, so each call copies them into static
  buffers the graph reads;
- the tensors nested in lists or objects (the KV caches, T5's cross-attention keys and values): large,
  allocated once per ``generate`` call and updated in place by the step, so the graph uses them where
  they are. A call whose nested tensors live elsewhere (the next ``generate``) records a new graph.

Recording first runs the step once, eagerly, on a side stream (CUDA's warm-up rule); that run writes the
same cache slots with the same values as the replay that follows, so it changes nothing. The step must
not synchronise with the CPU (no ``.item()``, no data-dependent shapes): ours do not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["GraphedStep", "graph_step"]


def _nested_tensors(obj: Any, out: list[Tensor], depth: int = 0) -> None:
    """Tensors inside lists, tuples, dicts and plain objects (a KV cache's attributes), in a fixed order."""
    if isinstance(obj, Tensor):
        out.append(obj)
    elif depth > 3:
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _nested_tensors(item, out, depth + 1)
    elif isinstance(obj, dict):
        for key in sorted(obj):
            _nested_tensors(obj[key], out, depth + 1)
    elif isinstance(obj, torch.nn.Module):
        for _, buf in sorted(obj.named_buffers(recurse=False)):
            out.append(buf)
    elif hasattr(obj, "__dict__"):
        for key in sorted(vars(obj)):
            _nested_tensors(vars(obj)[key], out, depth + 1)


class _CudaGraph:
    """The real backend: ``torch.cuda.CUDAGraph``, warmed up on a side stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None

    def record(self, fn: Callable[[], Tensor]) -> Tensor:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()  # warm-up: allocator, cuBLAS workspace, lazy kernels
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = fn()
        return out

    def replay(self) -> None:
        assert self.graph is not None
        self.graph.replay()


class GraphedStep:
    """``fn(*args)`` replayed from a recorded graph (see the module docstring for which arguments are copied
    and which are used in place). Returns a fresh tensor each call (the graph's output is cloned).

    ``backend``: a factory of objects with ``record(fn) -> output`` and ``replay()``; the default records
    CUDA graphs on ``device`` (which must be a CUDA device)."""

    def __init__(self, fn: Callable[..., Tensor], device: torch.device | str,
                 backend: Callable[[torch.device], Any] | None = None) -> None:
        device = torch.device(device)
        if backend is None and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device}")
        self.fn, self.device = fn, device
        self.backend = backend or _CudaGraph
        self.key: tuple | None = None
        self.graph: Any = None
        self.static: list[Tensor | None] = []
        self.args: tuple = ()
        self.out: Tensor | None = None
        self.recordings = 0  # how many graphs were recorded (a new one per generate call)

    def _key(self, args: tuple) -> tuple:
        key: list[Any] = []
        for a in args:
            if isinstance(a, Tensor):
                key.append((tuple(a.shape), a.dtype, a.device))
            else:
                nested: list[Tensor] = []
                _nested_tensors(a, nested)
                key.append(tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in nested))
        return tuple(key)

    def __call__(self, *args: Any) -> Tensor:
        key = self._key(args)
        if key != self.key:
            self.graph = self.out = None  # free the old graph first
            self.static = [a.clone() if isinstance(a, Tensor) else None for a in args]
            self.args = tuple(s if s is not None else a for s, a in zip(self.static, args))
            self.graph = self.backend(self.device)
            self.out = self.graph.record(lambda: self.fn(*self.args))
            self.key = key
            self.recordings += 1
        else:
            for s, a in zip(self.static, args):
                if s is not None:
                    s.copy_(a)
        self.graph.replay()
        assert self.out is not None
        return self.out.clone()


def graph_step(step: Callable[..., Tensor], device: torch.device | str) -> GraphedStep:
    """``step`` (an eager or compiled decoding step, or one already graphed) replayed as CUDA graphs."""
    return GraphedStep(step.fn if isinstance(step, GraphedStep) else step, device)

"""What blip2 takes from torch that releases older than it was written against spell differently or lack.

The package supports torch 2.3 and later (pyproject). Each name here is the newer API where torch has it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["custom_op", "register_fake"]


def custom_op(name: str, mutates_args: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Any]:
    """``torch.library.custom_op`` (torch 2.4+): the function becomes an op that ``torch.compile`` calls
    without tracing into it. Before 2.4 the function stays a plain function (a compiled graph traces through
    it, as eager code) and its ``register_fake`` does nothing."""
    if hasattr(torch.library, "custom_op"):
        return torch.library.custom_op(name, mutates_args=tuple(mutates_args))

    def plain(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.register_fake = lambda fake: fake  # type: ignore[attr-defined]
        return fn

    return plain


def register_fake(op: str) -> Callable[[Callable[..., Any]], Any]:
    """``torch.library.register_fake`` (torch 2.4+; ``impl_abstract`` before): the output's shape and dtype of
    a C++ op, for tracing."""
    if hasattr(torch.library, "register_fake"):
        return torch.library.register_fake(op, _stacklevel=2)
    # torch 2.3 checks that the caller's module is the one the C++ library names (blip2.fast.kernels)
    return torch.library.impl_abstract(op, _stacklevel=2)

"""``blip2._compat``: the torch APIs newer than the package's oldest supported torch (2.3), and what stands in
for them there. The fallbacks are exercised here by hiding the newer names from torch.library."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from blip2._compat import custom_op, register_fake


@pytest.mark.skipif(not hasattr(torch.library, "custom_op"), reason="torch.library.custom_op is torch 2.4+")
def test_custom_op_is_torch_s_op_where_torch_has_it():
    @custom_op("blip2_test::triple", mutates_args=())
    def triple(x: Tensor) -> Tensor:
        return 3 * x

    @triple.register_fake
    def _(x: Tensor) -> Tensor:
        return torch.empty_like(x)

    x = torch.arange(4.0)
    assert torch.equal(torch.ops.blip2_test.triple(x), 3 * x)  # registered with the dispatcher
    assert torch.equal(triple(x), 3 * x)


def test_custom_op_before_torch_2_4_is_the_plain_function(monkeypatch):
    monkeypatch.delattr(torch.library, "custom_op", raising=False)

    def double(x: Tensor) -> Tensor:
        return 2 * x

    op = custom_op("blip2_test::double", mutates_args=())(double)
    assert op is double  # nothing registered: torch 2.3 cannot
    fake = op.register_fake(lambda x: torch.empty_like(x))
    assert callable(fake)
    assert not hasattr(torch.ops.blip2_test, "double")
    assert torch.equal(op(torch.ones(2)), torch.full((2,), 2.0))


def test_register_fake_before_torch_2_4_is_impl_abstract(monkeypatch):
    calls = []
    monkeypatch.delattr(torch.library, "register_fake", raising=False)
    monkeypatch.setattr(torch.library, "impl_abstract",
                        lambda op, _stacklevel=1: calls.append((op, _stacklevel)) or (lambda fn: fn), raising=False)
    register_fake("blip2::some_op")
    assert calls == [("blip2::some_op", 2)]  # the caller's module registers it, as torch 2.3 checks

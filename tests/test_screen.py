"""The screened greedy head (blip2_kernels::greedy_head, blip2.fast.native's ``greedy``): the token is the
argmax of the full fp32 head's logits, bit for bit, banned ids left out, ties to the lowest id, for blocked
and plain heads; near ties, exact ties, non-finite inputs and huge logits included. Greedy generate with
native() screens (few logits computed exactly) and gives the tokens of the unscreened step; what it does
not cover (sampling, repetition penalty, bf16) keeps the whole head."""

from __future__ import annotations

import pytest
import torch

from blip2 import Blip2ForConditionalGeneration
from blip2.fast import kernels
from blip2.fast.native import NativeOPTStep, NativeT5Step
from blip2.generation import masked_argmax
from conftest import pixel_batch
from test_kernels import needs_kernel
from test_native_steps import _three_prompts
from blip2 import fast

pytestmark = needs_kernel


@pytest.fixture(scope="module", autouse=True)
def loaded():
    assert kernels.load(), kernels.status()
    if not kernels.screen_supports(torch.zeros(16, 4)):
        pytest.skip("the screen needs AVX-512 BF16")


def _full(x, w, bias, n):
    """The full head's logits as the native steps compute them: blocked rows, or the row kernel row by row."""
    if w.dim() == 3:
        return kernels.blocked_linear(x, w, bias, n)
    return torch.stack([kernels.row_product(x[r], w, None, bias) for r in range(x.shape[0])])


def _check(x, W, bias=None, banned=(), blocked=True):
    """greedy_head against the full head's argmax; returns the per-row exact counts."""
    n = W.shape[0]
    screen, norms = kernels.screen_weight(W)
    w = kernels.block_weight(W) if blocked else W
    ban = torch.tensor(list(banned), dtype=torch.long)
    want = masked_argmax(_full(x, w, bias, n), ban if len(banned) else None)
    tokens, exact = kernels.greedy_head(x, screen, norms, w, bias, ban)
    assert tokens.tolist() == want.tolist()
    assert exact.shape == (x.shape[0],) and bool((exact >= 1).all()) and bool((exact <= n).all())
    return exact


@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "plain"])
@pytest.mark.parametrize("n,k,rows", [(1000, 64, 8), (37, 33, 3), (250, 96, 1), (16, 8, 9), (4000, 512, 5)])
def test_greedy_head_is_the_argmax_of_the_full_head(n, k, rows, blocked):
    g = torch.Generator().manual_seed(n + k)
    W = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g) * 0.1
    counts = []
    for trial in range(6):
        x = torch.randn(rows, k, generator=g) * 10.0 ** (trial - 2)  # 0.01 .. 1000
        counts.append(_check(x, W, bias if trial % 2 else None, banned=[3, n - 1] if trial % 3 else [],
                             blocked=blocked))
    if n >= 250:  # the screen decides: few logits computed exactly
        assert torch.cat(counts).float().median() <= 4


def test_exact_and_near_ties_go_to_the_exact_sums():
    """Rows equal in bf16 (one ulp apart in fp32, or identical): the screen cannot order them, the exact
    sums do; identical rows tie and the lowest id wins, as torch.argmax."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 48, generator=g) * 0.05
    x = torch.randn(4, 48, generator=g)
    top = int(_full(x, kernels.block_weight(W), None, 300)[0].argmax())
    W[100] = W[top]  # an exact copy, later id: never chosen
    W[7] = torch.nextafter(W[top], torch.tensor(1.0))  # a hair larger where x > 0, earlier id
    W[200] = W[top] * (1 + 1e-6)
    for blocked in (True, False):
        exact = _check(x, W, blocked=blocked)
        assert exact[0] >= 4  # top, 7, 100 and 200 all reach the screen's best lower bound
    W[7] = W[200] = W[top]  # a four-way exact tie
    screen, norms = kernels.screen_weight(W)
    tokens, _ = kernels.greedy_head(x[:1], screen, norms, kernels.block_weight(W), None,
                                    torch.empty(0, dtype=torch.long))
    assert tokens.item() == min(7, top) == _full(x[:1], W, None, 300).argmax().item()


def test_a_flat_head_computes_every_candidate_or_the_whole_row():
    """All logits within the bound of each other (rows a tiny perturbation of one row): the answer is still
    the full head's, from many exact sums or the whole row."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 64, generator=g)
    W = base + torch.randn(500, 64, generator=g) * 1e-5
    x = torch.randn(3, 64, generator=g)
    exact = _check(x, W, banned=[0])
    assert bool((exact > 20).all())
    _check(x, W, blocked=False)


def test_gaps_at_the_scale_of_bf16_rounding():
    """Logits whose gaps are of the size of the screen's own error (rows a base row plus perturbations of
    bf16's relative precision): many trials, each the full head's token; a bound a few times too small
    fails here."""
    g = torch.Generator().manual_seed(3)
    for trial in range(40):
        k = 64 + trial
        base = torch.randn(1, k, generator=g)
        W = base * (1 + torch.randn(120, k, generator=g) * 2e-3)
        x = torch.randn(8, k, generator=g) + 0.1 * trial
        _check(x, W, bias=torch.randn(120, generator=g) * 1e-3 if trial % 2 else None, banned=[trial],
               blocked=bool(trial % 3))


def test_rounding_errors_aligned_with_x_are_within_the_bound():
    """The worst case of the bound: every weight of the winning row rounds down in bf16 along x (all
    ones), so its screened logit falls short by the whole bound; a rival exact in bf16 screens higher but
    is truly lower. The rival is kept only where the bound is whole (a bound 10% short fails here)."""
    k, ulp = 64, 2.0**-7  # bf16's spacing in [1, 2)
    W = torch.rand(50, k) * 0.5  # the rest, far below
    W[20] = 1 + 0.45 * ulp  # rounds to 1.0: truly 64 * (1 + 0.45 ulp) = 64.225, screened 64
    W[31] = 1.0
    W[31, :28] = 1 + ulp  # exact in bf16: truly and screened 64.219
    x = torch.ones(1, k)
    exact = _check(x, W)
    assert _full(x, kernels.block_weight(W), None, 50).argmax().item() == 20 and exact.item() >= 2
    _check(x, W, blocked=False)


def test_non_finite_rows_are_what_torch_argmax_says():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(200, 32, generator=g)
    x = torch.randn(4, 32, generator=g)
    x[1, 5] = float("nan")  # NaN logits: torch.argmax returns the first NaN
    x[2, 3] = float("inf")
    x[3] *= 3e37  # finite x, logits overflowing to +-inf
    for blocked in (True, False):
        exact = _check(x, W, banned=[11], blocked=blocked)
        assert exact[1:].tolist() == [200, 200, 200] and exact[0] < 200
    W[9, 0] = float("inf")  # a non-finite head: every row whole
    assert _check(x[:1], W).tolist() == [200]
    W[9, 0] = float("nan")  # its logit NaN: torch.argmax picks it
    assert _check(x[:1], W, blocked=False).tolist() == [200]


def test_greedy_head_names_bad_arguments():
    W = torch.randn(40, 16)
    screen, norms = kernels.screen_weight(W)
    w = kernels.block_weight(W)
    none = torch.empty(0, dtype=torch.long)
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        kernels.greedy_head(x.double(), screen, norms, w, None, none)
    with pytest.raises(RuntimeError, match="the screen must be a bfloat16 blocked weight"):
        kernels.greedy_head(x, kernels.block_weight(W.bfloat16()[:, :8]), norms, w, None, none)
    with pytest.raises(RuntimeError, match="norms for 39 tokens"):
        kernels.greedy_head(x, screen, norms[:, :39].contiguous(), W, None, none)
    with pytest.raises(RuntimeError, match="banned id 40 outside the vocabulary of 40"):
        kernels.greedy_head(x, screen, norms, w, None, torch.tensor([40]))
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32"):
        kernels.greedy_head(x, screen, norms, w, torch.zeros(40, dtype=torch.bfloat16), none)
    with pytest.raises(ValueError, match="expected a float32"):
        kernels.screen_weight(W.bfloat16())


def test_screen_weight_bounds_the_rounding():
    W = torch.randn(70, 33) * 3
    screen, norms = kernels.screen_weight(W)
    plain = kernels.unblock_weight(screen, 70, 33)
    assert torch.equal(plain, W.bfloat16())
    assert bool((norms[0].double() >= W.double().norm(dim=1)).all())
    assert bool((norms[1].double() >= (W.double() - plain.double()).norm(dim=1)).all())
    assert torch.allclose(norms[0], W.norm(dim=1), rtol=1e-6)


def test_a_screen_is_made_in_pieces_from_a_plain_or_blocked_head(monkeypatch):
    """screen_weight takes the blocked head as laid out (the native step's), a few blocks at a time: the same
    screen and norms, bit for bit, as the whole plain head's at once, the last block part-filled."""
    W = torch.randn(16 * 9 + 5, 40) * 0.3
    whole = kernels.screen_weight(W)
    monkeypatch.setattr(kernels, "_SCREEN_BLOCKS", 2)  # 10 blocks in 5 pieces
    for head, n in ((W, None), (kernels.block_weight(W), W.shape[0])):
        screen, norms = kernels.screen_weight(head, n)
        assert torch.equal(screen.view(torch.int16), whole[0].view(torch.int16))
        assert torch.equal(norms, whole[1])
    with pytest.raises(ValueError, match="with n"):
        kernels.screen_weight(kernels.block_weight(W))


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_native_greedy_generate_screens_and_keeps_the_tokens(hf_opt_dir, hf_t5_dir, text):
    """native(): greedy generate (with min_new_tokens banning eos) goes through the screen, computing few
    logits exactly, and gives the tokens of the same model with the screen off, for one and three images.
    Sampling, beam search and a repetition penalty keep the whole head. compile(1) screens its plain head."""
    d, ids, mask = _three_prompts(text, hf_opt_dir, hf_t5_dir)
    pixels = pixel_batch(3, seed=9)
    model = fast.native(Blip2ForConditionalGeneration.from_pretrained(d))
    step = model.language_model.decode_step
    assert isinstance(step, NativeOPTStep if text == "opt" else NativeT5Step) and step.screen is not None
    vocab = model.language_model.get_input_embeddings().weight.shape[0]
    kw = dict(max_new_tokens=8, min_new_tokens=6)
    for rows in (1, 3):
        step.exact = None
        got = model.generate(pixels[:rows], ids[:rows], mask[:rows], **kw)
        assert step.exact is not None and step.exact.shape == (rows,) and bool((step.exact < vocab).all())
        screen, step.screen = step.screen, None
        want = model.generate(pixels[:rows], ids[:rows], mask[:rows], **kw)
        step.screen = screen
        assert got.tolist() == want.tolist()
    step.exact = None
    model.generate(pixels, ids, mask, max_new_tokens=4, repetition_penalty=1.3)
    model.generate(pixels, ids, mask, max_new_tokens=4, do_sample=True, seed=0)
    model.generate(pixels[:1], ids[:1], mask[:1], max_new_tokens=4, num_beams=2)
    assert step.exact is None
    # compile(1): plain weights, the screen's candidates computed by the row kernel
    one = fast.compile_decoding(Blip2ForConditionalGeneration.from_pretrained(d), 1)
    step = one.language_model.decode_step
    assert step.screen is not None and step.weights[-3].dim() == 2
    got = one.generate(pixels[:1], ids[:1], mask[:1], **kw)
    assert step.exact is not None and int(step.exact[0]) < vocab
    assert got.tolist() == model.generate(pixels[:1], ids[:1], mask[:1], **kw).tolist()


def test_bf16_and_missing_bf16_dot_keep_the_whole_head(hf_opt_dir, monkeypatch):
    d = hf_opt_dir[1]
    assert fast.native(Blip2ForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16)) \
        .language_model.decode_step.screen is None
    monkeypatch.setattr(kernels, "_bf16_dot", False)
    model = fast.native(Blip2ForConditionalGeneration.from_pretrained(d))
    assert model.language_model.decode_step.screen is None
    ids, mask = _three_prompts("opt", hf_opt_dir, None)[1:]
    plain = Blip2ForConditionalGeneration.from_pretrained(d)
    pixels = pixel_batch(3, seed=10)
    assert model.generate(pixels, ids, mask, max_new_tokens=6).tolist() == \
        plain.generate(pixels, ids, mask, max_new_tokens=6).tolist()


def test_bytes_read_per_token_count_the_screen_not_the_head(hf_t5_dir):
    """blip2.apps.bench's bound: a screened step reads the head's bf16 screen (half the head) instead of it."""
    from blip2.apps.bench import decode_bytes_per_token, module_bytes

    d = hf_t5_dir[1]
    model = fast.native(Blip2ForConditionalGeneration.from_pretrained(d))
    step = model.language_model.decode_step
    screened = decode_bytes_per_token(model)
    screen, step.screen = step.screen, None
    whole = decode_bytes_per_token(model)
    head = module_bytes(model.language_model.lm_head)
    assert whole - screened == head - sum(t.numel() * t.element_size() for t in screen)
    head_layer = model.language_model.lm_head
    n, k = head_layer.out_features, head_layer.in_features
    assert screen[0].numel() * 2 == -(-n // 16) * 16 * k * 2 and screen[1].numel() * 4 == 2 * n * 4  # bf16 + norms
    assert whole - screened > 0.4 * head

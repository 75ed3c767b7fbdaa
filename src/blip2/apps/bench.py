"""``blip2 bench``: how fast a BLIP-2 model decodes and captions here, against the memory-bandwidth bound.

Decoding a token reads every weight of the language model's decoder and head once, so at small batch its
speed is bound by memory bandwidth: seconds per token >= bytes read per token / bandwidth. The bandwidth is
measured in the same run, interleaved with the decoding, as a large tensor copy ((bytes read + bytes
written) / time, the STREAM convention), because on a shared machine it changes from minute to minute.

    blip2 bench --preset opt-125m --fast fuse --batch 8
    blip2 bench --model Salesforce/blip2-opt-2.7b --dtype bfloat16 --fast int8 --compile --batch 1

Every measurement is repeated and the median kept. ``--dtype`` and ``--fast`` take what every ``blip2``
command takes: ``none`` (as loaded), ``fuse`` (``Blip2Model.fuse``), ``int8`` (``Blip2Model.quantize_int8``:
weight-only int8 language model), ``int8-dynamic`` (``quantize_int8(dynamic=True, vision=True)``: int8
products in the language model and the vision encoder, CPU only), ``native``, ``cuda-graph`` (``fuse`` and
``--cuda-graph``); ``--compile`` adds ``Blip2Model.compile``. The presets are random models of a published language model's size with a small
vision encoder, for timing only (their tokens mean nothing).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from blip2.apps.options import add_dtype_option, add_fast_option
from blip2.apps.pipeline import resolve_dtype
from blip2.config import Blip2Config, OPTConfig
from blip2.fast.linear import FusedLinear
from blip2.models.opt import OPTForCausalLM
from blip2.models.blip2 import Blip2ForConditionalGeneration
from blip2.fast import apply as apply_fast, compile_decoding, cuda_graph

__all__ = ["PRESETS", "FAST_PATHS", "module_bytes", "decode_bytes_per_token", "copy_bandwidth", "interleave",
           "apply_fast_path", "decode_inputs", "time_decode_step", "product_flops", "floor_seconds",
           "step_floor_seconds", "matmul_rate", "main"]

# A vision encoder and Q-Former much smaller than BLIP-2's (ViT-g is 1B parameters): these presets are for
# timing the language model, which is what generation spends its time in with the real encoders too
# (the image is encoded once, the LM runs once per token).
_SMALL_VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                     image_size=224, patch_size=14, layer_norm_eps=1e-6)
_SMALL_QFORMER = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                      cross_attention_frequency=2, encoder_hidden_size=384)

# config.json dictionaries (Hugging Face layout), so transformers builds the same models
PRESETS: dict[str, dict[str, Any]] = {
    "opt-125m": dict(
        model_type="blip-2", num_query_tokens=32, image_token_index=50265,
        vision_config=_SMALL_VISION, qformer_config=_SMALL_QFORMER,
        text_config=dict(model_type="opt", hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                         num_attention_heads=12, vocab_size=50272, word_embed_proj_dim=768,
                         max_position_embeddings=2048, bos_token_id=2, eos_token_id=2, pad_token_id=1,
                         tie_word_embeddings=True)),
    "flan-t5-small": dict(
        model_type="blip-2", num_query_tokens=32, image_token_index=32100,  # the first T5 sentinel id
        vision_config=_SMALL_VISION, qformer_config=_SMALL_QFORMER,
        text_config=dict(model_type="t5", d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
                         num_heads=6, vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
}

FAST_PATHS = ("none", "fuse", "int8", "int8-dynamic", "native")  # what apply_fast_path applies ("plain": "none")


def module_bytes(*modules: nn.Module | None) -> int:
    """Bytes held by the parameters and buffers of ``modules``, each tensor counted once (tied weights share),
    and by the packed int8 weights of ``int8-dynamic`` layers (held by the kernel, not as tensors)."""
    tensors = {id(t): t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())}
    packed = {id(f): f.packed_bytes for m in modules if m is not None for f in m.modules()
              if isinstance(f, FusedLinear)}
    return sum(t.numel() * t.element_size() for t in tensors.values()) + sum(packed.values())


def decode_bytes_per_token(model: Blip2ForConditionalGeneration) -> int:
    """Bytes of language-model weights one greedy decoding step reads: the decoder layers and the head (in
    whatever format they are stored; the head's bf16 screen instead where the decoding step screens it), not
    the embedding tables (a few rows) nor T5's cross-attention keys and values (projected once per image)."""
    lm = model.language_model
    # greedy decoding with a screened head (blip2.fast.native) reads the head's bf16 screen instead of the head
    screen = getattr(lm.decode_step, "screen", None)
    head = sum(t.numel() * t.element_size() for t in screen) - module_bytes(lm.lm_head) if screen else 0
    if isinstance(lm, OPTForCausalLM):
        dec = lm.model.decoder
        return module_bytes(dec.layers, dec.final_layer_norm, dec.project_in, dec.project_out, lm.lm_head) + head
    # the fused k/v of cross-attention exists only after blip2.fast fused the model
    cross = [m for blk in lm.decoder.block for m in (blk.layer[1].EncDecAttention.k, blk.layer[1].EncDecAttention.v,
                                                      getattr(blk.layer[1].EncDecAttention, "kv", None))]
    return module_bytes(lm.decoder.block, lm.decoder.final_layer_norm, lm.lm_head) - module_bytes(*cross) + head


def product_flops(config: Blip2Config, prompt_len: int, new_tokens: int, batch: int = 1) -> dict[str, int]:
    """Floating-point operations (a multiply-add counts 2) in the matrix products of one greedy ``generate``
    call of ``batch`` rows: every linear layer, the patch embedding, and attention's two products (scores and
    weighted values) over the keys a row attends (the prefill's whole square). Not norms, activations,
    softmax. ``prompt_len``: the language model's input length (image tokens included, as ``decode_inputs``
    lays it out); ``new_tokens``: tokens generated, the first by the prefill. For a decoder that caches keys
    and values (T5's cross-attention ones projected once) and applies the head at the last position only.

    Keys: ``vision``, ``qformer`` (with the language projection), ``lm_prefill`` (OPT: the prompt; T5: the
    encoder, the cross-attention keys and values and the first decoder step), ``lm_steps`` (the other
    ``new_tokens - 1`` steps), ``lm_head`` (the head, once per new token)."""
    if prompt_len < 1 or new_tokens < 1 or batch < 1:
        raise ValueError(f"product_flops: prompt_len, new_tokens and batch must be >= 1, got {prompt_len}, "
                         f"{new_tokens}, {batch}")
    v, q, text = config.vision_config, config.qformer_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    T, D = patches + 1, v.hidden_size  # image tokens: the patches and the class token
    vision = 2 * patches * 3 * v.patch_size ** 2 * D
    vision += v.num_hidden_layers * (2 * T * (4 * D * D + 2 * D * v.intermediate_size) + 4 * T * T * D)
    Q, Dq = config.num_query_tokens, q.hidden_size
    qformer = 0
    for layer in range(q.num_hidden_layers):
        qformer += 2 * Q * 4 * Dq * Dq + 4 * Q * Q * Dq + 2 * Q * 2 * Dq * q.intermediate_size
        if layer % q.cross_attention_frequency == 0:  # queries, output; keys and values of the image tokens
            qformer += 2 * Q * 2 * Dq * Dq + 2 * T * 2 * q.encoder_hidden_size * Dq + 4 * Q * T * Dq
    S, N = prompt_len, new_tokens
    if isinstance(text, OPTConfig):
        Dl = text.hidden_size  # BLIP-2's OPT models have no embedding projection (word_embed_proj_dim)
        per_token = text.num_hidden_layers * 2 * (4 * Dl * Dl + 2 * Dl * text.ffn_dim)
        prefill = S * per_token + text.num_hidden_layers * 4 * S * S * Dl
        # step k (1..N-1) feeds the token at position S + k - 1: it attends S + k keys
        steps = sum(per_token + text.num_hidden_layers * 4 * (S + k) * Dl for k in range(1, N))
        head = N * 2 * Dl * text.vocab_size
    else:
        Dl, inner = text.d_model, text.num_heads * text.d_kv
        ffn = (3 if text.is_gated_act else 2) * Dl * text.d_ff
        enc_layers, dec_layers = text.num_layers, text.num_decoder_layers or text.num_layers
        encoder = enc_layers * (S * 2 * (4 * Dl * inner + ffn) + 4 * S * S * inner)
        cross_kv = dec_layers * S * 2 * 2 * Dl * inner

        def step(j: int) -> int:  # decoder token j (0: the start token) attends j + 1 keys and the S encoder ones
            return dec_layers * (2 * (6 * Dl * inner + ffn) + 4 * (j + 1) * inner + 4 * S * inner)

        prefill = encoder + cross_kv + step(0)
        steps = sum(step(j) for j in range(1, N))
        head = N * 2 * Dl * text.vocab_size
    qformer += 2 * Q * Dq * Dl  # language projection
    return {k: batch * n for k, n in dict(vision=vision, qformer=qformer, lm_prefill=prefill, lm_steps=steps,
                                          lm_head=head).items()}


def floor_seconds(flops: dict[str, int], new_tokens: int, step_bytes: int, rate: float, bandwidth: float) -> float:
    """The fewest seconds a generate call of ``flops`` (``product_flops`` for ``new_tokens``) can take at
    ``rate`` FLOP/s when each decoding step also reads ``step_bytes`` of weights at ``bandwidth`` bytes/s: the
    prefill and the first token's head bound by arithmetic, each other step by arithmetic or memory, whichever
    is slower (the steps' FLOPs taken as even)."""
    head = flops["lm_head"] / new_tokens
    first = (flops["vision"] + flops["qformer"] + flops["lm_prefill"] + head) / rate
    return first + (new_tokens - 1) * step_floor_seconds(flops, new_tokens, step_bytes, rate, bandwidth)


def step_floor_seconds(flops: dict[str, int], new_tokens: int, step_bytes: int, rate: float,
                       bandwidth: float) -> float:
    """The fewest seconds one decoding step after the first token can take (``floor_seconds``' per-step term):
    its products at ``rate`` or its ``step_bytes`` of weights at ``bandwidth``, whichever is slower; 0 when
    ``new_tokens`` leaves no step. At one row this is the memory-bandwidth bound."""
    steps = new_tokens - 1
    if not steps:
        return 0.0
    return max((flops["lm_steps"] / steps + flops["lm_head"] / new_tokens) / rate, step_bytes / bandwidth)


def matmul_rate(n: int = 1536, device: torch.device | str = "cpu", tries: int = 3,
                dtype: torch.dtype = torch.float32) -> Callable[[], float]:
    """A function that multiplies two ``n`` x ``n`` ``dtype`` matrices ``tries`` times and returns the best rate,
    floating-point operations per second: what this device's matrix products reach at best, measured next to
    what it bounds (the best, as ``copy_bandwidth``: a product that lost its core says nothing of the core)."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)

    def measure() -> float:
        best = float("inf")
        for _ in range(tries):
            _sync(dev)
            t = time.perf_counter()
            torch.mm(a, b)
            _sync(dev)
            best = min(best, time.perf_counter() - t)
        return 2 * n ** 3 / best

    return measure


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(fns: dict[str, Callable[[], object]], repeats: int,
               device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds of each call, ``repeats`` rounds that call every function once in turn (so a change in the
    machine's load hits all of them alike). One untimed warm-up round first."""
    device = torch.device(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            if r:
                times[name].append(time.perf_counter() - t)
    return times


def copy_bandwidth(nbytes: int = 256 * 2**20, device: torch.device | str = "cpu",
                   tries: int = 3) -> Callable[[], float]:
    """A function that copies ``nbytes`` ``tries`` times and returns the best bandwidth, bytes (read +
    written) per second; call it next to what it bounds. The best, not the median: the bound is what the
    memory can do, and a copy that lost its core for a moment says nothing about that. Large enough to
    miss every cache."""
    dev = torch.device(device)
    src = torch.ones(nbytes // 4, device=dev)
    dst = torch.zeros_like(src)  # written once here, so no copy pays the page faults

    def measure() -> float:
        best = float("inf")
        for _ in range(tries):
            _sync(dev)
            t = time.perf_counter()
            dst.copy_(src)
            _sync(dev)
            best = min(best, time.perf_counter() - t)
        return 2 * nbytes / best

    return measure


def apply_fast_path(model: Blip2ForConditionalGeneration, fast: str, compile: bool = False,
                    **compile_kwargs: Any) -> Blip2ForConditionalGeneration:
    """The model with fast path ``fast`` (one of ``FAST_PATHS``) and, if asked, its decoding step compiled."""
    if fast not in (*FAST_PATHS, "plain"):
        raise ValueError(f"fast path {fast!r}: expected one of {FAST_PATHS}")
    if fast != "plain":
        apply_fast(model, fast)
    if compile:
        compile_decoding(model, **compile_kwargs)
    return model


def decode_inputs(config: Blip2Config, batch: int, device: torch.device | str = "cpu",
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixel_values, input_ids, attention_mask) for captioning with no prompt, as the processor lays it
    out: random pixels; the image tokens, then BOS (OPT) or the empty text's ``</s>`` (T5)."""
    g = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g).to(device)
    text = config.text_config
    start = [config.image_token_index] * config.num_query_tokens if config.image_token_index is not None else []
    start.append(text.bos_token_id if config.use_decoder_only_language_model else text.eos_token_id)
    ids = torch.tensor([start] * batch, device=device)
    return pixels, ids, torch.ones_like(ids)


@torch.no_grad()
def time_decode_step(model: Blip2ForConditionalGeneration, batch: int, steps: int,
                     bandwidth: Callable[[], float] | None = None) -> tuple[float, float | None]:
    """Median seconds of one greedy decoding step at ``batch`` rows (after a prefill over the image queries
    and two untimed steps; ``step_greedy`` where the decoder has it, as ``generate`` uses it), and the best
    copy bandwidth measured between the steps."""
    cfg = model.config
    pixels, ids, mask = decode_inputs(cfg, batch, model.device)
    _, _, lm_inputs = model.image_to_lm_inputs(pixels)
    embeds, mask = model.merge_image_inputs(lm_inputs, ids, mask)
    decoder = model.language_model.start_decoding(embeds, mask, expand=1, max_new_tokens=steps + 3)
    tokens = decoder.prefill().argmax(-1)
    greedy = getattr(decoder, "step_greedy", None)

    def step(tokens: Tensor) -> Tensor:
        return greedy(tokens, None) if greedy is not None else decoder.step(tokens).argmax(-1)

    for _ in range(2):  # warm-up: a compiled step compiles here
        tokens = step(tokens)
    times, bws = [], []
    for _ in range(steps):
        if bandwidth is not None:
            bws.append(bandwidth())
        _sync(model.device)
        t = time.perf_counter()
        tokens = step(tokens)
        _sync(model.device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), max(bws) if bws else None


def _load(model: str | None, preset: str | None, dtype: torch.dtype | None,
          device: str) -> Blip2ForConditionalGeneration:
    if model is not None:
        return Blip2ForConditionalGeneration.from_pretrained(model, dtype=dtype, device=device)
    torch.manual_seed(0)
    with torch.device(device):
        m = Blip2ForConditionalGeneration(Blip2Config.from_dict(PRESETS[preset]))
    if dtype is not None:  # cast the way from_pretrained does: the Q-Former stays fp32
        for name, p in m.named_parameters():
            if p.is_floating_point() and not m.keeps_fp32(name, dtype):
                p.data = p.data.to(dtype)
    return m.eval()


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.0f} MB" if nbytes >= 10**7 else f"{nbytes / 1e3:.0f} kB"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip2 bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="DIR_OR_HUB_ID", help="a checkpoint to time")
    src.add_argument("--preset", choices=sorted(PRESETS), default="opt-125m",
                     help="a random model of this size (default: opt-125m)")
    add_dtype_option(p, default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_fast_option(p, default="fuse")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding step: for one row to time decoding, then for --batch rows to time "
                        "captioning (minutes on a small CPU)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the decoding step as a CUDA graph (cuda_graph(); CUDA only)")
    p.add_argument("--batch", type=int, default=8, help="images per captioning batch (default: 8)")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens generated per image (default: 24)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is kept (default: 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's; on a shared machine 1 is the stable choice)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    graph_option = "--fast cuda-graph" if args.fast == "cuda-graph" else "--cuda-graph"
    if args.fast == "cuda-graph":  # as in the other commands: fuse, and the decoding step as a CUDA graph
        args.fast, args.cuda_graph = "fuse", True
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda_graph and not args.device.startswith("cuda"):
        p.error(f"{graph_option} needs a CUDA device, got --device {args.device}")
    dtype = resolve_dtype(args.dtype, torch.device(args.device))
    model = apply_fast_path(_load(args.model, None if args.model else args.preset, dtype, args.device),
                            args.fast, args.compile)
    if args.cuda_graph:
        cuda_graph(model)
    device = torch.device(args.device)
    n = torch.get_num_threads()
    where = f"{device.type}" + (f", {n} thread{'s' if n != 1 else ''}" if device.type == "cpu" else
                                f", {torch.cuda.get_device_name(device)}")
    print(f"model: {args.model or 'preset ' + args.preset} | {where} | dtype {args.dtype} | "
          f"fast path {args.fast}{' + compile' if args.compile else ''}{' + cuda_graph' if args.cuda_graph else ''}")

    if device.type == "cpu" and (args.compile or args.fast == "native"):
        from blip2.fast import kernels
        from blip2.fast.native import NativeOPTStep, NativeT5Step

        step = model.language_model.decode_step
        if isinstance(step, (NativeOPTStep, NativeT5Step)):
            print(f"decoding step: native (blip2.fast.kernels, the whole decoder in one call per token, "
                  f"{'any number of rows' if step.batched else 'one row; batches: the fallback step'})")
        else:
            print(f"decoding step: compiled; native kernels for its products: "
                  f"{'loaded' if kernels.ready() else 'not used, ' + kernels.status()}")
    nbytes = decode_bytes_per_token(model)
    step, bw = time_decode_step(model, 1, 16, copy_bandwidth(device=device))
    bound = nbytes / bw
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write); language-model weights read per token "
          f"{_size(nbytes)}: at least {bound * 1e3:.2f} ms per token")
    print(f"decoding, batch 1: {step * 1e3:.1f} ms per token = {1 / step:.1f} tokens/s = "
          f"{100 * bound / step:.0f}% of the bandwidth bound")

    pixels, ids, mask = decode_inputs(model.config, args.batch, device)
    n = args.new_tokens
    if args.compile and args.batch > 1:  # the captioning batch gets the layout for its rows
        compile_decoding(model, args.batch)
        if args.cuda_graph:  # compile_decoding put its own step in
            cuda_graph(model)

    def caption() -> None:
        model.generate(pixels, ids, mask, max_new_tokens=n, min_new_tokens=n)

    t = statistics.median(interleave({"caption": caption}, args.repeats, device)["caption"])
    print(f"captioning, batch {args.batch}, {n} new tokens: {t:.2f} s per batch = {args.batch / t:.1f} images/s "
          f"= {args.batch * n / t:.0f} tokens/s")
    return 0

"""Autoregressive decoding: greedy, multinomial sampling, beam search.

The loop is model-agnostic: a language model hands out a ``Decoder`` (prefill the prompt, feed one token,
reorder rows for beam search) and ``generate`` decides which tokens to feed. The tokens chosen are the ones
``transformers`` 5.x ``generate`` chooses for the same logits and settings (beam search included, down to
which hypotheses are returned in which order); random draws in sampling come from our own generator.

Shapes: B prompts, N = B * expand decoding rows, P prefix length, V vocabulary, nb = num_beams.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Decoder", "GenerationConfig", "generate", "generated_texts"]

GENERATION_CONFIG_NAME = "generation_config.json"

# transformers masks out candidates by adding this (not -inf), which decides ties among them: we do the same
_MASKED = -1.0e9


class Decoder(Protocol):
    def prefill(self) -> Tensor:
        """Logits [N, V] (float32) for the first new token."""
        ...

    def step(self, tokens: Tensor) -> Tensor:
        """Append ``tokens`` [N]; logits [N, V] (float32) for the next token."""
        ...

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` [N] (beam search), in place."""
        ...

    # Optional: ``step_greedy(tokens, banned) -> next tokens [N]``, the argmax of what ``step(tokens)`` would
    # return with the ids ``banned`` (or none) at -inf, without the whole logits where a model can do it
    # faster (blip2.fast.native's screened head). Greedy decoding without a repetition penalty uses it.


def masked_argmax(logits: Tensor, banned: Tensor | None) -> Tensor:
    """The greedy choice over ``logits`` [N, V] with the ids ``banned`` at -inf (the logits processor's)."""
    if banned is not None:
        logits = logits.index_fill(1, banned, -float("inf"))
    return logits.argmax(-1)


def greedy_step(step: Callable[..., Tensor], banned: Tensor | None) -> Callable[..., Tensor]:
    """A decoding step's stand-in that returns the next greedy tokens [N] instead of the logits: the step's own
    ``greedy(banned, *args)`` where it has one (a speed-up may pick tokens without the whole head), else the
    argmax of its logits. The decoders' ``step_greedy`` run it."""
    greedy = getattr(step, "greedy", None)
    if greedy is not None:
        return lambda *args: greedy(banned, *args)
    return lambda *args: masked_argmax(step(*args), banned)


@dataclass
class GenerationConfig:
    """Decoding settings, with the field names and defaults of ``transformers.GenerationConfig``.

    ``generation_config.json`` holds only the keys set on purpose: ``from_dict`` remembers which keys a file
    had, ``to_dict`` writes those plus every field that differs from its default, plus unknown keys (kept
    in ``extra``). ``seed`` is ours: it seeds the sampler's own ``torch.Generator``.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens; 20 new tokens when neither is set
    min_new_tokens: int | None = None
    min_length: int | None = None  # prompt + new tokens
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    seed: int | None = None

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # fields read from a file or set through `replace`: written back even when equal to the default
    _explicit: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping: expected True, False or 'never', got {self.early_stopping!r}")
        for name in ("num_beams", "num_return_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def _fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_") and f.name != "extra"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationConfig:
        known = cls._fields()
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        extra = {k: v for k, v in d.items() if k not in known and k != "transformers_version"}
        cfg = cls(**kwargs)
        cfg.extra = extra
        cfg._explicit = set(kwargs)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.extra)
        for name, f in self._fields().items():
            value = getattr(self, name)
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if name in self._explicit or value != default:
                out[name] = copy.deepcopy(value)
        return out

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with ``changes`` applied (they count as set on purpose, so they are written out)."""
        new = dataclasses.replace(self, **changes)
        new.extra = copy.deepcopy(self.extra)
        new._explicit = self._explicit | set(changes)
        return new

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GenerationConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GenerationConfig:
        return cls.from_json_file(os.path.join(directory, GENERATION_CONFIG_NAME))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(os.path.join(directory, GENERATION_CONFIG_NAME))


# -- logits processing ----------------------------------------------------------------------------------


class _Processor:
    """Everything ``transformers`` does to the scores before choosing, in its order: repetition penalty,
    minimum length, then (sampling only) temperature, top-k, top-p."""

    def __init__(self, cfg: GenerationConfig, prefix: Tensor, prefix_mask: Tensor | None, expand: int,
                 eos: Tensor | None, min_length: int, min_tokens_to_keep: int) -> None:
        self.cfg, self.eos, self.min_length, self.keep = cfg, eos, min_length, min_tokens_to_keep
        self.seen: Tensor | None = None  # [N, V] bool: ids the repetition penalty applies to
        self.prefix = prefix.repeat_interleave(expand, 0)  # [N, P]
        self.ignore = None
        if cfg.repetition_penalty != 1.0 and prefix_mask is not None:
            # transformers leaves the left padding of the prompt out of the penalty
            self.ignore = (prefix_mask != 0).int().argmax(1).repeat_interleave(expand, 0)  # [N]

    def _init_seen(self, V: int) -> Tensor:
        ids = self.prefix
        keep = ids < V  # ids beyond the logits (none in practice) cannot be generated anyway
        if self.ignore is not None:
            keep &= torch.arange(ids.shape[1], device=ids.device)[None] >= self.ignore[:, None]
        seen = torch.zeros(ids.shape[0], V + 1, dtype=torch.bool, device=ids.device)
        seen.scatter_(1, torch.where(keep, ids, V), True)  # column V collects what is left out
        return seen[:, :V].contiguous()

    def add(self, tokens: Tensor, rows: Tensor | None = None) -> None:
        """Record ``tokens`` [N] as generated, after keeping rows ``rows`` (beam search)."""
        if self.seen is None:
            return
        if rows is not None:
            self.seen = self.seen[rows]
        self.seen[torch.arange(tokens.shape[0], device=tokens.device), tokens] = True

    def banned(self, length: int) -> Tensor | None:
        """The ids greedy decoding without a repetition penalty sets to -inf at ``length`` tokens so far
        (what ``__call__`` does then), or None."""
        return self.eos if self.eos is not None and length < self.min_length else None

    def __call__(self, scores: Tensor, length: int) -> Tensor:
        # scores [N, V] float32; length = tokens so far (prefix + generated)
        cfg = self.cfg
        if cfg.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = self._init_seen(scores.shape[1])
            p = cfg.repetition_penalty
            scores = torch.where(self.seen, torch.where(scores < 0, scores * p, scores / p), scores)
        banned = self.banned(length)
        if banned is not None:
            scores = scores.index_fill(1, banned, -float("inf"))
        if not cfg.do_sample:
            return scores
        if cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        if cfg.top_k:
            k = min(max(cfg.top_k, self.keep), scores.shape[-1])
            kth = torch.topk(scores, k).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        return top_p_filter(scores, cfg.top_p, self.keep)


def top_p_filter(scores: Tensor, top_p: float, keep: int = 1) -> Tensor:
    """Nucleus filtering: ``scores`` [N, V] with the least likely tokens that together hold ``1 - top_p`` of the
    probability set to -inf (the ``keep`` most likely always stay)."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    drop = cumulative <= 1 - top_p
    drop[:, -keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))


# -- generate -------------------------------------------------------------------------------------------


def _lengths(cfg: GenerationConfig, P: int) -> tuple[int, int]:
    """(max new tokens, min total length), resolved as transformers does."""
    if cfg.max_new_tokens is not None:
        max_new = cfg.max_new_tokens
    elif cfg.max_length is not None:
        max_new = cfg.max_length - P
    else:
        max_new = 20
    if max_new < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={cfg.max_new_tokens}, max_length={cfg.max_length}, "
                         f"prefix length {P}")
    min_length = P + cfg.min_new_tokens if cfg.min_new_tokens is not None else (cfg.min_length or 0)
    return max_new, min_length


def generate(
    start: Callable[[int, int], Decoder],
    prefix_ids: Tensor,
    config: GenerationConfig,
    *,
    prefix_mask: Tensor | None = None,
    streamer: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Generate after ``prefix_ids`` [B, P]; returns [B * num_return_sequences, P + n_new].

    ``start(expand, max_new_tokens)`` builds the decoder with every prompt repeated ``expand`` times.
    ``prefix_ids`` are the ids transformers sees as already generated (decoder-only: the prompt with its
    image and pad tokens; encoder-decoder: the decoder start token); they feed the repetition penalty and
    are returned in front of the new tokens. ``prefix_mask`` [B, P] (the prompt's attention mask) leaves
    the left padding out of the repetition penalty, as transformers does. Rows that finish are padded with
    ``pad_token_id`` (beam search: with ``pad_token_id or eos_token_id[0]``, the reference's fill).
    ``streamer`` (greedy and sampling only) gets the new tokens [B * num_return_sequences] of every step.
    """
    cfg = config
    n = cfg.num_return_sequences
    if (cfg.num_beams == 1 and not cfg.do_sample and n > 1) or (cfg.num_beams > 1 and n > cfg.num_beams):
        raise ValueError(f"num_return_sequences={n} needs num_beams >= {n}, or sampling with num_beams=1")
    if cfg.num_beams > 1 and streamer is not None:
        raise ValueError("streaming is not supported with beam search (hypotheses change until the end)")
    P = prefix_ids.shape[1]
    max_new, min_length = _lengths(cfg, P)
    expand = max(cfg.num_beams, n)
    decoder = start(expand, max_new)
    logits = decoder.prefill()  # [B * expand, V]
    dev = logits.device  # everything follows the model's device
    prefix_ids = prefix_ids.to(dev)
    if prefix_mask is not None:
        prefix_mask = prefix_mask.to(dev)
    eos = None
    if cfg.eos_token_id is not None:
        ids = [cfg.eos_token_id] if isinstance(cfg.eos_token_id, int) else list(cfg.eos_token_id)
        eos = torch.tensor(ids, dtype=torch.long, device=dev)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None or eos is None else int(eos[0])

    generator = None
    if cfg.do_sample:
        generator = torch.Generator(device=dev)
        if cfg.seed is not None:
            generator.manual_seed(cfg.seed)
        else:
            generator.seed()

    # sampling with beams keeps enough tokens for one beam to continue past every eos
    keep = 1 if cfg.num_beams == 1 else (2 if eos is None else len(eos) + 1)
    process = _Processor(cfg, prefix_ids, prefix_mask, expand, eos, min_length, keep)
    if cfg.num_beams == 1:
        return _sample(decoder, logits, prefix_ids.repeat_interleave(expand, 0), max_new, process, eos, pad,
                       generator, streamer)
    return _beam_search(decoder, logits, prefix_ids, cfg, max_new, process, eos, pad, generator)


def generated_texts(processor: Any, sequences: Tensor, prompt_ids: Tensor | None, decoder_only: bool) -> list[str]:
    """The text a model's ``generate`` added to each row, stripped: ``sequences`` [B, L] is the prompt
    ``prompt_ids`` [B, P] then the new tokens for a decoder-only model, the decoder start token then them for
    an encoder-decoder one (which may have had no prompt). ``processor``: anything with ``batch_decode``."""
    new = sequences[:, prompt_ids.shape[1]:] if decoder_only else sequences[:, 1:]
    return [t.strip() for t in processor.batch_decode(new.cpu(), skip_special_tokens=True)]


def _sample(decoder: Decoder, logits: Tensor, prefix: Tensor, max_new: int, process: _Processor,
            eos: Tensor | None, pad: int | None, generator: torch.Generator | None,
            streamer: Callable[[Tensor], None] | None) -> Tensor:
    """Greedy (argmax) or multinomial sampling from the prefill's logits [N, V]; prefix [N, P] -> [N, P + n_new]."""
    N, P = prefix.shape
    out = torch.empty(N, P + max_new, dtype=torch.long, device=prefix.device)
    out[:, :P] = prefix
    unfinished = torch.ones(N, dtype=torch.bool, device=prefix.device)
    # greedy with no processor but the minimum length's ban of eos: the decoder may pick the tokens itself
    step_greedy = getattr(decoder, "step_greedy", None) if generator is None and \
        process.cfg.repetition_penalty == 1.0 else None
    chosen: Tensor | None = None  # the next tokens, where step_greedy chose them
    for i in range(max_new):
        if chosen is not None:
            tokens = chosen
        else:
            scores = process(logits, P + i)  # [N, V]
            if generator is not None:
                tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                tokens = scores.argmax(-1)
        if eos is not None:
            tokens = torch.where(unfinished, tokens, pad)
            unfinished &= ~torch.isin(tokens, eos)
        out[:, P + i] = tokens
        process.add(tokens)
        if streamer is not None:
            streamer(tokens)
        if i + 1 == max_new or not unfinished.any():
            break
        if step_greedy is not None:
            chosen = step_greedy(tokens, process.banned(P + i + 1))
        else:
            logits = decoder.step(tokens)
    return out[:, :P + i + 1]


def _beam_search(decoder: Decoder, logits: Tensor, prefix: Tensor, cfg: GenerationConfig, max_new: int,
                 process: _Processor, eos: Tensor | None, pad: int | None,
                 generator: torch.Generator | None) -> Tensor:
    """Beam search (or beam sampling), step for step the algorithm of transformers 5.x ``_beam_search``.

    Each step ranks every (beam, token) continuation by summed log-probability and keeps the best
    K = max(2, 1 + n_eos) * nb, so that nb of them can continue even if the best ones all end. Of the K:
    the best nb that did not end become the running beams; those among the first nb (not all K) that
    ended are scored sum / (generated length incl. eos) ** length_penalty and merged into the nb finished
    hypotheses of the prompt. The search stops when no prompt can improve its finished set (see
    ``_can_improve``), when every hypothesis of every prompt is finished and early_stopping is True, or at
    max length, where the running beams are finished as they are."""
    B, P = prefix.shape
    nb = cfg.num_beams
    dev = prefix.device
    K = max(2, 1 + (0 if eos is None else len(eos))) * nb
    L = P + max_new
    lp, es = cfg.length_penalty, cfg.early_stopping
    # positions past a hypothesis' end; `pad or eos[0]`, so a pad id of 0 (T5) gives eos (a reference quirk)
    fill = (pad or int(eos[0])) if eos is not None else -1

    running = torch.full((B, nb, L), fill, dtype=torch.long, device=dev)
    running[:, :, :P] = prefix[:, None]
    running_scores = torch.zeros(B, nb, device=dev)
    running_scores[:, 1:] = _MASKED  # all beams start equal: only the first may spread at step one
    done = running.clone()  # finished hypotheses [B, nb, L], best first
    done_scores = torch.full((B, nb), _MASKED, device=dev)
    done_len = torch.zeros(B, nb, dtype=torch.long, device=dev)  # new tokens of each, eos included
    is_done = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
    first_nb = torch.arange(K, device=dev) < nb
    row_offset = torch.arange(B, device=dev)[:, None] * nb

    cur = P  # tokens so far
    while True:
        V = logits.shape[-1]
        log_probs = process(F.log_softmax(logits, -1), cur)  # [B * nb, V]
        total = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        top, idx = _top_continuations(total, K, generator)  # [B, K]
        beam, tokens = idx // V, idx % V
        cand = running.gather(1, beam[:, :, None].expand(B, K, L)).clone()  # [B, K, L]
        cand[:, :, cur] = tokens
        ended = torch.isin(tokens, eos) if eos is not None else torch.zeros_like(tokens, dtype=torch.bool)
        if cur + 1 >= L:
            ended = torch.ones_like(ended)

        # the best nb continuations that did not end keep running
        live = top + ended.float() * _MASKED
        pick = torch.topk(live, nb).indices  # [B, nb]
        running = cand.gather(1, pick[:, :, None].expand(B, nb, L))
        running_scores = live.gather(1, pick)
        src_rows = (beam.gather(1, pick) + row_offset).flatten()  # decoder rows they came from

        # the ended ones among the first nb may join the finished hypotheses
        just_done = ended & first_nb
        scores = top / ((cur + 1 - P) ** lp)
        scores += (is_done.all(-1, keepdim=True) & (es is True)).float() * _MASKED
        scores += (~can_improve).float() * _MASKED
        scores += (~just_done) * _MASKED
        merged = torch.topk(torch.cat([done_scores, scores], 1), nb).indices  # [B, nb]
        done = torch.cat([done, cand], 1).gather(1, merged[:, :, None].expand(B, nb, L))
        done_scores = torch.cat([done_scores, scores], 1).gather(1, merged)
        cand_len = torch.full((B, K), cur + 1 - P, dtype=torch.long, device=dev)
        done_len = torch.cat([done_len, cand_len], 1).gather(1, merged)
        is_done = torch.cat([is_done, just_done], 1).gather(1, merged)

        cur += 1
        can_improve = can_improve & _can_improve(running_scores, done_scores, is_done, cur - P, max_new, lp, es)
        if not can_improve.any() or (is_done.all() and es is True) or ended.all():
            break
        process.add(running[:, :, cur - 1].flatten(), src_rows)
        decoder.reorder(src_rows)
        logits = decoder.step(running[:, :, cur - 1].flatten())

    n = cfg.num_return_sequences
    out_len = P + int(done_len[:, :n].max())
    return done[:, :n, :out_len].reshape(B * n, out_len)


def _top_continuations(total: Tensor, k: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The ``k`` best continuations of ``total`` [B, nb * V] (beam sampling: ``k`` drawn without replacement),
    best first: (their scores, their flat indices), each [B, k]."""
    if generator is None:
        return torch.topk(total, k)
    idx = torch.multinomial(total.softmax(-1), k, generator=generator)
    top, order = total.gather(1, idx).sort(-1, descending=True)
    return top, idx.gather(1, order)


def _can_improve(running_scores: Tensor, done_scores: Tensor, is_done: Tensor, n_new: int, max_new: int,
                 lp: float, es: bool | str) -> Tensor:
    """[B, 1]: can the best running beam still beat the worst finished hypothesis?

    Only decided once all nb hypotheses are finished. The best beam is scored as if it ended now
    (early_stopping False), or at max length when early_stopping is "never" and length_penalty > 0 (the
    longest is then the best it can do). With early_stopping True this check is moot: a prompt with nb
    finished hypotheses takes no more."""
    length = max_new if es == "never" and lp > 0.0 else n_new
    best = running_scores[:, :1] / (length**lp)
    worst = torch.where(is_done, done_scores.min(1, keepdim=True).values, _MASKED)
    return (best > worst).any(-1, keepdim=True)

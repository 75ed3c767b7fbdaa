"""Autoregressive decoding: greedy, multinomial sampling, beam search.

The loop is model-agnostic: a language model hands out a ``Decoder`` (prefill the prompt, feed one token,
reorder rows for beam search) and ``generate`` decides which tokens to feed. The tokens chosen are the ones
``transformers`` 5.x ``generate`` chooses for the same logits and settings (beam search included, down to
which hypotheses are returned in which order); sampling draws from torch's global generator, as
transformers does, or from its own one when the config has a ``seed``. The settings and their defaults are
``generation_config``'s, the processing of the scores ``logits_processing``'s.

Shapes: B prompts, N = B * expand decoding rows, P prefix length, V vocabulary, nb = num_beams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from blip2.generation_config import GenerationConfig, resolve
from blip2.logits_processing import ScoreProcessor, callables

__all__ = ["Decoder", "GenerateOutput", "GenerationConfig", "generate", "generated_texts", "length_limits", "resolve"]

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
    # faster (blip2.fast.native's screened head). Greedy decoding uses it where its processing only bans ids.


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


# -- one call -------------------------------------------------------------------------------------------


@dataclass
class GenerateOutput:
    """``generate(..., return_dict_in_generate=True)``: transformers' ``GenerateDecoderOnlyOutput`` /
    ``GenerateBeamDecoderOnlyOutput`` fields (their encoder-decoder twins have the same ones). Attribute,
    key (``out["sequences"]``) and index access, ``keys()`` and ``to_tuple()`` see the fields that are set.

    sequences [N, L]; scores: one [N, V] per step, the processed scores (beam search: log-probabilities)
    with ``output_scores``; logits: one [N, V] per step, the raw ones, with ``output_logits``; beam search
    also gives sequences_scores [N] (with ``output_scores``) and beam_indices [N, L - P] (the row each token
    came from, -1 past the end)."""

    sequences: Tensor
    sequences_scores: Tensor | None = None
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None
    beam_indices: Tensor | None = None

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()


@dataclass
class _Call:
    """One generate call's settings and hooks, as the search loops use them."""

    cfg: GenerationConfig
    process: ScoreProcessor
    eos: Tensor | None
    pad: int | None
    generator: torch.Generator | None  # sampling with a seed; None: torch's global generator
    criteria: list[Callable[..., Any]]  # the caller's stopping criteria
    streamer: Any
    scores: list[Tensor] | None  # collected for output_scores
    logits: list[Tensor] | None  # collected for output_logits

    def record(self, logits: Tensor, scores: Tensor) -> None:
        if self.scores is not None:
            self.scores.append(scores)
        if self.logits is not None:
            self.logits.append(logits)

    def ended(self, ids: Tensor) -> Tensor:
        """[N] bool: the rows of ``ids`` [N, L] that end with their last token (eos, or a stopping criterion)."""
        done = torch.isin(ids[:, -1], self.eos) if self.eos is not None else \
            torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        # transformers hands the criteria the scores collected so far (a tuple with output_scores, else None)
        scores = tuple(self.scores) if self.scores is not None else None
        for criterion in self.criteria:
            done = done | torch.as_tensor(criterion(ids, scores), device=ids.device).bool()
        return done

    def draw(self, probs: Tensor, k: int) -> Tensor:
        return torch.multinomial(probs, k, generator=self.generator)


def length_limits(cfg: GenerationConfig, P: int) -> tuple[int, int]:
    """(max new tokens, min total length) after a prefix of ``P`` ids, resolved as transformers does."""
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


def _check_streamer(streamer: Any, cfg: GenerationConfig) -> None:
    if streamer is None:
        return
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer: expected an object with put(token_ids) and end() (transformers' TextStreamer, "
                        f"TextIteratorStreamer, ...), got {type(streamer).__name__}")
    if cfg.num_beams > 1:
        raise ValueError("streaming is not supported with beam search (hypotheses change until the end)")


def generate(
    start: Callable[[int, int], Decoder],
    prefix_ids: Tensor,
    config: GenerationConfig,
    *,
    prefix_mask: Tensor | None = None,
    streamer: Any = None,
    logits_processor: Sequence[Callable[..., Tensor]] | None = None,
    stopping_criteria: Sequence[Callable[..., Any]] | None = None,
) -> Tensor | GenerateOutput:
    """Generate after ``prefix_ids`` [B, P]; returns [B * num_return_sequences, P + n_new] (a
    ``GenerateOutput`` with ``return_dict_in_generate``). ``config``'s unset fields take transformers' defaults.

    ``start(expand, max_new_tokens)`` builds the decoder with every prompt repeated ``expand`` times.
    ``prefix_ids`` are the ids transformers sees as already generated (decoder-only: the prompt with its
    image and pad tokens; encoder-decoder: the decoder start token); the processors read them and they are
    returned in front of the new tokens. ``prefix_mask`` [B, P] (the prompt's attention mask) leaves the
    left padding out of the repetition penalty, as transformers does. Rows that finish are padded with
    ``pad_token_id`` (beam search: with ``pad_token_id or eos_token_id[0]``, the reference's fill).

    transformers' hooks: ``streamer`` (greedy and sampling) gets ``put(prefix [N, P])``, ``put(tokens [N])``
    each step, then ``end()``; ``logits_processor``: callables ``(input_ids [N, L], scores [N, V]) -> scores``
    run after the built-in processing (before sampling's warping); ``stopping_criteria``: callables
    ``(input_ids, scores) -> [N] bool`` (or a bool) that end rows.
    """
    cfg = resolve(config)
    n = cfg.num_return_sequences
    if (cfg.num_beams == 1 and not cfg.do_sample and n > 1) or (cfg.num_beams > 1 and n > cfg.num_beams):
        raise ValueError(f"num_return_sequences={n} needs num_beams >= {n}, or sampling with num_beams=1")
    _check_streamer(streamer, cfg)
    user = callables(logits_processor, "logits_processor")
    criteria = callables(stopping_criteria, "stopping_criteria")
    P = prefix_ids.shape[1]
    max_new, min_length = length_limits(cfg, P)
    expand = max(cfg.num_beams, n)
    if streamer is not None:
        streamer.put(prefix_ids.repeat_interleave(expand, 0).cpu())
    decoder = start(expand, max_new)
    logits = decoder.prefill()  # [B * expand, V]
    dev = logits.device  # everything follows the model's device
    prefix_ids = prefix_ids.to(dev)
    eos = None
    if cfg.eos_token_id is not None:
        ids = [cfg.eos_token_id] if isinstance(cfg.eos_token_id, int) else list(cfg.eos_token_id)
        eos = torch.tensor(ids, dtype=torch.long, device=dev)
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=dev).manual_seed(cfg.seed)
    # sampling with beams keeps enough tokens for one beam to continue past every eos
    keep = 1 if cfg.num_beams == 1 else (2 if eos is None else len(eos) + 1)
    process = ScoreProcessor(cfg, eos=eos, min_length=min_length, keep=keep, expand=expand, user=user,
                             prefix_mask=None if prefix_mask is None else prefix_mask.to(dev),
                             vocab_size=logits.shape[-1], device=dev)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None or eos is None else int(eos[0])
    call = _Call(cfg, process, eos, pad, generator, criteria, streamer,
                 scores=[] if cfg.return_dict_in_generate and cfg.output_scores else None,
                 logits=[] if cfg.return_dict_in_generate and cfg.output_logits else None)
    if cfg.num_beams == 1:
        try:
            out = GenerateOutput(_sample(decoder, logits, prefix_ids.repeat_interleave(expand, 0), max_new, call))
        finally:  # also on an error, so that a reader of the streamer (another thread) is not left waiting
            if streamer is not None:
                streamer.end()
    else:
        sequences, sequences_scores, beam_indices = _beam_search(decoder, logits, prefix_ids, max_new, call)
        out = GenerateOutput(sequences, sequences_scores if cfg.output_scores else None, beam_indices=beam_indices)
    if not cfg.return_dict_in_generate:
        return out.sequences
    out.scores = None if call.scores is None else tuple(call.scores)
    out.logits = None if call.logits is None else tuple(call.logits)
    return out


def generated_texts(processor: Any, sequences: Tensor, prompt_ids: Tensor | None, decoder_only: bool) -> list[str]:
    """The text a model's ``generate`` added to each row, stripped: ``sequences`` [B, L] is the prompt
    ``prompt_ids`` [B, P] then the new tokens for a decoder-only model, the decoder start token then them for
    an encoder-decoder one (which may have had no prompt). ``processor``: anything with ``batch_decode``."""
    new = sequences[:, prompt_ids.shape[1]:] if decoder_only else sequences[:, 1:]
    return [t.strip() for t in processor.batch_decode(new.cpu(), skip_special_tokens=True)]


# -- search ---------------------------------------------------------------------------------------------


def _sample(decoder: Decoder, logits: Tensor, prefix: Tensor, max_new: int, call: _Call) -> Tensor:
    """Greedy (argmax) or multinomial sampling from the prefill's logits [N, V]; prefix [N, P] -> [N, P + n_new]."""
    N, P = prefix.shape
    out = torch.empty(N, P + max_new, dtype=torch.long, device=prefix.device)
    out[:, :P] = prefix
    unfinished = torch.ones(N, dtype=torch.bool, device=prefix.device)
    # greedy whose processing only bans fixed ids, with no scores to return: the decoder may pick the tokens
    # itself (a speed-up may do so without the whole logits); anything else takes the logits
    plain = call.cfg.do_sample or not call.process.bans_only or call.scores is not None or call.logits is not None
    step_greedy = None if plain else getattr(decoder, "step_greedy", None)
    chosen: Tensor | None = None  # the next tokens, where step_greedy chose them
    for i in range(max_new):
        if chosen is not None:
            tokens = chosen
        else:
            scores = call.process(out[:, :P + i], logits)  # [N, V]
            call.record(logits, scores)
            tokens = call.draw(scores.softmax(-1), 1).squeeze(1) if call.cfg.do_sample else scores.argmax(-1)
        if call.eos is not None:
            tokens = torch.where(unfinished, tokens, call.pad)
        out[:, P + i] = tokens
        unfinished &= ~call.ended(out[:, :P + i + 1])
        if call.streamer is not None:
            call.streamer.put(tokens.cpu())
        if i + 1 == max_new or not unfinished.any():
            break
        if step_greedy is not None:
            chosen = step_greedy(tokens, call.process.banned(P + i + 1))
        else:
            logits = decoder.step(tokens)
    return out[:, :P + i + 1]


def _beam_search(decoder: Decoder, logits: Tensor, prefix: Tensor, max_new: int,
                 call: _Call) -> tuple[Tensor, Tensor, Tensor]:
    """Beam search (or beam sampling), step for step the algorithm of transformers 5.x ``_beam_search``:
    (sequences [B * n, L], their scores [B * n], beam indices [B * n, L - P]).

    Each step ranks every (beam, token) continuation by summed log-probability and keeps the best
    K = max(2, 1 + n_eos) * nb, so that nb of them can continue even if the best ones all end. Of the K:
    the best nb that did not end become the running beams; those among the first nb (not all K) that
    ended are scored sum / (generated length incl. eos) ** length_penalty and merged into the nb finished
    hypotheses of the prompt. The search stops when no prompt can improve its finished set (see
    ``_can_improve``), when every hypothesis of every prompt is finished and early_stopping is True, or at
    max length, where the running beams are finished as they are."""
    cfg, eos, dev = call.cfg, call.eos, prefix.device
    (B, P), nb, L = prefix.shape, cfg.num_beams, prefix.shape[1] + max_new
    K = max(2, 1 + (0 if eos is None else len(eos))) * nb
    lp, es = cfg.length_penalty, cfg.early_stopping
    # positions past a hypothesis' end; `pad or eos[0]`, so a pad id of 0 (T5) gives eos (a reference quirk)
    fill = (call.pad or int(eos[0])) if eos is not None else -1

    running = torch.full((B, nb, L), fill, dtype=torch.long, device=dev)
    running[:, :, :P] = prefix[:, None]
    running_scores = torch.zeros(B, nb, device=dev)
    running_scores[:, 1:] = _MASKED  # all beams start equal: only the first may spread at step one
    running_rows = torch.full((B, nb, max_new), -1, dtype=torch.long, device=dev)  # each token's source row
    done = running.clone()  # finished hypotheses [B, nb, L], best first
    done_scores = torch.full((B, nb), _MASKED, device=dev)
    done_rows = running_rows.clone()
    is_done = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
    first_nb = torch.arange(K, device=dev) < nb
    row_offset = torch.arange(B, device=dev)[:, None] * nb

    cur = P  # tokens so far
    while True:
        V = logits.shape[-1]
        log_probs = call.process(running[:, :, :cur].flatten(0, 1), F.log_softmax(logits, -1))  # [B * nb, V]
        call.record(logits, log_probs)
        total = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        top, idx = _top_continuations(total, K, call)  # [B, K]
        beam, tokens = idx // V, idx % V
        cand = running.gather(1, beam[:, :, None].expand(B, K, L)).clone()  # [B, K, L]
        cand[:, :, cur] = tokens
        cand_rows = running_rows.gather(1, beam[:, :, None].expand(B, K, max_new)).clone()
        cand_rows[:, :, cur - P] = beam + row_offset
        ended = call.ended(cand[:, :, :cur + 1].flatten(0, 1)).view(B, K)
        if cur + 1 >= L:
            ended = torch.ones_like(ended)

        # the best nb continuations that did not end keep running
        live = top + ended.float() * _MASKED
        pick = torch.topk(live, nb).indices  # [B, nb]
        running = cand.gather(1, pick[:, :, None].expand(B, nb, L))
        running_rows = cand_rows.gather(1, pick[:, :, None].expand(B, nb, max_new))
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
        done_rows = torch.cat([done_rows, cand_rows], 1).gather(1, merged[:, :, None].expand(B, nb, max_new))
        done_scores = torch.cat([done_scores, scores], 1).gather(1, merged)
        is_done = torch.cat([is_done, just_done], 1).gather(1, merged)

        cur += 1
        can_improve = can_improve & _can_improve(running_scores, done_scores, is_done, cur - P, max_new, lp, es)
        if not can_improve.any() or (is_done.all() and es is True) or ended.all():
            break
        decoder.reorder(src_rows)
        logits = decoder.step(running[:, :, cur - 1].flatten())

    n = cfg.num_return_sequences
    rows = done_rows[:, :n].reshape(B * n, max_new)
    n_new = int((rows >= 0).sum(1).max())  # the longest hypothesis returned, eos included
    return done[:, :n, :P + n_new].reshape(B * n, P + n_new), done_scores[:, :n].reshape(B * n), rows[:, :n_new]


def _top_continuations(total: Tensor, k: int, call: _Call) -> tuple[Tensor, Tensor]:
    """The ``k`` best continuations of ``total`` [B, nb * V] (beam sampling: ``k`` drawn without replacement),
    best first: (their scores, their flat indices), each [B, k]."""
    if not call.cfg.do_sample:
        return torch.topk(total, k)
    idx = call.draw(total.softmax(-1), k)
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

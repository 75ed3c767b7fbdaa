"""What ``generate`` does to the next-token scores before choosing, in transformers' order.

``ScoreProcessor(input_ids, scores)`` applies, as transformers 5 does: the repetition penalty, the n-gram
ban (``no_repeat_ngram_size``), the banned words (``bad_words_ids``), the minimum length's ban of eos, the
caller's own ``logits_processor`` list, then (sampling only) temperature, top-k and top-p. Like
transformers' processors it reads the whole history ``input_ids`` [N, L] (the prefix, then the tokens
generated so far) and returns new scores [N, V].

Greedy decoding whose only processing is banning fixed ids (``banned``) may let the decoder pick the token
itself (``Decoder.step_greedy``); anything that needs the whole scores turns that off (``bans_only``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from blip2.generation_config import GenerationConfig

__all__ = ["ScoreProcessor", "callables", "top_p_filter"]

Hook = Callable[..., Tensor]


def callables(hooks: Sequence[Hook] | Hook | None, name: str) -> list[Hook]:
    """A ``logits_processor`` / ``stopping_criteria`` argument (transformers' list classes, any list of
    callables, or one callable) as a list of callables."""
    if hooks is None:
        return []
    items = list(hooks) if isinstance(hooks, (list, tuple)) else [hooks]
    for item in items:
        if not callable(item):
            raise TypeError(f"{name}: expected callables taking (input_ids, scores), got {type(item).__name__}")
    return items


class ScoreProcessor:
    """One generate call's score processing (see the module doc). ``expand``: rows per prompt; ``keep``: the
    fewest tokens top-k and top-p leave (beam sampling keeps enough to continue past every eos); ``vocab_size``
    and ``device``: the scores'."""

    def __init__(self, cfg: GenerationConfig, *, eos: Tensor | None, min_length: int, prefix_mask: Tensor | None,
                 expand: int, keep: int, vocab_size: int, device: torch.device, user: Sequence[Hook] = ()) -> None:
        self.cfg, self.eos, self.min_length, self.keep, self.user = cfg, eos, min_length, keep, list(user)
        self.ignore = None  # [N]: leading prompt positions the repetition penalty leaves out
        if cfg.repetition_penalty != 1.0 and prefix_mask is not None:
            # transformers leaves the left padding of the prompt out of the penalty
            self.ignore = (prefix_mask != 0).int().argmax(1).repeat_interleave(expand, 0)
        words = [list(w) for w in cfg.bad_words_ids or []]
        if eos is not None:  # as transformers: eos alone is never a banned word (the min length bans it)
            words = [w for w in words if not (len(w) == 1 and w[0] in eos.tolist())]
        single = sorted({w[0] for w in words if len(w) == 1})
        self.banned_ids = torch.tensor(single, dtype=torch.long, device=device) if single else None
        self.banned_sequences = [w for w in words if len(w) > 1]
        too_large = [t for w in words for t in w if t >= vocab_size]
        if too_large:
            raise ValueError(f"bad_words_ids: ids {sorted(set(too_large))} are outside the vocabulary of {vocab_size}")

    @property
    def bans_only(self) -> bool:
        """Does greedy decoding need no more than ``banned``? (no penalty, no history-dependent ban, no hooks)"""
        cfg = self.cfg
        return (cfg.repetition_penalty == 1.0 and not cfg.no_repeat_ngram_size and not self.banned_sequences
                and not self.user)

    def banned(self, length: int) -> Tensor | None:
        """The fixed ids set to -inf at ``length`` tokens so far: the one-token banned words, and eos below the
        minimum length; None when there are none."""
        if self.eos is not None and length < self.min_length:
            return self.eos if self.banned_ids is None else torch.cat([self.banned_ids, self.eos])
        return self.banned_ids

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        # input_ids [N, L]; scores [N, V] float32
        cfg = self.cfg
        V = scores.shape[1]
        if cfg.repetition_penalty != 1.0:
            scores = self._penalise_repeats(input_ids, scores)
        if cfg.no_repeat_ngram_size or self.banned_sequences:  # bans that depend on each row's history
            ban = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)  # column V: none
            if cfg.no_repeat_ngram_size:
                self._ban_ngrams(input_ids, cfg.no_repeat_ngram_size, ban)
            self._ban_words(input_ids, ban)
            scores = scores.masked_fill(ban[:, :V], -float("inf"))
        banned = self.banned(input_ids.shape[1])
        if banned is not None:
            scores = scores.index_fill(1, banned, -float("inf"))
        for hook in self.user:
            scores = hook(input_ids, scores)
        return self._warp(scores) if cfg.do_sample else scores

    def _penalise_repeats(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """Every id seen in the history (ids beyond the scores, and left padding, excepted) gets its score
        divided by the penalty (multiplied where negative)."""
        V = scores.shape[1]
        ids = input_ids.clamp(max=V)
        if self.ignore is not None:
            positions = torch.arange(ids.shape[1], device=ids.device)
            ids = ids.masked_fill(positions[None] < self.ignore[:, None], V)
        seen = torch.zeros(ids.shape[0], V + 1, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)[:, :V]
        p = self.cfg.repetition_penalty
        return torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)

    @staticmethod
    def _ban_ngrams(input_ids: Tensor, n: int, ban: Tensor) -> None:
        """Ban each token that would complete an n-gram already in the history: for every earlier n-token
        window that starts with the history's last n - 1 tokens, the window's last token."""
        L = input_ids.shape[1]
        if L < n:
            return
        V = ban.shape[1] - 1
        windows = input_ids.unfold(1, n, 1)  # [N, L - n + 1, n]; none starts at the tail itself
        tail = input_ids[:, L - n + 1:]  # [N, n - 1]
        match = (windows[:, :, :-1] == tail[:, None]).all(-1)  # [N, L - n + 1]
        ban.scatter_(1, torch.where(match, windows[:, :, -1].clamp(max=V), V), True)

    def _ban_words(self, input_ids: Tensor, ban: Tensor) -> None:
        """A banned word of several tokens: its last token, in the rows whose history ends with the rest."""
        L = input_ids.shape[1]
        for word in self.banned_sequences:
            head = word[:-1]
            if len(head) > L:
                continue
            rows = (input_ids[:, L - len(head):] == torch.tensor(head, device=input_ids.device)).all(1)
            ban[rows, word[-1]] = True

    def _warp(self, scores: Tensor) -> Tensor:
        """Sampling's temperature, then top-k, then top-p (each keeps at least ``keep`` tokens)."""
        cfg = self.cfg
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
    drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -keep:] = False
    return scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))

"""The prefix cache: a chat's next question repeats the conversation so far, and every question about an image
starts with that image's query tokens. A finished OPT row leaves here the keys and values of what it read (the
image's queries, its prompt, the tokens it fed back); a later prompt that starts the same way (same image, same
leading items) copies them into its row and prefills only its new tail (``rows.DecoderOnlyRows.prefill``).

Items: what a row read, one per cache slot it filled: a token id, or ``IMAGE`` for a query position of a model
whose prompts carry no ``<image>`` tokens (the queries come first there). Which query sits at a slot follows
from the image key and the items before it, so equal keys and equal leading items mean equal keys and values
(up to the rounding of the batch shapes they were computed in, as for any two batches).

Bounded by ``max_bytes`` of stored tensors, least recently used first out; an entry another one extends is
dropped (the longer one serves every prompt the shorter one would). One thread (the engine's worker) uses it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

IMAGE = -1


@dataclass(eq=False)
class Entry:
    key: str  # the image's pixels key
    items: tuple[int, ...]
    keys: list[Tensor]  # per layer [H, len(items), Dh]
    values: list[Tensor]
    nbytes: int


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be at least 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, least recent first
        self.nbytes = 0
        self.hits = self.misses = self.reused = 0  # reused: items not prefilled again

    def find(self, key: str, items: Sequence[int]) -> tuple[int, Entry | None]:
        """The entry sharing the longest prefix with ``items`` and how many items it gives: at most all but the
        last, whose logits the prefill still has to compute. (0, None) when nothing is shared."""
        best, found = 0, None
        for entry in self._entries.values():
            if entry.key == key:
                n = common_length(entry.items, items)
                if n > best:
                    best, found = n, entry
        best = min(best, len(items) - 1)
        if found is None or best <= 0:
            self.misses += 1
            return 0, None
        self._entries.move_to_end(id(found))
        self.hits += 1
        self.reused += best
        return best, found

    def add(self, key: str, items: Sequence[int], keys: list[Tensor], values: list[Tensor]) -> None:
        """Keep ``keys``/``values`` (per layer [H, len(items), Dh], owned by the cache from now on) for ``items``."""
        items = tuple(items)
        nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if not items or nbytes > self.max_bytes:
            return
        for entry in list(self._entries.values()):
            if entry.key != key:
                continue
            if common_length(entry.items, items) == len(items):  # already covered by a longer (or equal) entry
                self._entries.move_to_end(id(entry))
                return
            if common_length(entry.items, items) == len(entry.items):  # the new one extends it
                self._drop(entry)
        entry = Entry(key, items, keys, values, nbytes)
        self._entries[id(entry)] = entry
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries.values())))

    def _drop(self, entry: Entry) -> None:
        del self._entries[id(entry)]
        self.nbytes -= entry.nbytes

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused}

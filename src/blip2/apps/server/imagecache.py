"""The image cache: a chat asks several questions about one image, and each needs the same vision-encoder and
Q-Former output. Kept here by the preprocessed pixels' hash (``requests.pixels_key``): the projected queries
[Q, D_lm] the language model reads, least recently used first out, at most ``max_entries`` of them."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch


class ImageCache:
    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be at least 0, got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def lm_inputs(self, model: Any, images: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """The projected queries [B, Q, D_lm] of ``images`` ((key, pixel_values [3, H, W]) pairs): cached ones
        looked up, the others run through the model in one batch and kept."""
        with self._lock:
            found = {key: self._entries[key] for key, _ in images if key in self._entries}
            for key in found:
                self._entries.move_to_end(key)
            self.hits += sum(1 for key, _ in images if key in found)
        missing = {key: px for key, px in images if key not in found}  # one run per distinct image
        self.misses += len(missing)
        if missing:
            pixels = torch.stack(list(missing.values())).to(model.device)
            _, _, projected = model.image_to_lm_inputs(pixels)  # [b, Q, D_lm]
            # a copy each: a view would keep its whole batch alive after the others are evicted
            found.update(zip(missing, (p.clone() for p in projected)))
            with self._lock:
                for key in missing:
                    self._entries[key] = found[key]
                    self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return torch.stack([found[key] for key, _ in images])

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "max_entries": self.max_entries, "hits": self.hits,
                "misses": self.misses}

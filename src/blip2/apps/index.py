"""Retrieval over collections: an image index searched by text, and texts ranked for an image.

``ImageIndex`` encodes every image once into its normalised ITC query embeddings [N, Q, E]
(``add`` appends; old images are never re-encoded), keeps them on the CPU, and saves them as
safetensors shards with an ``index.json`` sidecar (paths, model id, shapes). ``search`` ranks the
images for each text as LAVIS evaluates retrieval (``compute_sim_matrix`` with ``k_test``):

    itc[t, i] = max_q <image_embeds[i, q], text_embed[t]>       raw cosine, no temperature
    top rerank_k images by itc; for those, score = itm[t, i] + itc[t, i]
    itm[t, i] = ITM "match" logit averaged over the queries     (LAVIS ``compute_itm``)

and returns the best ``k`` by score (LAVIS gives every other image -100, so ``k <= rerank_k``).
``rerank_k=0`` ranks by ITC alone. ITM needs the vision features of the candidates, which are too
big to keep (257 x 1408 per image for ViT-g), so the candidates are re-read and re-encoded, each
image once per ``search`` call. The ITC scan goes over the index ``chunk_size`` images at a time
with a running top-n, so only one chunk is ever on the device.

``rank_texts`` is the image -> text direction: texts ranked for each image by the same rule.

Images are read by a ``preprocess(paths) -> pixel_values [B, 3, H, W]`` callable (the processor's
image loader, or anything else), ``batch_size`` paths at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from blip2.checkpoint import DTYPES, atomic_write, parse_dtype
from blip2.models.retrieval import Blip2ForImageTextRetrieval, itc_similarity

__all__ = ["ImageIndex", "SearchResult", "Ranking", "rank_texts", "list_images", "IMAGE_EXTENSIONS", "Preprocess"]

Preprocess = Callable[[list[str]], Tensor]  # paths -> pixel_values [B, 3, H, W]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

INDEX_FILE = "index.json"
FORMAT = "blip2-image-index"
VERSION = 1


class Ranking(NamedTuple):
    indices: Tensor  # [R, k] long: the ranked items for each of R queries, best first
    scores: Tensor  # [R, k] float32: ITM + ITC when re-ranked, else the ITC cosine


class SearchResult(NamedTuple):
    indices: Tensor  # [R, k] long: image positions in the index, best first
    scores: Tensor  # [R, k] float32
    paths: list[list[str]]  # [R][k] the images' paths


def list_images(folder: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """Image files under ``folder`` (recursively), by extension, in sorted order."""
    found = []
    for root, dirs, files in os.walk(os.fspath(folder)):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(extensions))
    return found


def _check_k(k: int, rerank_k: int, n: int) -> tuple[int, int]:
    if k < 1 or rerank_k < 0:
        raise ValueError(f"need k >= 1 and rerank_k >= 0, got k={k}, rerank_k={rerank_k}")
    k, r = min(k, n), min(rerank_k, n)
    if 0 < r < k:
        raise ValueError(f"rerank_k ({rerank_k}) must be 0 (ITC only) or at least k ({k}): "
                         "items outside the re-ranked ones have no ITM score")
    return k, r


def _merge_topk(vals: Tensor, idx: Tensor, new_vals: Tensor, new_idx: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Running top-n per row: vals/idx [R, m] merged with new_vals/new_idx [R, c] -> [R, min(n, m+c)]."""
    v = torch.cat([vals, new_vals], dim=1)
    i = torch.cat([idx, new_idx], dim=1)
    top = v.topk(min(n, v.shape[1]), dim=1)
    return top.values, i.gather(1, top.indices)


def _rerank(itc: Tensor, cand: Tensor, itm: Tensor, k: int) -> Ranking:
    """LAVIS k_test: score = itm + itc over the candidates [R, r]; the best k per row."""
    score = itm + itc  # [R, r]
    order = score.argsort(dim=1, descending=True, stable=True)[:, :k]
    return Ranking(cand.gather(1, order).cpu(), score.gather(1, order).cpu())


def _text_embeds(model: Blip2ForImageTextRetrieval, input_ids: Tensor, attention_mask: Tensor | None,
                 batch_size: int) -> Tensor:
    """Normalised ITC text embeddings [Nt, E] (float32, on the model's device), batch_size at a time."""
    out = []
    for s in range(0, input_ids.shape[0], batch_size):
        mask = None if attention_mask is None else attention_mask[s:s + batch_size]
        out.append(model.text_embeds(input_ids[s:s + batch_size], mask).float())
    return torch.cat(out)


def _as_batch(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if input_ids.dim() == 1:
        return input_ids[None], None if attention_mask is None else attention_mask[None]
    return input_ids, attention_mask


class ImageIndex:
    """Normalised ITC embeddings of a collection of images, searchable by text (see module doc)."""

    def __init__(self, model: Blip2ForImageTextRetrieval, preprocess: Preprocess, *, model_id: str | None = None,
                 batch_size: int = 32, chunk_size: int = 4096, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {dtype}")
        self.model = model
        self.preprocess = preprocess
        self.model_id = model_id
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.paths: list[str] = []
        self._parts: list[Tensor] = []  # one [n_i, Q, E] CPU tensor per add() call, in self.dtype
        self._seen: set[str] = set()

    @property
    def num_query_tokens(self) -> int:
        return self.model.config.num_query_tokens

    @property
    def embed_dim(self) -> int:
        return self.model.config.image_text_hidden_size

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def embeddings(self) -> Tensor:
        """All embeddings, [N, Q, E] (a copy; the index keeps them in parts)."""
        if not self._parts:
            return torch.empty(0, self.num_query_tokens, self.embed_dim, dtype=self.dtype)
        return torch.cat(self._parts)

    # -- building ----------------------------------------------------------------------------------

    def _pixels(self, paths: list[str]) -> Tensor:
        pixel_values = self.preprocess(paths)
        if pixel_values.dim() != 4 or pixel_values.shape[0] != len(paths):
            raise ValueError(f"preprocess returned shape {tuple(pixel_values.shape)} for {len(paths)} paths; "
                             f"expected [{len(paths)}, 3, H, W]")
        return pixel_values

    @torch.inference_mode()
    def add(self, paths: str | os.PathLike | Iterable[str | os.PathLike]) -> int:
        """Encode and append images (a folder is listed with ``list_images``); returns how many were new.

        Paths already in the index are skipped, so adding a folder again only encodes new files.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = list_images(paths) if os.path.isdir(paths) else [paths]
        new = [p for p in dict.fromkeys(map(os.fspath, paths)) if p not in self._seen]  # ordered, unique
        if not new:
            return 0
        part = torch.empty(len(new), self.num_query_tokens, self.embed_dim, dtype=self.dtype)
        for s in range(0, len(new), self.batch_size):
            batch = new[s:s + self.batch_size]
            part[s:s + len(batch)] = self.model.image_embeds(self._pixels(batch)).to("cpu", self.dtype)
        # only now, so an image that failed to load leaves the index as it was
        self._parts.append(part)
        self.paths.extend(new)
        self._seen.update(new)
        return len(new)

    # -- searching ---------------------------------------------------------------------------------

    def _itc_topk(self, text: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Top-n images by ITC for each text embedding [R, E]: (values [R, n], indices [R, n])."""
        R, device = text.shape[0], text.device
        vals = text.new_empty(R, 0)
        idx = torch.empty(R, 0, dtype=torch.long, device=device)
        offset = 0
        for part in self._parts:
            for s in range(0, part.shape[0], self.chunk_size):
                chunk = part[s:s + self.chunk_size].to(device=device, dtype=torch.float32)  # [c, Q, E]
                sims = itc_similarity(chunk, text).t()  # [R, c]
                ids = torch.arange(offset + s, offset + s + chunk.shape[0], device=device).expand(R, -1)
                vals, idx = _merge_topk(vals, idx, sims, ids, n)
            offset += part.shape[0]
        return vals, idx

    def _itm_candidates(self, cand: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """ITM match logits [R, r] of text row t with image cand[t, j]; each image encoded once."""
        itm = torch.empty(cand.shape, dtype=torch.float32, device=cand.device)
        images = cand.unique()  # sorted
        for s in range(0, images.numel(), self.batch_size):
            batch = images[s:s + self.batch_size]  # [b] image positions, sorted
            feats = self.model.vision_features(self._pixels([self.paths[i] for i in batch.tolist()]))  # [b, N+1, Dv]
            slot = torch.searchsorted(batch, cand).clamp(max=batch.numel() - 1)  # [R, r]
            rows, cols = (batch[slot] == cand).nonzero(as_tuple=True)  # the pairs whose image is in this batch
            for p in range(0, rows.numel(), self.batch_size):
                rr, cc = rows[p:p + self.batch_size], cols[p:p + self.batch_size]
                mask = None if attention_mask is None else attention_mask[rr.cpu()]
                logits = self.model.itm_logits_from_features(feats[slot[rr, cc]], input_ids[rr.cpu()], mask)
                itm[rr, cc] = logits[:, 1].float()
        return itm

    @torch.inference_mode()
    def search(self, input_ids: Tensor, attention_mask: Tensor | None = None, k: int = 10,
               rerank_k: int = 128) -> SearchResult:
        """Rank the indexed images for each text; input_ids/attention_mask [R, T] (or [T]), Q-Former ids.

        ``rerank_k`` > 0 re-ranks that many ITC candidates by ITM + ITC (LAVIS ``k_test``); 0: ITC only.
        """
        if not self.paths:
            raise ValueError("the index is empty: add images first")
        input_ids, attention_mask = _as_batch(input_ids, attention_mask)
        k, r = _check_k(k, rerank_k, len(self))
        text = _text_embeds(self.model, input_ids, attention_mask, self.batch_size)  # [R, E]
        vals, idx = self._itc_topk(text, max(k, r))
        if r == 0:
            ranking = Ranking(idx[:, :k].cpu(), vals[:, :k].cpu())
        else:
            ranking = _rerank(vals[:, :r], idx[:, :r], self._itm_candidates(idx[:, :r], input_ids, attention_mask), k)
        paths = [[self.paths[i] for i in row] for row in ranking.indices.tolist()]
        return SearchResult(ranking.indices, ranking.scores, paths)

    # -- files -------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``embeds-NNNNN.safetensors`` (one shard per add) and the ``index.json`` sidecar."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        shards, start = [], 0
        for i, part in enumerate(self._parts):
            name = f"embeds-{i:05d}.safetensors"
            save_file({"image_embeds": part.contiguous()}, os.path.join(directory, name), metadata={"format": "pt"})
            shards.append({"file": name, "paths": self.paths[start:start + part.shape[0]]})
            start += part.shape[0]
        meta = {"format": FORMAT, "version": VERSION, "model_id": self.model_id,
                "num_query_tokens": self.num_query_tokens, "embed_dim": self.embed_dim,
                "dtype": str(self.dtype).removeprefix("torch."), "count": len(self), "shards": shards}
        with atomic_write(os.path.join(directory, INDEX_FILE)) as tmp:  # the sidecar names the shards: write it last
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
        keep = {s["file"] for s in shards}
        for stale in os.listdir(directory):
            if stale.startswith("embeds-") and stale.endswith(".safetensors") and stale not in keep:
                os.remove(os.path.join(directory, stale))

    @classmethod
    def load(cls, directory: str | os.PathLike, model: Blip2ForImageTextRetrieval, preprocess: Preprocess, *,
             model_id: str | None = None, batch_size: int = 32, chunk_size: int = 4096) -> ImageIndex:
        """Read an index written by ``save``. ``model_id``, when given, must equal the stored one."""
        directory = os.fspath(directory)
        path = os.path.join(directory, INDEX_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{directory}: no {INDEX_FILE}: not an image index") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path}: not a {FORMAT} version {VERSION} file")
        if model_id is not None and meta["model_id"] is not None and meta["model_id"] != model_id:
            raise ValueError(f"{path}: built with model {meta['model_id']!r}, not {model_id!r}")
        shape = (model.config.num_query_tokens, model.config.image_text_hidden_size)
        if (meta["num_query_tokens"], meta["embed_dim"]) != shape:
            raise ValueError(f"{path}: embeddings are [N, {meta['num_query_tokens']}, {meta['embed_dim']}], "
                             f"the model gives [N, {shape[0]}, {shape[1]}]")
        index = cls(model, preprocess, model_id=meta["model_id"], batch_size=batch_size, chunk_size=chunk_size,
                    dtype=parse_dtype(meta["dtype"]))
        for shard in meta["shards"]:
            # a fresh (aligned) copy: safetensors hands out views at arbitrary offsets of its buffer, and
            # the vectorised matmul rounds differently on unaligned data; search results must not change
            part = load_file(os.path.join(directory, shard["file"]))["image_embeds"].clone()
            if tuple(part.shape) != (len(shard["paths"]), *shape):
                raise ValueError(f"{directory}/{shard['file']}: shape {tuple(part.shape)} does not match "
                                 f"{len(shard['paths'])} paths of [{shape[0]}, {shape[1]}]")
            index._parts.append(part)
            index.paths.extend(shard["paths"])
        index._seen = set(index.paths)
        return index


@torch.inference_mode()
def rank_texts(model: Blip2ForImageTextRetrieval, pixel_values: Tensor, input_ids: Tensor,
               attention_mask: Tensor | None = None, *, k: int = 10, rerank_k: int = 128,
               batch_size: int = 32, chunk_size: int = 4096) -> Ranking:
    """Rank texts [Nt, T] for each image [B, 3, H, W] by the rule of ``ImageIndex.search``; [B, k]."""
    k, r = _check_k(k, rerank_k, input_ids.shape[0])
    text = _text_embeds(model, input_ids, attention_mask, batch_size)  # [Nt, E]
    results = []
    for s in range(0, pixel_values.shape[0], batch_size):
        feats = model.vision_features(pixel_values[s:s + batch_size])  # [b, N+1, Dv]
        image = model.image_embeds_from_features(feats).float()  # [b, Q, E]
        b = image.shape[0]
        vals = text.new_empty(b, 0)
        idx = torch.empty(b, 0, dtype=torch.long, device=text.device)
        for c in range(0, text.shape[0], chunk_size):
            sims = itc_similarity(image, text[c:c + chunk_size])  # [b, c]
            ids = torch.arange(c, c + sims.shape[1], device=text.device).expand(b, -1)
            vals, idx = _merge_topk(vals, idx, sims, ids, max(k, r))
        if r == 0:
            results.append(Ranking(idx[:, :k].cpu(), vals[:, :k].cpu()))
            continue
        cand = idx[:, :r]  # [b, r]
        rows = torch.arange(b, device=cand.device).repeat_interleave(r)  # pairs (image row, candidate text)
        texts = cand.reshape(-1).cpu()
        itm = torch.empty(b * r, dtype=torch.float32, device=cand.device)
        for p in range(0, b * r, batch_size):
            t = texts[p:p + batch_size]
            mask = None if attention_mask is None else attention_mask[t]
            itm[p:p + batch_size] = model.itm_logits_from_features(feats[rows[p:p + batch_size]], input_ids[t], mask)[:, 1]
        results.append(_rerank(vals[:, :r], cand, itm.view(b, r), k))
    return Ranking(torch.cat([x.indices for x in results]), torch.cat([x.scores for x in results]))

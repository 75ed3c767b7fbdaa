"""Image-text retrieval: recall@k in both directions, and LAVIS' ITC-then-ITM re-ranking.

COCO and Flickr30k have several captions per image (5), so:

- text -> image: each text has one correct image;
- image -> text: a hit at k if *any* of the image's captions is in the top k (rank = best rank
  among its captions), as LAVIS' ``_report_metrics`` scores it.

Ties are scored against the query: a candidate with the same score as the correct one counts as
ranked above it, so a constant score matrix gets no free hits. (LAVIS uses ``np.argsort``, whose
tie order is arbitrary; without ties the two agree.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "ranks_from_scores",
    "ranks_from_rankings",
    "recall_at_k",
    "recall_summary",
    "retrieval_recall",
    "retrieval_recall_from_rankings",
    "rerank_top_k",
]

ArrayLike = np.ndarray | torch.Tensor
_MISS = np.iinfo(np.int64).max


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _image_to_texts(text_to_image: Sequence[int], n_images: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n_images)]
    for t, i in enumerate(text_to_image):
        if not 0 <= i < n_images:
            raise ValueError(f"text_to_image[{t}] = {i} is not an image index in [0, {n_images})")
        out[i].append(t)
    return out


def ranks_from_scores(scores: ArrayLike, positives: Sequence[Sequence[int]]) -> np.ndarray:
    """0-based rank of the best-ranked positive for each query. scores: [n_queries, n_candidates].

    rank = number of non-positive candidates scoring at least as high as the best positive
    (ties count against the query).
    """
    s = _numpy(scores)
    if s.ndim != 2 or s.shape[0] != len(positives):
        raise ValueError(f"scores must be [n_queries={len(positives)}, n_candidates], got {tuple(s.shape)}")
    ranks = np.empty(len(positives), dtype=np.int64)
    for q, pos in enumerate(positives):
        if len(pos) == 0:
            raise ValueError(f"query {q} has no positive candidate")
        row = s[q]
        best = row[list(pos)].max()
        negative = np.ones(row.shape[0], dtype=bool)
        negative[list(pos)] = False
        ranks[q] = int((row[negative] >= best).sum())
    return ranks


def ranks_from_rankings(rankings: Sequence[Sequence[int]], positives: Sequence[Sequence[int]]) -> np.ndarray:
    """0-based position of the first positive in each ranked candidate list (best first).

    A list that holds no positive (e.g. a truncated top-k list) gives the largest int64: a miss
    at every k, since what follows the list is unknown.
    """
    if len(rankings) != len(positives):
        raise ValueError(f"{len(rankings)} rankings for {len(positives)} queries")
    ranks = np.empty(len(positives), dtype=np.int64)
    for q, (ranking, pos) in enumerate(zip(rankings, positives, strict=True)):
        wanted = set(pos)
        ranks[q] = next((j for j, c in enumerate(ranking) if c in wanted), _MISS)
    return ranks


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Percent of queries whose rank is below k, for each k."""
    if len(ranks) == 0:
        raise ValueError("recall_at_k: no queries")
    return {k: 100.0 * float((np.asarray(ranks) < k).mean()) for k in ks}


def recall_summary(t2i_ranks: np.ndarray, i2t_ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """LAVIS' retrieval numbers from 0-based ranks per text (t2i) and per image (i2t): ``t2i_r{k}``,
    ``i2t_r{k}`` (percent), their means over ks per direction and the average of the two, ``r_mean``."""
    t2i, i2t = recall_at_k(t2i_ranks, ks), recall_at_k(i2t_ranks, ks)
    out = {f"t2i_r{k}": v for k, v in t2i.items()} | {f"i2t_r{k}": v for k, v in i2t.items()}
    out["t2i_r_mean"] = sum(t2i.values()) / len(ks)
    out["i2t_r_mean"] = sum(i2t.values()) / len(ks)
    out["r_mean"] = (out["t2i_r_mean"] + out["i2t_r_mean"]) / 2
    return out


def retrieval_recall(
    scores_t2i: ArrayLike,
    text_to_image: Sequence[int],
    scores_i2t: ArrayLike | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k (percent) for text->image (``t2i_r{k}``) and image->text (``i2t_r{k}``) retrieval.

    scores_t2i: [n_texts, n_images]; ``text_to_image[t]`` is the image of text ``t``. scores_i2t:
    [n_images, n_texts], by default ``scores_t2i.T``; pass it when the two directions were scored
    separately (the ITM re-rank of :func:`rerank_top_k` gives one matrix per direction).
    Also returns the means over ks per direction and their average ``r_mean`` (LAVIS' numbers).
    """
    t2i = _numpy(scores_t2i)
    if t2i.ndim != 2 or t2i.shape[0] != len(text_to_image):
        raise ValueError(f"scores_t2i must be [n_texts={len(text_to_image)}, n_images], got {tuple(t2i.shape)}")
    i2t = t2i.T if scores_i2t is None else _numpy(scores_i2t)
    if i2t.shape != t2i.shape[::-1]:
        raise ValueError(f"scores_i2t must be [n_images, n_texts] = {t2i.shape[::-1]}, got {tuple(i2t.shape)}")
    t2i_ranks = ranks_from_scores(t2i, [[i] for i in text_to_image])
    i2t_ranks = ranks_from_scores(i2t, _image_to_texts(text_to_image, t2i.shape[1]))
    return recall_summary(t2i_ranks, i2t_ranks, ks)


def retrieval_recall_from_rankings(
    t2i_rankings: Sequence[Sequence[int]],
    i2t_rankings: Sequence[Sequence[int]],
    text_to_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """:func:`retrieval_recall` from ranked lists: image indices per text, text indices per image."""
    t2i_ranks = ranks_from_rankings(t2i_rankings, [[i] for i in text_to_image])
    i2t_ranks = ranks_from_rankings(i2t_rankings, _image_to_texts(text_to_image, len(i2t_rankings)))
    return recall_summary(t2i_ranks, i2t_ranks, ks)


def rerank_top_k(
    itc_scores: torch.Tensor,
    k: int,
    itm_fn: Callable[[int, torch.Tensor], torch.Tensor],
    fill: float = -100.0,
) -> torch.Tensor:
    """LAVIS' ``compute_sim_matrix`` re-rank of one direction: [n_queries, n_candidates] -> same.

    For each query row, the k candidates with the highest ITC score are scored by
    ``itm_fn(query_index, candidate_indices [k]) -> [k]`` (BLIP-2: the ITM positive logit averaged
    over the queries); their final score is ITM + ITC, every other candidate gets ``fill`` (-100).
    Use it twice, on the image->text ITC matrix and on its transpose, for the two directions.
    """
    if itc_scores.ndim != 2:
        raise ValueError(f"itc_scores must be [n_queries, n_candidates], got {tuple(itc_scores.shape)}")
    k = min(k, itc_scores.shape[1])
    out = torch.full(itc_scores.shape, fill, dtype=torch.float32, device=itc_scores.device)
    for q in range(itc_scores.shape[0]):
        topk_sim, topk_idx = itc_scores[q].topk(k)
        itm = torch.as_tensor(itm_fn(q, topk_idx), device=itc_scores.device).float().reshape(-1)
        if itm.numel() != k:
            raise ValueError(f"itm_fn returned {itm.numel()} scores for {k} candidates (query {q})")
        out[q, topk_idx] = itm + topk_sim.float()
    return out

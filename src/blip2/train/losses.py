"""The BLIP-2 training objectives as plain functions on tensors.

Stage 1 (representation learning, Q-Former against a frozen image encoder), as LAVIS ``Blip2Qformer.forward``:

- ITC: image-text contrastive. Similarity of image i and text t = max over the Q query embeddings of the
  cosine with the text's CLS embedding, divided by a learned temperature; cross-entropy both ways with
  label smoothing 0.1 against the global batch (features gathered from every rank, with gradients).
- ITM: image-text matching, a binary classifier on the query outputs of the joint [queries; text] pass.
  Per pair: the positive, a hard negative image for the text and a hard negative text for the image,
  each drawn with probability softmax(similarity) over the global batch (one positive to two negatives).
- ITG: image-grounded text generation: next-token cross-entropy (label smoothing 0.1) over the text
  outputs of the Q-Former run with the multimodal causal mask, the first token replaced by [DEC].

Stage 2 (generative learning against a frozen LM): next-token cross-entropy on the text tokens only.

Distributed runs: every rank holds ``b`` rows of a global batch of ``G = world * b`` rows (rank r: rows
``r*b .. r*b+b-1``). Losses here are normalised so that DDP's gradient average over ranks equals the
gradient of the same loss computed on the whole global batch in one process.

Shapes: G global batch, b local batch, Q queries, E embedding width, T text length, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ITC_LABEL_SMOOTHING",
    "ITG_LABEL_SMOOTHING",
    "gather_no_grad",
    "gather_with_grad",
    "itc_loss",
    "itc_similarity",
    "itm_loss",
    "negative_weights",
    "rank_and_world",
    "sample_negatives",
    "token_cross_entropy",
]

ITC_LABEL_SMOOTHING = 0.1  # LAVIS Blip2Qformer: F.cross_entropy(..., label_smoothing=0.1)
ITG_LABEL_SMOOTHING = 0.1  # LAVIS BertLMHeadModel: CrossEntropyLoss(label_smoothing=0.1)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank the sum of all ranks' gradients for its own rows.

    Each rank's loss depends on every rank's rows, so the gradient for rows of rank r is the sum over
    ranks of d(loss_k)/d(rows_r); DDP then averages parameter gradients, which gives the gradient of
    the mean of the per-rank losses: the single-process loss on the global batch.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size(), dim=0)[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """[b, ...] on every rank -> [G, ...] in rank order, differentiable (LAVIS all_gather_with_grad)."""
    return x if rank_and_world()[1] == 1 else _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """[b, ...] on every rank -> [G, ...] in rank order, no gradient (LAVIS concat_all_gather)."""
    world = rank_and_world()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def itc_similarity(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Max over queries of the cosine: image_embeds [Bi, Q, E], text_embeds [Bt, E] (normalised) -> [Bi, Bt]."""
    return torch.einsum("iqe,te->itq", image_embeds, text_embeds).amax(dim=-1)


def itc_loss(image_embeds: Tensor, text_embeds: Tensor, image_embeds_all: Tensor, text_embeds_all: Tensor,
             temperature: Tensor, offset: int, label_smoothing: float = ITC_LABEL_SMOOTHING) -> Tensor:
    """Contrastive loss of this rank's b pairs against the global batch.

    image_embeds [b, Q, E] and text_embeds [b, E] are this rank's rows, which sit at ``offset`` in the
    gathered image_embeds_all [G, Q, E] / text_embeds_all [G, E]. Returns the mean over the b rows of
    (CE(image -> all texts) + CE(text -> all images)) / 2.
    """
    b = image_embeds.shape[0]
    targets = torch.arange(offset, offset + b, device=image_embeds.device)
    sim_i2t = itc_similarity(image_embeds, text_embeds_all) / temperature  # [b, G]
    sim_t2i = itc_similarity(image_embeds_all, text_embeds).t() / temperature  # [b, G]
    return (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2


@torch.no_grad()
def negative_weights(sim: Tensor, same: Tensor) -> Tensor:
    """Sampling weights for hard negatives: rows of softmax(sim) + 1e-4, zero where ``same``.

    sim [G, G] (temperature-scaled similarities, row = anchor); same [G, G] bool marks pairs that are
    not negatives: the diagonal, and (our addition to LAVIS) pairs whose texts are identical, which in
    a caption dataset are positives too. A row with no candidate left (every text identical) falls back
    to uniform weights over the other rows.
    """
    w = F.softmax(sim.float(), dim=1) + 1e-4  # LAVIS: softmax + 1e-4, positives zeroed
    w = w.masked_fill(same, 0.0)
    empty = w.sum(dim=1) == 0
    if bool(empty.any()):
        eye = torch.eye(w.shape[0], dtype=torch.bool, device=w.device)
        w[empty] = (~eye[empty]).float()
    return w


@torch.no_grad()
def sample_negatives(weights: Tensor, generator: torch.Generator) -> Tensor:
    """One index per row of weights [G, G], drawn with probability proportional to the row.

    Inverse-CDF sampling with uniforms from ``generator`` (on the CPU), so every rank that holds the same
    weights and generator state draws the same indices, and tiny float differences in the weights (a
    global batch computed in one process or in several) change a draw only if a uniform lands within
    that difference of a bucket edge.
    """
    G = weights.shape[0]
    u = torch.rand(G, 1, generator=generator, dtype=torch.float64).to(weights.device)
    cdf = weights.double().cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(1)
    # u < 1 = cdf[:, -1], so idx < G; clamp guards float edge cases all the same
    return idx.clamp(max=G - 1)


def itm_loss(logits: Tensor, positives: int | None = None) -> Tensor:
    """ITM cross-entropy for logits [3b (+ k), 2] laid out (positives, negative images, negative texts,
    then any k given hard negatives); ``positives``: b (default: a third of the rows)."""
    b = logits.shape[0] // 3 if positives is None else positives
    labels = torch.cat([torch.ones(b, dtype=torch.long),
                        torch.zeros(logits.shape[0] - b, dtype=torch.long)]).to(logits.device)
    return F.cross_entropy(logits.float(), labels)


def token_cross_entropy(logits: Tensor, labels: Tensor, *, shift: bool,
                        label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Token cross-entropy summed over the tokens: ``(sum, number of tokens)``; labels -100 carry no loss.

    logits [B, T, V], labels [B, T]. ``shift=True`` (decoder-only LMs, the Q-Former's ITG): labels are
    aligned with the inputs and position t predicts labels[t + 1]. ``shift=False`` (T5's decoder, whose
    inputs are the labels shifted right): position t predicts labels[t]. The caller divides the sum by
    a token count: this rank's, or the global one so that the loss does not depend on how the batch is
    split over ranks.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]  # [B, T-1, V], [B, T-1]
    labels = labels.to(logits.device)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                            ignore_index=-100, reduction="sum", label_smoothing=label_smoothing)
    return total, (labels != -100).sum()

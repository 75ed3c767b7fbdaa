"""BLIP-2 stage-1 heads: image-text matching (ITM), contrastive similarity (ITC), feature towers.

    pixel_values [B,3,H,W] -> vision_model -> image_feats [B, N+1, Dv]
      ITC image: qformer(query_tokens, image_feats) [B,Q,D] -> vision_projection -> normalise  [B,Q,E]
      ITC text:  qformer(embeddings(ids), text only) [B,T,D] -> CLS -> text_projection -> normalise [B,E]
      ITC score: max over the Q queries of the cosine (image query q, text CLS)
      ITM:       qformer([queries; embeddings(ids)], image_feats) -> itm_head on the Q query outputs
                 -> mean over queries -> logits [B, 2] (index 1 = "match")

Three classes with transformers' names and state-dict keys: ``Blip2ForImageTextRetrieval`` (both
towers and the ITM head), ``Blip2TextModelWithProjection`` and ``Blip2VisionModelWithProjection``
(one tower each; they load from a full retrieval checkpoint, skipping the other tower).

ITC temperature: transformers returns the raw cosine as ITC logits. LAVIS trains with a learned
temperature (``temp``, initialised at 0.07) that transformers' converter drops;
``convert_lavis`` keeps it in ``config.temperature``. When it is set, ``forward`` divides the ITC
logits by it (as LAVIS's training loss does); rankings do not change, and the convenience
scores (``itc_scores``) are always the raw cosine, as in LAVIS's retrieval evaluation.

Shapes: B batch, Q queries, T text tokens, N+1 image tokens, Dv vision width, D Q-Former width,
E = ``image_text_hidden_size``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2.checkpoint import PretrainedMixin
from blip2.config import Blip2Config
from blip2.models.qformer import Blip2QFormerModel, Blip2QFormerTextEmbeddings
from blip2.models.vision import Blip2VisionModel

__all__ = [
    "Blip2ForImageTextRetrieval",
    "Blip2TextModelWithProjection",
    "Blip2VisionModelWithProjection",
    "Blip2ImageTextMatchingOutput",
    "Blip2TextModelOutput",
    "Blip2VisionModelOutput",
    "itc_similarity",
]


class Blip2ImageTextMatchingOutput(NamedTuple):
    """What ``Blip2ForImageTextRetrieval.forward`` returns; fields as transformers' output.

    ITM: logits_per_image [B, 2], logits_per_text [2, B], text_embeds = Q-Former output [B, Q+T, D],
         image_embeds = vision output [B, N+1, Dv].
    ITC: logits_per_image [B_img, B_txt], logits_per_text [B_txt, B_img], text_embeds [B_txt, E],
         image_embeds [B_img, Q, E] (both normalised).
    """

    logits_per_image: Tensor
    logits_per_text: Tensor
    text_embeds: Tensor
    image_embeds: Tensor


class Blip2TextModelOutput(NamedTuple):
    text_embeds: Tensor  # [B, T, E], every position projected and normalised (CLS is position 0)
    last_hidden_state: Tensor  # [B, T, D]


class Blip2VisionModelOutput(NamedTuple):
    image_embeds: Tensor  # [B, Q, E], projected and normalised query outputs
    last_hidden_state: Tensor  # [B, N+1, Dv], vision encoder output


def itc_similarity(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Image-text contrastive similarity: max over queries of the cosine.

    image_embeds [Bi, Q, E] and text_embeds [Bt, E], both normalised -> [Bi, Bt].
    """
    sims = torch.einsum("iqe,te->itq", image_embeds, text_embeds)  # [Bi, Bt, Q]
    return sims.amax(dim=-1)


class _Blip2QFormerBase(PretrainedMixin, nn.Module):
    """The learned queries and the Q-Former, which every class here has; subclasses add the towers."""

    config_class = Blip2Config
    # as the reference: the Q-Former and its queries stay fp32 when the rest runs in fp16/bf16
    _keep_in_fp32_modules = ("query_tokens", "qformer")

    def __init__(self, config: Blip2Config) -> None:
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        self.qformer = Blip2QFormerModel(config.qformer_config)

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device


class _ImageTower:
    """ITC image side, for classes with ``vision_model`` and ``vision_projection``."""

    vision_model: Blip2VisionModel
    vision_projection: nn.Linear
    query_tokens: nn.Parameter
    qformer: Blip2QFormerModel
    device: torch.device

    def vision_features(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """The vision encoder output the Q-Former attends to (LAVIS: ln_vision(ViT(x))), [B, N+1, Dv]."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.vision_model.post_layernorm.weight.dtype)
        return self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state

    def query_output(self, image_feats: Tensor) -> Tensor:
        """The Q-Former's query outputs for image features [B, N+1, Dv] -> [B, Q, D] (fp32)."""
        queries = self.query_tokens.expand(image_feats.shape[0], -1, -1)  # [B, Q, D]
        return self.qformer(queries, image_feats)

    def image_embeds_from_features(self, image_feats: Tensor) -> Tensor:
        """Normalised ITC query embeddings [B, Q, E] from vision features [B, N+1, Dv]."""
        proj = self.vision_projection
        return F.normalize(proj(self.query_output(image_feats).to(proj.weight.dtype)), dim=-1)


class _TextTower:
    """ITC text side, for classes with ``embeddings`` (Q-Former text embeddings)."""

    embeddings: Blip2QFormerTextEmbeddings
    qformer: Blip2QFormerModel
    device: torch.device

    def text_hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                           position_ids: Tensor | None = None) -> Tensor:
        """The Q-Former run on text alone (no queries, no image), [B, T, D]."""
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        x = self.embeddings(input_ids, position_ids=position_ids)  # [B, T, D]
        return self.qformer(x, query_length=0, attention_mask=attention_mask)


class Blip2ForImageTextRetrieval(_ImageTower, _TextTower, _Blip2QFormerBase):
    """Image-text matching and contrastive retrieval (transformers' ``Blip2ForImageTextRetrieval``).

    Keys: ``vision_model.*``, ``query_tokens``, ``embeddings.*``, ``qformer.*``,
    ``vision_projection.*``, ``text_projection.*``, ``itm_head.*``.
    """

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        D, E = config.qformer_config.hidden_size, config.image_text_hidden_size
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.embeddings = Blip2QFormerTextEmbeddings(config.qformer_config)
        self.vision_projection = nn.Linear(D, E)
        self.text_projection = nn.Linear(D, E)
        self.itm_head = nn.Linear(D, 2)

    # -- ITC ---------------------------------------------------------------------------------------

    def image_embeds(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """Normalised ITC query embeddings, [B, Q, E]."""
        return self.image_embeds_from_features(self.vision_features(pixel_values, interpolate_pos_encoding))

    def text_embeds(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Normalised ITC text embedding (projected CLS output), [B, E].

        input_ids [B, T]: Q-Former (BERT) token ids, CLS first, no image tokens.
        """
        cls = self.text_hidden_states(input_ids, attention_mask)[:, 0]  # [B, D]
        return F.normalize(self.text_projection(cls.to(self.text_projection.weight.dtype)), dim=-1)

    def itc_scores(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Cosine similarity of every image with every text (max over queries), [B_img, B_txt]."""
        return itc_similarity(self.image_embeds(pixel_values), self.text_embeds(input_ids, attention_mask))

    # -- ITM ---------------------------------------------------------------------------------------

    def _joint_mask(self, attention_mask: Tensor | None) -> Tensor | None:
        """Text mask [B, T] -> [B, Q+T] mask over [queries; text]: queries always attend."""
        if attention_mask is None:
            return None
        ones = attention_mask.new_ones(attention_mask.shape[0], self.config.num_query_tokens)
        return torch.cat([ones, attention_mask], dim=1)

    def _itm_hidden(self, image_feats: Tensor, input_ids: Tensor, joint_mask: Tensor | None) -> Tensor:
        """The Q-Former over [queries; text] attending to the image, [B, Q+T, D] for pairs (image b, text b)."""
        B, Q = input_ids.shape[0], self.config.num_query_tokens
        if image_feats.shape[0] != B:
            raise ValueError(f"ITM scores pairs: got {image_feats.shape[0]} images and {B} texts")
        queries = self.query_tokens.expand(B, -1, -1)  # [B, Q, D]
        x = self.embeddings(input_ids.to(self.device), queries)  # [B, Q+T, D]
        if joint_mask is not None:
            joint_mask = joint_mask.to(self.device)
        return self.qformer(x, image_feats, query_length=Q, attention_mask=joint_mask)

    def _itm_head(self, hidden: Tensor) -> Tensor:
        """ITM head on the query outputs of [B, Q+T, D], averaged over queries -> [B, 2]."""
        Q = self.config.num_query_tokens
        return self.itm_head(hidden[:, :Q].to(self.itm_head.weight.dtype)).mean(dim=1)

    def itm_logits_from_features(self, image_feats: Tensor, input_ids: Tensor,
                                 attention_mask: Tensor | None = None) -> Tensor:
        """ITM logits [B, 2] for pairs from vision features [B, N+1, Dv] and text ids/mask [B, T]."""
        return self._itm_head(self._itm_hidden(image_feats, input_ids, self._joint_mask(attention_mask)))

    def itm_logits(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """ITM logits [B, 2] (index 1 = match) for pairs (image b, text b)."""
        return self.itm_logits_from_features(self.vision_features(pixel_values), input_ids, attention_mask)

    def itm_scores(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The "match" logit averaged over queries, [B]: LAVIS ``compute_itm``, the re-ranking score."""
        return self.itm_logits(pixel_values, input_ids, attention_mask)[:, 1]

    # -- transformers' forward -----------------------------------------------------------------------

    def _split_image_tokens(self, input_ids: Tensor, attention_mask: Tensor | None
                            ) -> tuple[Tensor, Tensor | None, bool]:
        """Drop the ``num_query_tokens`` image tokens a processor puts in front of the text.

        transformers drops the first Q ids whenever ``image_token_index`` is set; we drop them only
        when they are image tokens, so text without them is not cut.
        """
        Q, image_token = self.config.num_query_tokens, self.config.image_token_index
        present = (image_token is not None and input_ids.shape[1] >= Q
                   and bool((input_ids[:, :Q] == image_token).all()))
        if not present:
            return input_ids, attention_mask, False
        return input_ids[:, Q:], None if attention_mask is None else attention_mask[:, Q:], True

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                use_image_text_matching_head: bool = False,
                interpolate_pos_encoding: bool = False) -> Blip2ImageTextMatchingOutput:
        """ITM logits for pairs (image b, text b), or ITC logits for all images x all texts.

        ``input_ids`` may start with the processor's ``num_query_tokens`` image tokens; their mask
        columns then cover the queries (as in the reference).
        """
        image_feats = self.vision_features(pixel_values, interpolate_pos_encoding)  # [B, N+1, Dv]
        ids, mask, had_image_tokens = self._split_image_tokens(input_ids, attention_mask)
        if use_image_text_matching_head:
            # with image tokens the given mask already spans [queries; text], as the reference uses it
            joint = attention_mask if had_image_tokens else self._joint_mask(mask)
            hidden = self._itm_hidden(image_feats, ids, joint)  # [B, Q+T, D]
            logits = self._itm_head(hidden)  # [B, 2]
            return Blip2ImageTextMatchingOutput(logits, logits.t(), hidden, image_feats)
        image_embeds = self.image_embeds_from_features(image_feats)  # [Bi, Q, E]
        text_embeds = self.text_embeds(ids, mask)  # [Bt, E]
        logits = itc_similarity(image_embeds, text_embeds)  # [Bi, Bt]
        if self.config.temperature is not None:
            logits = logits / self.config.temperature
        return Blip2ImageTextMatchingOutput(logits, logits.t(), text_embeds, image_embeds)


class Blip2TextModelWithProjection(_TextTower, _Blip2QFormerBase):
    """The ITC text tower (transformers' ``Blip2TextModelWithProjection``).

    Keys: ``query_tokens`` (unused, kept for the format), ``embeddings.*``, ``qformer.*``,
    ``text_projection.*``. Loads from a full retrieval checkpoint, skipping the image tower.
    """

    _ignored_checkpoint_prefixes = ("vision_model.", "vision_projection.", "itm_head.")

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        self.embeddings = Blip2QFormerTextEmbeddings(config.qformer_config)
        self.text_projection = nn.Linear(config.qformer_config.hidden_size, config.image_text_hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Blip2TextModelOutput:
        """input_ids/attention_mask [B, T] -> every position projected and normalised, [B, T, E]."""
        hidden = self.text_hidden_states(input_ids, attention_mask, position_ids)  # [B, T, D]
        embeds = F.normalize(self.text_projection(hidden.to(self.text_projection.weight.dtype)), dim=-1)
        return Blip2TextModelOutput(embeds, hidden)


class Blip2VisionModelWithProjection(_ImageTower, _Blip2QFormerBase):
    """The ITC image tower (transformers' ``Blip2VisionModelWithProjection``).

    Keys: ``vision_model.*``, ``query_tokens``, ``qformer.*``, ``vision_projection.*``. Loads from a
    full retrieval checkpoint, skipping the text tower.
    """

    _ignored_checkpoint_prefixes = ("embeddings.", "text_projection.", "itm_head.")

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.vision_projection = nn.Linear(config.qformer_config.hidden_size, config.image_text_hidden_size)

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Blip2VisionModelOutput:
        """pixel_values [B, 3, H, W] -> normalised query embeddings [B, Q, E] and the vision output."""
        image_feats = self.vision_features(pixel_values, interpolate_pos_encoding)  # [B, N+1, Dv]
        return Blip2VisionModelOutput(self.image_embeds_from_features(image_feats), image_feats)

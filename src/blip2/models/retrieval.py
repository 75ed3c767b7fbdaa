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

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2.checkpoint import PretrainedMixin
from blip2.config import Blip2Config
from blip2.layout_files import Foreground
from blip2.models.outputs import (Blip2ImageTextMatchingModelOutput, Blip2TextModelOutput, Blip2VisionModelOutput,
                                  finish)
from blip2.models.qformer import Blip2QFormerModel, Blip2QFormerTextEmbeddings
from blip2.models.vision import Blip2VisionModel

__all__ = [
    "Blip2ForImageTextRetrieval",
    "Blip2TextModelWithProjection",
    "Blip2VisionModelWithProjection",
    "itc_similarity",
]


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
        if not self.query_tokens.is_meta:  # on the meta device a checkpoint fills it: nothing to draw
            nn.init.normal_(self.query_tokens, std=config.initializer_range)
        self.qformer = Blip2QFormerModel(config.qformer_config)


class _ImageTower:
    """ITC image side, for classes with ``vision_model`` and ``vision_projection``."""

    vision_model: Blip2VisionModel
    vision_projection: nn.Linear
    query_tokens: nn.Parameter
    qformer: Blip2QFormerModel
    device: torch.device

    def vision_features(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """The vision encoder output the Q-Former attends to (LAVIS: ln_vision(ViT(x))), [B, N+1, Dv]."""
        return self.vision_outputs(pixel_values, interpolate_pos_encoding).last_hidden_state

    # each pass of the vision encoder or the Q-Former is Foreground work: the cache's file writers pause while
    # it runs (blip2.layout_files), as for generate
    @Foreground()
    def vision_outputs(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False, **flags: Any) -> Any:
        """The vision encoder's outputs (``flags``: ``output_attentions``, ``output_hidden_states``)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.vision_model.post_layernorm.weight.dtype)
        return self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **flags)

    @Foreground()
    def query_outputs(self, image_feats: Tensor, **flags: Any) -> Any:
        """The Q-Former's outputs for the queries over image features [B, N+1, Dv]: last_hidden_state [B, Q, D]."""
        queries = self.query_tokens.expand(image_feats.shape[0], -1, -1)  # [B, Q, D]
        return self.qformer(queries, image_feats, **flags)

    def project_queries(self, query_output: Tensor) -> Tensor:
        """Normalised ITC query embeddings [B, Q, E] from the Q-Former's query outputs [B, Q, D]."""
        proj = self.vision_projection
        return F.normalize(proj(query_output.to(proj.weight.dtype)), dim=-1)

    def image_embeds_from_features(self, image_feats: Tensor) -> Tensor:
        """Normalised ITC query embeddings [B, Q, E] from vision features [B, N+1, Dv]."""
        return self.project_queries(self.query_outputs(image_feats).last_hidden_state)


class _TextTower:
    """ITC text side, for classes with ``embeddings`` (Q-Former text embeddings)."""

    embeddings: Blip2QFormerTextEmbeddings
    qformer: Blip2QFormerModel
    device: torch.device

    @Foreground()
    def text_outputs(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                     position_ids: Tensor | None = None, **flags: Any) -> Any:
        """The Q-Former's outputs on text alone (no queries, no image): last_hidden_state [B, T, D]."""
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        x = self.embeddings(input_ids, position_ids=position_ids)  # [B, T, D]
        return self.qformer(x, query_length=0, attention_mask=attention_mask, **flags)


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
        return self.project_text(self.text_outputs(input_ids, attention_mask).last_hidden_state[:, 0])

    def project_text(self, cls: Tensor) -> Tensor:
        """Normalised ITC text embedding [B, E] from the Q-Former's CLS output [B, D]."""
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

    @Foreground()
    def _itm_qformer(self, image_feats: Tensor, input_ids: Tensor, joint_mask: Tensor | None, **flags: Any) -> Any:
        """The Q-Former over [queries; text] attending to the image: last_hidden_state [B, Q+T, D] for pairs
        (image b, text b)."""
        B, Q = input_ids.shape[0], self.config.num_query_tokens
        if image_feats.shape[0] != B:
            raise ValueError(f"ITM scores pairs: got {image_feats.shape[0]} images and {B} texts")
        queries = self.query_tokens.expand(B, -1, -1)  # [B, Q, D]
        x = self.embeddings(input_ids.to(self.device), queries)  # [B, Q+T, D]
        if joint_mask is not None:
            joint_mask = joint_mask.to(self.device)
        return self.qformer(x, image_feats, query_length=Q, attention_mask=joint_mask, **flags)

    def _itm_head(self, hidden: Tensor) -> Tensor:
        """ITM head on the query outputs of [B, Q+T, D], averaged over queries -> [B, 2]."""
        Q = self.config.num_query_tokens
        return self.itm_head(hidden[:, :Q].to(self.itm_head.weight.dtype)).mean(dim=1)

    def itm_logits_from_features(self, image_feats: Tensor, input_ids: Tensor,
                                 attention_mask: Tensor | None = None) -> Tensor:
        """ITM logits [B, 2] for pairs from vision features [B, N+1, Dv] and text ids/mask [B, T]."""
        hidden = self._itm_qformer(image_feats, input_ids, self._joint_mask(attention_mask)).last_hidden_state
        return self._itm_head(hidden)

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
                use_image_text_matching_head: bool = False, interpolate_pos_encoding: bool = False,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None) -> Any:
        """ITM logits for pairs (image b, text b), or ITC logits for all images x all texts, with the Q-Former's
        (``text_model_output``) and vision encoder's outputs (a ``Blip2ImageTextMatchingModelOutput``).

        ``input_ids`` may start with the processor's ``num_query_tokens`` image tokens; their mask
        columns then cover the queries (as in the reference).
        """
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        vision_outputs = self.vision_outputs(pixel_values, interpolate_pos_encoding, **flags)
        image_feats = vision_outputs.last_hidden_state  # [B, N+1, Dv]
        ids, mask, had_image_tokens = self._split_image_tokens(input_ids, attention_mask)
        if use_image_text_matching_head:
            # with image tokens the given mask already spans [queries; text], as the reference uses it
            joint = attention_mask if had_image_tokens else self._joint_mask(mask)
            text_outputs = self._itm_qformer(image_feats, ids, joint, **flags)
            text_embeds, image_embeds = text_outputs.last_hidden_state, image_feats  # [B, Q+T, D], [B, N+1, Dv]
            logits = self._itm_head(text_embeds)  # [B, 2]
        else:
            image_embeds = self.image_embeds_from_features(image_feats)  # [Bi, Q, E]
            text_outputs = self.text_outputs(ids, mask, **flags)
            text_embeds = self.project_text(text_outputs.last_hidden_state[:, 0])  # [Bt, E]
            logits = itc_similarity(image_embeds, text_embeds)  # [Bi, Bt]
            if self.config.temperature is not None:
                logits = logits / self.config.temperature
        return finish(Blip2ImageTextMatchingModelOutput(
            logits_per_image=logits, logits_per_text=logits.t(), text_embeds=text_embeds, image_embeds=image_embeds,
            text_model_output=text_outputs, vision_model_output=vision_outputs), return_dict)


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

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None) -> Any:
        """input_ids/attention_mask [B, T] -> ``text_embeds``: every position projected and normalised [B, T, E]
        (CLS is position 0), ``last_hidden_state`` [B, T, D] (a ``Blip2TextModelOutput``)."""
        out = self.text_outputs(input_ids, attention_mask, position_ids, output_attentions=output_attentions,
                                output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state  # [B, T, D]
        embeds = F.normalize(self.text_projection(hidden.to(self.text_projection.weight.dtype)), dim=-1)
        return finish(Blip2TextModelOutput(text_embeds=embeds, last_hidden_state=hidden, hidden_states=out.hidden_states,
                                           attentions=out.attentions), return_dict)


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

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None) -> Any:
        """pixel_values [B, 3, H, W] -> ``image_embeds``: normalised query embeddings [B, Q, E], and the vision
        encoder's ``last_hidden_state``, ``hidden_states``, ``attentions`` (a ``Blip2VisionModelOutput``)."""
        vision = self.vision_outputs(pixel_values, interpolate_pos_encoding, output_attentions=output_attentions,
                                     output_hidden_states=output_hidden_states)
        return finish(Blip2VisionModelOutput(
            image_embeds=self.image_embeds_from_features(vision.last_hidden_state),
            last_hidden_state=vision.last_hidden_state, hidden_states=vision.hidden_states,
            attentions=vision.attentions), return_dict)

"""BLIP-2 (Li et al., 2023): frozen image encoder -> Q-Former -> projection -> frozen LM.

    pixel_values [B,3,H,W]
      -> vision_model             image_embeds [B, N+1, Dv]
      -> qformer(query_tokens)    query_output [B, Q, Dq]   (cross-attends to image_embeds)
      -> language_projection      lm_inputs    [B, Q, D_lm]
      -> language_model           OPT (decoder-only) or Flan-T5 (encoder-decoder)

The projected queries reach the LM in one of two ways: written over the ``<image>`` tokens the
processor puts in ``input_ids`` (transformers >= 4.47 checkpoints), or, when ``input_ids`` has
no image tokens, prepended to the prompt embeddings with the attention mask extended (legacy).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from blip2.checkpoint import PretrainedMixin
from blip2.config import Blip2Config
from blip2.generation import GenerationConfig, generate, resolve
from blip2.layout_files import Foreground
from blip2.models.opt import OPTForCausalLM
from blip2.models.t5 import T5ForConditionalGeneration, seq2seq_lm_loss
from blip2.models.outputs import (BaseModelOutputWithPast, Blip2ForConditionalGenerationModelOutput,
                                  CausalLMOutputWithPast, Recorder, Seq2SeqLMOutput, finish)
from blip2.models.qformer import Blip2QFormerModel
from blip2.models.vision import Blip2VisionModel

__all__ = ["Blip2Model", "Blip2ForConditionalGeneration"]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the last ``labels.size(1)`` positions; -100 is ignored."""
    logits = logits[:, -labels.size(1):, :]
    shift_logits = logits[:, :-1, :].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:].to(logits.device)  # [B, T-1]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100)


class Blip2Model(PretrainedMixin, nn.Module):
    config_class = Blip2Config
    # The speed layer applies from outside: the package's __init__ sets this to blip2.fast.lazy, whose ``loaded``
    # runs after from_pretrained and ``before_generate(model, rows)`` at each generate (rows: the rows it decodes);
    # the model file imports none of it.
    speed_layer: ClassVar[Any] = None
    fast = "none"  # the speed-up generate applies (blip2.fast.MODES): a model built in code runs as written
    # The reference keeps these in fp32 under fp16 only; we keep them in fp32 under bf16 too, as
    # BLIP-2 was trained (the Q-Former is small, so it costs little).
    _keep_in_fp32_modules = ("query_tokens", "qformer")

    def keeps_fp32(self, key: str, dtype: torch.dtype) -> bool:
        if super().keeps_fp32(key, dtype):
            return True
        # T5 under fp16: every FFN output projection stays fp32 (its activations overflow fp16)
        return (dtype == torch.float16 and not self.config.use_decoder_only_language_model
                and key.startswith("language_model.") and ".DenseReluDense.wo." in key)

    def __init__(self, config: Blip2Config) -> None:
        super().__init__()
        self.config = config
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        if config.use_decoder_only_language_model:
            self.language_model: OPTForCausalLM | T5ForConditionalGeneration = OPTForCausalLM(config.text_config)
        else:
            self.language_model = T5ForConditionalGeneration(config.text_config)
        t = config.text_config
        self.generation_config = GenerationConfig(
            bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
            decoder_start_token_id=getattr(t, "decoder_start_token_id", None))

    # -- weights -------------------------------------------------------------------------------

    @classmethod
    @Foreground()  # (with the speed layer's setup)
    def from_pretrained(cls, path_or_id: str | os.PathLike, fast: str = "auto", **kwargs: Any) -> Any:
        """``PretrainedMixin.from_pretrained``, and ``fast``: the speed-up ``generate`` uses (``blip2.fast.lazy``).
        "auto" (the default): the fastest exact one on this machine, applied by ``generate`` and undone by anything
        that needs the plain modules (on a CPU, a large language model decodes one row on its weights as loaded
        and is laid out for several, or at load where the load converts it to ``dtype``: ``blip2.fast.lazy``);
        "none": the model as written; another mode of ``blip2.fast.MODES``: applied now, for inference only
        (``blip2.fast.apply``)."""
        layer = cls.speed_layer  # (set whenever blip2 is imported, which importing this file does)
        # fast="auto" lays a large language model out at load where that converts it anyway (blip2.fast.lazy)
        model = cls._load(path_or_id, kwargs, defer=layer.deferred if layer is not None and fast == "auto" else None)
        model.fast = fast
        if layer is not None:
            layer.loaded(model)
        return model

    def _after_load(self, directory: str) -> None:
        path = os.path.join(directory, "generation_config.json")
        if os.path.exists(path):
            self.generation_config = GenerationConfig.from_json_file(path)

    def _save_extra(self, directory: str) -> None:
        self.generation_config.save_pretrained(directory)

    # -- the three stages ------------------------------------------------------------------------

    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> Any:
        """Vision encoder output: ``(last_hidden_state [B,N+1,Dv], pooler_output [B,Dv])``."""
        pixel_values = pixel_values.to(self.vision_model.embeddings.patch_embedding.weight.dtype)
        return self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)

    def get_qformer_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The Q-Former's last hidden states for the queries, [B, Q, Dq]."""
        return self.image_to_lm_inputs(pixel_values, interpolate_pos_encoding)[1].last_hidden_state

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                          ) -> BaseModelOutputWithPast:
        """The LM's text hidden states, ``last_hidden_state`` [B, T, D]: OPT's decoder output or T5's encoder
        output (transformers 5 returns them in an output object too)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.get_input_embeddings()(input_ids)
        if isinstance(self.language_model, T5ForConditionalGeneration):
            return BaseModelOutputWithPast(last_hidden_state=self.language_model.encode(embeds, attention_mask))
        return BaseModelOutputWithPast(last_hidden_state=self.language_model.hidden_states(embeds, attention_mask))

    def image_to_lm_inputs(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                           output_attentions: bool | None = None, output_hidden_states: bool | None = None
                           ) -> tuple[Any, Any, torch.Tensor]:
        """Run vision and Q-Former: ``(vision_outputs, qformer_outputs, projected queries [B, Q, D_lm])``."""
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        pixel_values = pixel_values.to(self.vision_model.embeddings.patch_embedding.weight.dtype)
        vision_outputs = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **flags)
        query = self.query_tokens.expand(pixel_values.shape[0], -1, -1)
        qformer_outputs = self.qformer(query, vision_outputs.last_hidden_state.to(query.dtype), **flags)
        lm_inputs = self.language_projection(
            qformer_outputs.last_hidden_state.to(self.language_projection.weight.dtype))
        return vision_outputs, qformer_outputs, lm_inputs

    def merge_image_inputs(self, lm_inputs: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM input embeddings with the image placed in them, and the matching mask.

        ``<image>`` tokens present: their embeddings are replaced by the projected queries
        (exactly ``num_query_tokens`` per row). None present: the queries are prepended (legacy).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.get_input_embeddings()(input_ids)  # [B, T, D]
        lm_inputs = lm_inputs.to(embeds.dtype)
        image_token = self.config.image_token_index
        is_image = input_ids == image_token if image_token is not None \
            else torch.zeros_like(input_ids, dtype=torch.bool)
        counts = is_image.sum(1)
        if bool((counts == 0).all()):
            embeds = torch.cat([lm_inputs, embeds], dim=1)
            attention_mask = torch.cat([attention_mask.new_ones(lm_inputs.shape[:2]), attention_mask], dim=1)
            return embeds, attention_mask
        q = lm_inputs.shape[1]
        if bool((counts != q).any()):
            raise ValueError(
                f"input_ids: every row needs exactly num_query_tokens={q} <image> tokens (id {image_token}) "
                f"or none; got counts {counts.tolist()}"
            )
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), lm_inputs)
        return embeds, attention_mask

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, interpolate_pos_encoding: bool = False,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None) -> Any:
        """``loss`` (with ``labels``), ``logits`` [B, T, V] and the ``vision_outputs``, ``qformer_outputs`` and
        ``language_model_outputs`` of the three stages, as a ``Blip2ForConditionalGenerationModelOutput`` (a
        tuple with ``return_dict=False``). ``output_hidden_states`` / ``output_attentions`` reach every stage."""
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        vision_outputs, qformer_outputs, lm_inputs = self.image_to_lm_inputs(pixel_values, interpolate_pos_encoding,
                                                                             **flags)
        embeds, mask = self.merge_image_inputs(lm_inputs, input_ids, attention_mask)
        if self.config.use_decoder_only_language_model:
            lm_outputs = _causal_lm_outputs(self.language_model, embeds, mask, **flags)
            loss = None if labels is None else causal_lm_loss(lm_outputs.logits, labels)
        else:
            lm_outputs = _seq2seq_lm_outputs(self.language_model, embeds, mask, decoder_input_ids,
                                             decoder_attention_mask, labels, **flags)
            loss = lm_outputs.loss
        return finish(Blip2ForConditionalGenerationModelOutput(
            loss=loss, logits=lm_outputs.logits, vision_outputs=vision_outputs, qformer_outputs=qformer_outputs,
            language_model_outputs=lm_outputs), return_dict)

    # -- generation --------------------------------------------------------------------------

    @torch.no_grad()
    @Foreground()  # the cache's file writers pause while it runs (blip2.layout_files)
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, interpolate_pos_encoding: bool = False,
                 generation_config: Any = None, logits_processor: Sequence[Callable[..., Any]] | None = None,
                 stopping_criteria: Sequence[Callable[..., Any]] | None = None, streamer: Any = None,
                 **kwargs: Any) -> Any:
        """Captions or answers, as token ids (transformers 5.x convention), or a ``GenerateOutput`` with
        ``return_dict_in_generate=True``.

        Decoder-only: the prompt ``input_ids`` (image tokens included) followed by the new tokens.
        Encoder-decoder: ``decoder_start_token_id`` followed by the new tokens. Finished rows are
        padded with ``pad_token_id``. ``kwargs`` are ``GenerationConfig`` fields; they win over
        ``generation_config`` (ours, transformers' or a dict), whose set fields win over the model's
        ``generation_config``. ``logits_processor``, ``stopping_criteria`` and ``streamer`` are transformers'
        hooks (see ``blip2.generation.generate``).
        """
        cfg = resolve(self.generation_config, generation_config, kwargs)
        batch = pixel_values.shape[0]
        if self.speed_layer is not None:
            self.speed_layer.before_generate(self, batch * max(cfg.num_beams, cfg.num_return_sequences))
        device = self.device
        _, _, lm_inputs = self.image_to_lm_inputs(pixel_values.to(device), interpolate_pos_encoding)
        if input_ids is None:
            start: list[int] = []
            if self.config.image_token_index is not None:
                start += [self.config.image_token_index] * self.config.num_query_tokens
            if self.config.use_decoder_only_language_model:
                start += [self.config.text_config.bos_token_id]
            input_ids = torch.tensor([start] * batch, dtype=torch.long, device=device)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
        input_ids = input_ids.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        if input_ids.shape[1] == 0:  # T5 with no prompt: the queries alone form the encoder input
            embeds, mask = lm_inputs, torch.ones(lm_inputs.shape[:2], dtype=torch.long, device=device)
        else:
            embeds, mask = self.merge_image_inputs(lm_inputs, input_ids, attention_mask)
        lm = self.language_model

        def start_decoder(expand: int, max_new_tokens: int) -> Any:
            return lm.start_decoding(embeds, mask, expand=expand, max_new_tokens=max_new_tokens)

        if self.config.use_decoder_only_language_model:
            # the prompt's padding is left out of the repetition penalty, as transformers does
            prefix, prefix_mask = input_ids, attention_mask
        else:
            prefix = torch.full((batch, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
            prefix_mask = None
        return generate(start_decoder, prefix, cfg, prefix_mask=prefix_mask, streamer=streamer,
                        logits_processor=logits_processor, stopping_criteria=stopping_criteria)


def _causal_lm_outputs(lm: OPTForCausalLM, embeds: torch.Tensor, mask: torch.Tensor,
                       output_attentions: bool | None, output_hidden_states: bool | None) -> CausalLMOutputWithPast:
    """OPT over the merged embeddings; hidden states and attentions recorded when asked."""
    with Recorder(lm.model.decoder.layers, output_hidden_states, output_attentions) as rec:
        h = lm.hidden_states(embeds, mask)  # [B, T, E]
    return CausalLMOutputWithPast(logits=lm.logits(h), hidden_states=rec.hidden_states(h), attentions=rec.attentions)


def _seq2seq_lm_outputs(lm: T5ForConditionalGeneration, embeds: torch.Tensor, mask: torch.Tensor,
                        decoder_input_ids: torch.Tensor | None, decoder_attention_mask: torch.Tensor | None,
                        labels: torch.Tensor | None, output_attentions: bool | None,
                        output_hidden_states: bool | None) -> Seq2SeqLMOutput:
    """T5 over the merged embeddings, teacher-forced; the loss with ``labels``, as transformers' T5 computes it."""
    with Recorder(lm.encoder.block, output_hidden_states, output_attentions) as enc_rec:
        enc = lm.encode(embeds, mask)  # [B, S, D]
    with Recorder(lm.decoder.block, output_hidden_states, output_attentions) as dec_rec:
        h = lm.decode(enc, mask, decoder_input_ids, decoder_attention_mask, labels)  # [B, Td, D]
    logits = lm.logits(h)
    # the decoder's blocks attend to themselves, then to the encoder output: its weights alternate
    weights = dec_rec.attentions
    return Seq2SeqLMOutput(
        loss=None if labels is None else seq2seq_lm_loss(logits, labels), logits=logits,
        decoder_hidden_states=dec_rec.hidden_states(h), decoder_attentions=None if weights is None else weights[::2],
        cross_attentions=None if weights is None else weights[1::2], encoder_last_hidden_state=enc,
        encoder_hidden_states=enc_rec.hidden_states(enc), encoder_attentions=enc_rec.attentions)


class Blip2ForConditionalGeneration(Blip2Model):
    """Captioning and VQA: ``forward`` with ``labels`` gives the LM loss, ``generate`` the text."""

"""What the models' ``forward`` return, read the way transformers' outputs are read.

``ModelOutput`` is a dict whose fields are also attributes: ``out.logits``, ``out["logits"]``, ``out[0]``,
``out.keys()``, ``out.to_tuple()``. As in transformers, a field left as None is not a key and takes no
place in the tuple, but reads as None as an attribute. Each subclass names its fields (transformers' names,
in transformers' order).

``Recorder`` collects what ``output_hidden_states`` / ``output_attentions`` ask for from outside the layers,
so no layer threads flags or output objects through: the input of each layer (a forward pre-hook), then
the model's final state, is ``hidden_states``; the attention weights come from ``layers.attention``,
which computes them only while a recorder listens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from blip2.models.layers import record_attention_weights

__all__ = ["ModelOutput", "BaseModelOutputWithPooling", "BaseModelOutputWithPoolingAndCrossAttentions",
           "CausalLMOutputWithPast", "Seq2SeqLMOutput", "Blip2ForConditionalGenerationModelOutput",
           "Blip2ImageTextMatchingModelOutput", "Blip2TextModelOutput", "Blip2VisionModelOutput", "Recorder",
           "finish"]


class ModelOutput(dict):
    """A model's outputs by name; see the module doc. Nested outputs become tuples in ``to_tuple``."""

    fields: tuple[str, ...] = ()

    def __init__(self, data: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /, **values: Any) -> None:
        # a mapping or pairs too: torch and accelerate rebuild dict subclasses as type(out)(pairs)
        values = {**dict(data), **values}
        unknown = sorted(set(values) - set(self.fields))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown fields {unknown} (known: {list(self.fields)})")
        super().__init__((k, values[k]) for k in self.fields if values.get(k) is not None)

    def __getattr__(self, name: str) -> Any:
        if name in type(self).fields:
            return self.get(name)
        raise AttributeError(f"{type(self).__name__} has no field {name!r} (fields: {list(self.fields)})")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in type(self).fields:
            raise AttributeError(f"{type(self).__name__} has no field {name!r} (fields: {list(self.fields)})")
        if value is None:
            self.pop(name, None)
        else:
            self[name] = value

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are set, in order; nested outputs as tuples."""
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())

    def __reduce__(self) -> Any:  # pickle and deepcopy through the constructor
        return type(self), (dict(self),)


def finish(output: ModelOutput, return_dict: bool | None) -> ModelOutput | tuple[Any, ...]:
    """``output``, or its tuple when ``return_dict=False`` (transformers' convention; None means a dict)."""
    return output.to_tuple() if return_dict is False else output


class BaseModelOutputWithPast(ModelOutput):
    fields = ("last_hidden_state", "past_key_values", "hidden_states", "attentions")


class BaseModelOutputWithPooling(ModelOutput):
    fields = ("last_hidden_state", "pooler_output", "hidden_states", "attentions")


class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    fields = ("last_hidden_state", "pooler_output", "past_key_values", "hidden_states", "attentions",
              "cross_attentions")


class CausalLMOutputWithPast(ModelOutput):
    fields = ("loss", "logits", "past_key_values", "hidden_states", "attentions")


class Seq2SeqLMOutput(ModelOutput):
    fields = ("loss", "logits", "past_key_values", "decoder_hidden_states", "decoder_attentions",
              "cross_attentions", "encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions")


class Blip2ForConditionalGenerationModelOutput(ModelOutput):
    fields = ("loss", "logits", "vision_outputs", "qformer_outputs", "language_model_outputs")


class Blip2ImageTextMatchingModelOutput(ModelOutput):
    fields = ("loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "text_model_output",
              "vision_model_output")


class Blip2TextModelOutput(ModelOutput):
    fields = ("text_embeds", "last_hidden_state", "hidden_states", "attentions")


class Blip2VisionModelOutput(ModelOutput):
    fields = ("image_embeds", "last_hidden_state", "hidden_states", "attentions")


class Recorder:
    """``with Recorder(layers, hidden_states, attentions) as rec:`` run the layers; then
    ``rec.hidden_states(final)`` is (input of each layer in ``layers``..., ``final``) and ``rec.attentions``
    the weights [B, H, T, S] of every attention call in call order, or None where not asked for."""

    def __init__(self, layers: Iterable[nn.Module], hidden_states: bool | None, attentions: bool | None) -> None:
        self._layers = list(layers) if hidden_states else []
        self._want_hidden, self._want_attentions = bool(hidden_states), bool(attentions)
        self._inputs: list[Tensor] = []
        self._weights: list[Tensor] = []
        self._hooks: list[Any] = []
        self._listening: Any = None

    def __enter__(self) -> Recorder:
        self._hooks = [layer.register_forward_pre_hook(lambda _m, args: self._inputs.append(args[0]))
                       for layer in self._layers]
        if self._want_attentions:
            self._listening = record_attention_weights(self._weights)
            self._listening.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        if self._listening is not None:
            self._listening.__exit__(*exc)

    def hidden_states(self, final: Tensor) -> tuple[Tensor, ...] | None:
        return (*self._inputs, final) if self._want_hidden else None

    @property
    def attentions(self) -> tuple[Tensor, ...] | None:
        return tuple(self._weights) if self._want_attentions else None

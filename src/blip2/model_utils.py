"""What code written for transformers' models calls on a model besides ``forward`` (``Trainer``, PEFT, client
scripts): parameter counts, gradient checkpointing, the embeddings and their size, ``push_to_hub``. One mixin,
applied to every model class through ``PretrainedMixin``; it works from outside the layers, so the model files
stay plain.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ModelUtilitiesMixin"]


def _checkpointed(layer: nn.Module, kwargs: dict[str, Any], *args: Any, **call_kwargs: Any) -> Any:
    """``layer``'s own forward, recomputed in the backward pass while training (activations not kept)."""
    if layer.training and torch.is_grad_enabled():
        return checkpoint(layer._plain_forward, *args, **kwargs, **call_kwargs)
    return layer._plain_forward(*args, **call_kwargs)


class ModelUtilitiesMixin:
    """transformers' ``PreTrainedModel`` utilities for an ``nn.Module`` with ``config``."""

    config: Any

    # -- what the model is ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go: the device of its first weights (the first device of a split model)."""
        return next(self.parameters()).device  # type: ignore[attr-defined]

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype the model computes in (its first floating-point weights')."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())  # type: ignore[attr-defined]

    @classmethod
    def can_generate(cls) -> bool:
        return callable(getattr(cls, "generate", None))

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (tied ones once); ``exclude_embeddings``: without ``nn.Embedding`` tables."""
        skip = ({id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}  # type: ignore[attr-defined]
                if exclude_embeddings else set())
        return sum(p.numel() for p in self.parameters()  # type: ignore[attr-defined]
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    # -- gradient checkpointing -----------------------------------------------------------------------

    def _checkpoint_layers(self) -> Iterator[nn.Module]:
        """The language model's layers (every layer of its ModuleLists)."""
        lm = getattr(self, "language_model", None)
        for module in (lm.modules() if lm is not None else ()):
            if isinstance(module, nn.ModuleList):
                yield from module

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute activations in the backward pass: the vision encoder's and Q-Former's own switch, and each
        language-model layer wrapped in ``torch.utils.checkpoint`` (``gradient_checkpointing_kwargs`` go to it;
        ``use_reentrant`` defaults to False)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():  # type: ignore[attr-defined]
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
        for layer in self._checkpoint_layers():
            if not hasattr(layer, "_plain_forward"):
                layer._plain_forward = layer.forward
            layer.forward = partial(_checkpointed, layer, kwargs)
        if kwargs["use_reentrant"]:  # reentrant checkpoints need an input that requires grad (frozen embeddings)
            self.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():  # type: ignore[attr-defined]
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False
        for layer in self._checkpoint_layers():
            if hasattr(layer, "_plain_forward"):
                del layer.forward, layer._plain_forward  # the class's forward again

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())  # type: ignore[attr-defined]

    def enable_input_require_grads(self) -> None:
        """The input embeddings' output requires grad (what PEFT asks for with frozen embeddings)."""
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(
            lambda _m, _args, out: out.requires_grad_(True))

    def disable_input_require_grads(self) -> None:
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()

    # -- embeddings -----------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding table: the language model's, or the Q-Former's text embeddings (retrieval)."""
        lm = getattr(self, "language_model", None)
        if lm is not None:
            return lm.get_input_embeddings()
        text = getattr(self, "embeddings", None)
        if text is not None and hasattr(text, "word_embeddings"):
            return text.word_embeddings
        raise NotImplementedError(f"{type(self).__name__} takes no token ids: it has no input embeddings")

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(getattr(self, "language_model", None), "lm_head", None)

    def _replace(self, old: nn.Module, new: nn.Module) -> None:
        """Put ``new`` everywhere ``old`` is registered (T5's table is ``shared`` and both stacks' ``embed_tokens``)."""
        for name, module in list(self.named_modules(remove_duplicate=False)):  # type: ignore[attr-defined]
            if module is old:
                owner, _, leaf = name.rpartition(".")
                setattr(self.get_submodule(owner), leaf, new)  # type: ignore[attr-defined]

    def set_input_embeddings(self, value: nn.Module) -> None:
        self._replace(self.get_input_embeddings(), value)

    def set_output_embeddings(self, value: nn.Module) -> None:
        self._replace(self.get_output_embeddings(), value)

    def tie_weights(self) -> None:
        """The head shares the input embeddings' table where the language model's config ties them."""
        head = self.get_output_embeddings()
        if head is not None and getattr(self.config.text_config, "tie_word_embeddings", False):
            head.weight = self.get_input_embeddings().weight

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """The vocabulary resized to ``new_num_tokens`` (rounded up to ``pad_to_multiple_of``): rows kept, new rows
        the mean of the old ones (``mean_resizing``) or drawn as at initialisation; an untied head resized alike;
        ``config.text_config.vocab_size`` updated. Returns the input embeddings."""
        old = self.get_input_embeddings()
        n = old.num_embeddings if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        head = self.get_output_embeddings()
        tied = head is not None and head.weight is old.weight
        new = nn.Embedding(n, old.embedding_dim, padding_idx=old.padding_idx, device=old.weight.device,
                           dtype=old.weight.dtype)
        new.weight.data = self._resized(old.weight.data, n, mean_resizing)
        self.set_input_embeddings(new)
        if head is not None and tied:
            head.weight = new.weight
        elif head is not None:
            new_head = nn.Linear(head.in_features, n, bias=head.bias is not None, device=head.weight.device,
                                 dtype=head.weight.dtype)
            new_head.weight.data = self._resized(head.weight.data, n, mean_resizing)
            if head.bias is not None:
                new_head.bias.data = torch.cat([head.bias.data, head.bias.data.new_zeros(max(n - head.out_features, 0))])[:n]
            self.set_output_embeddings(new_head)
        self.config.text_config.vocab_size = n
        return new

    def _resized(self, table: torch.Tensor, n: int, mean_resizing: bool) -> torch.Tensor:
        """Rows of ``table`` [V, D] kept up to ``n``; new rows the mean row, or normal(0, initializer_range)."""
        extra = n - table.shape[0]
        if extra <= 0:
            return table[:n].clone()
        if mean_resizing:
            rows = table.float().mean(0, keepdim=True).expand(extra, -1).to(table.dtype)
        else:
            std = getattr(self.config.text_config, "init_std", None) or self.config.initializer_range
            rows = torch.randn(extra, table.shape[1], device=table.device).mul_(std).to(table.dtype)
        return torch.cat([table, rows])

    # -- sharing ------------------------------------------------------------------------------------

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload model", private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str = "5GB") -> Any:
        """``save_pretrained`` into a new Hub repo (or an existing one); needs ``huggingface_hub``
        (``pip install 'blip2[hub]'``). Returns the commit information."""
        try:
            from huggingface_hub import HfApi
        except ImportError:
            raise ImportError("push_to_hub needs the huggingface_hub package (pip install 'blip2[hub]')") from None
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(os.path.join(tmp, "model"), max_shard_size=max_shard_size)  # type: ignore[attr-defined]
            return api.upload_folder(repo_id=repo_id, folder_path=os.path.join(tmp, "model"),
                                     commit_message=commit_message, revision=revision, create_pr=create_pr)

"""Load a BLIP-2 checkpoint once and run it on batches: captions, answers, chat, image-text matching.

The ``blip2`` command and the HTTP server share this object. Text generation uses the model's
``generate`` and the processor's ``prompt_inputs``, ``image_processor`` and ``batch_decode``; matching,
embedding and search use ``blip2.models.retrieval.Blip2ForImageTextRetrieval`` and
``blip2.apps.index.ImageIndex``.

    pipe = Pipeline.load("Salesforce/blip2-opt-2.7b", device="cuda")
    pipe.caption([image_a, image_b])                       # ["a cat on a sofa", "two dogs"]
    pipe.ask([image_a], ["what colour is the cat?"])       # ["black"]
    pipe.chat(image_a, [("what is it?", "a cat")], "where is it?")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from blip2.checkpoint import DTYPE_NAMES, parse_dtype
from blip2.demo import DEFAULT_MODEL
from blip2.generation import generated_texts
from blip2.models.retrieval import itc_similarity
from blip2.fast import Unsupported, apply as apply_fast, route
from blip2.hub import read_config, resolve_dir
from blip2.processing import Blip2Processor

__all__ = [
    "QUESTION_TEMPLATE",
    "GenerationOptions",
    "MatchScore",
    "Pipeline",
    "PipelineError",
    "chat_prompt",
    "model_class",
    "question_prompt",
    "resolve_device",
    "resolve_dtype",
]

# The prompt BLIP-2 was evaluated with for VQA (and what the transformers docs use).
QUESTION_TEMPLATE = "Question: {} Answer:"

Images = Sequence[Image.Image] | torch.Tensor  # PIL images, or pixel_values [B, 3, H, W] already preprocessed


class PipelineError(ValueError):
    """A request the loaded model cannot serve (wrong checkpoint kind, prompt too long, bad model path).

    When an argument is at fault, ``argument`` names it and ``value`` is what was given; the message reads
    ``fast='native': runs on CPU only ...`` (``blip2.apps.errors.cli_message`` names the option instead)."""

    def __init__(self, reason: str, argument: str | None = None, value: Any = None) -> None:
        self.reason, self.argument, self.value = reason, argument, value
        super().__init__(reason if argument is None else f"{argument}={value!r}: {reason}")


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode; hashable so the server can batch requests that share them."""

    max_new_tokens: int = 30
    num_beams: int = 1

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_beams"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class MatchScore:
    text: str
    itm: float  # probability that the text describes the image (ITM head, softmax over [no, yes])
    itc: float  # cosine similarity of image and text features (ITC, best of the query tokens)


def question_prompt(question: str) -> str:
    return QUESTION_TEMPLATE.format(question.strip())


def chat_prompt(history: Sequence[tuple[str, str]], question: str) -> str:
    """Earlier turns kept in the prompt: ``Question: q1 Answer: a1. Question: q2 Answer:``."""
    turns = [f"{question_prompt(q)} {a.strip().rstrip('.')}." for q, a in history]
    return " ".join([*turns, question_prompt(question)])


def resolve_device(device: str) -> torch.device:
    """``auto`` is the GPU when there is one; ``cpu``, ``cuda`` and ``cuda:N`` are taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "expected auto, cpu, cuda or cuda:N"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PipelineError(expected, "device", device) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError("CUDA is not available on this machine (use cpu)", "device", device)
    if dev.type not in ("cpu", "cuda"):
        raise PipelineError(expected, "device", device)
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """A name of ``blip2.checkpoint.DTYPE_NAMES``. ``auto``: float32 on CPU; bfloat16 on a GPU that has it
    (Flan-T5 overflows in float16), else float16."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return parse_dtype(dtype)
    except ValueError:
        raise PipelineError(f"expected one of {', '.join(DTYPE_NAMES)}", "dtype", dtype) from None


def model_class(directory: str) -> type:
    """The class a checkpoint directory's config.json names: ``Blip2ForImageTextRetrieval`` when its
    ``architectures`` say so, else ``Blip2ForConditionalGeneration``."""
    architectures = list(read_config(directory, PipelineError).get("architectures") or [])
    if "Blip2ForImageTextRetrieval" in architectures:
        from blip2.models.retrieval import Blip2ForImageTextRetrieval

        return Blip2ForImageTextRetrieval
    from blip2.models.blip2 import Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration


FAST = ("none", "auto", "fuse", "int8", "int8-dynamic", "native", "cuda-graph")  # Pipeline.load(fast=...), --fast


class Pipeline:
    """A BLIP-2 model and its processor, loaded once, run on batches under ``torch.inference_mode``."""

    def __init__(self, model: Any, processor: Any, name: str = "") -> None:
        self.model = model
        self.processor = processor
        self.name = name
        # retrieval checkpoints (Blip2ForImageTextRetrieval) have the ITM head and cannot generate
        self.is_retrieval = hasattr(model, "itm_head")

    @classmethod
    def load(cls, model: str | None = None, device: str = "auto", dtype: str = "auto", fast: str = "auto") -> Pipeline:
        """From a checkpoint directory or Hub id; ``None`` is the bundled demo model ``blip2.DEFAULT_MODEL``.

        ``fast`` (generation models; one of ``FAST``): a mode of ``blip2.fast.apply`` ("none", "auto", "fuse",
        "int8", "int8-dynamic", "native", "cuda-graph"; see ``blip2.fast``)."""
        if fast not in FAST:
            raise PipelineError(f"expected one of {', '.join(FAST)}", "fast", fast)
        if model is None:
            if not os.path.isdir(DEFAULT_MODEL):
                raise PipelineError(f"no model given and the bundled demo model is not installed ({DEFAULT_MODEL}); "
                                    "give a checkpoint directory or Hub id, e.g. Salesforce/blip2-opt-2.7b",
                                    "model")
            model = DEFAULT_MODEL
        dev = resolve_device(device)
        if fast == "cuda-graph" and dev.type != "cuda":
            raise PipelineError(f"needs a CUDA device; the model is on {dev}", "fast", fast)
        if fast == "native" and dev.type != "cpu":
            raise PipelineError(f"runs on CPU only; the model is on {dev} (use cuda-graph there)", "fast", fast)
        if fast == "int8-dynamic" and dev.type != "cpu":
            raise PipelineError(f"runs on CPU only; the model is on {dev} (use fuse or cuda-graph there)", "fast", fast)
        dt = resolve_dtype(dtype, dev)
        try:
            directory = resolve_dir(model)
            net = model_class(directory).from_pretrained(directory, torch_dtype=dt, device=dev)
            processor = Blip2Processor.from_pretrained(directory)
        except (OSError, ValueError) as e:  # CheckpointError/ConfigError are ValueErrors naming the file
            raise PipelineError(f"cannot load model {model!r}: {e}") from None
        # "auto" is from_pretrained's default, laid out by generate (blip2.fast.lazy: at once, or for a large
        # language model natively on its weights as loaded, laid out at the second call of several rows); a
        # retrieval checkpoint has no generate: what runs as loaded is routed here where that pays (blip2.fast.route:
        # the ViT-g's fp32 products through oneDNN, 204-212 GFLOP/s against MKL's 155-186 on an AMD CPU; its bf16
        # attention through the native kernel)
        if not hasattr(net, "language_model"):
            if fast == "auto":
                try:
                    route(net, auto=True)
                except Unsupported:  # adapters, weights quantized at load: as loaded, unrouted
                    pass
        elif fast != "auto":
            net.fast = "none"  # the mode is applied here, for good: generate adds no layout of its own
            try:
                apply_fast(net, fast)
            except ValueError as e:  # the mode does not apply here (device, dtype, kernels), said before any change
                raise PipelineError(str(e), "fast", fast) from None
        return cls(net, processor, name=model)

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device  # not a walk of the parameters, which undoes the fast layout

    # -- inputs ----------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Decoded images -> pixel_values [B, 3, H, W] float32 (what DataLoader workers compute)."""
        return self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]

    def _pixels(self, images: Images) -> torch.Tensor:
        return images if isinstance(images, torch.Tensor) else self.preprocess(images)

    def _require(self, retrieval: bool, what: str) -> None:
        if retrieval and not self.is_retrieval:
            raise PipelineError(f"{what} needs an image-text retrieval checkpoint (Blip2ForImageTextRetrieval, "
                                f"e.g. Salesforce/blip2-itm-vit-g); {self.name or 'this model'} generates text")
        if not retrieval and self.is_retrieval:
            raise PipelineError(f"{what} needs a captioning checkpoint (Blip2ForConditionalGeneration, e.g. "
                                f"Salesforce/blip2-opt-2.7b); {self.name or 'this model'} is a retrieval model")

    def check_prompt(self, prompt: str, options: GenerationOptions) -> None:
        """Raise PipelineError for a prompt the model would refuse: one holding the image token (the model places
        the image itself), a token outside the language model's vocabulary, or image tokens + prompt + new tokens
        past OPT's position table."""
        self._require(False, "text generation")
        ids = self._token_ids(prompt)
        if self.processor.image_token_id in ids:
            raise PipelineError(f"the prompt holds the image token {self.processor.image_token!r}: the model places "
                                "the image itself, remove it from the text")
        self._check_vocabulary("the prompt", ids, self.model.get_input_embeddings().num_embeddings)
        config = self.model.config
        limit = getattr(config.text_config, "max_position_embeddings", None)
        if not config.use_decoder_only_language_model or limit is None:
            return  # T5's relative positions have no hard limit
        n = config.num_query_tokens + len(ids) + options.max_new_tokens
        if n > limit:
            raise PipelineError(f"prompt too long: {n} tokens (image, prompt and "
                                f"max_new_tokens={options.max_new_tokens}) exceed the model's "
                                f"max_position_embeddings={limit}")

    def check_texts(self, texts: Sequence[str]) -> None:
        """Raise PipelineError naming the first text the Q-Former cannot read: longer than its text positions, or
        holding a token outside its vocabulary."""
        self._require(True, "text features")
        embeddings = self.model.embeddings
        limit = embeddings.position_embeddings.num_embeddings
        for k, text in enumerate(texts, 1):
            ids = self._token_ids(text)
            what = f"text {k} of {len(texts)}" if len(texts) > 1 else "the text"
            if len(ids) > limit:
                raise PipelineError(f"{what} is {len(ids)} tokens long, over the {limit} text positions of the "
                                    f"model's Q-Former: shorten it")
            self._check_vocabulary(what, ids, embeddings.word_embeddings.num_embeddings)

    def _token_ids(self, text: str) -> list[int]:
        return list(self.processor.tokenizer([text])["input_ids"][0])

    def _check_vocabulary(self, what: str, ids: Sequence[int], size: int) -> None:
        outside = [i for i in ids if i >= size]
        if outside:
            token = self.processor.tokenizer.convert_ids_to_tokens(outside[0])
            raise PipelineError(f"{what} holds the token {token!r} (id {outside[0]}), outside the model's "
                                f"vocabulary of {size}")

    # -- generation ------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, images: Images, prompts: Sequence[str], options: GenerationOptions = GenerationOptions()
                 ) -> list[str]:
        """One text per image continuing ``prompts[i]``; an empty prompt asks for a plain caption."""
        out, ids = self._generate(images, prompts, options.max_new_tokens, num_beams=options.num_beams)
        return generated_texts(self.processor, out, ids, self.model.config.use_decoder_only_language_model)

    @torch.inference_mode()
    def generate_tokens(self, images: Images, prompts: Sequence[str], max_new_tokens: int, **sampling: Any
                        ) -> list[list[int]]:
        """The new token ids of each sequence, ``max_new_tokens`` of them (after an end token: padding); row
        ``i * n + j`` is prompt ``i``'s ``j``-th of ``n = num_return_sequences``. ``sampling``: GenerationConfig
        fields (do_sample, temperature, top_p, top_k, seed, num_return_sequences)."""
        out, ids = self._generate(images, prompts, max_new_tokens, **sampling)
        start = ids.shape[1] if self.model.config.use_decoder_only_language_model else 1
        return out[:, start:].tolist()

    def _generate(self, images: Images, prompts: Sequence[str], max_new_tokens: int, **kwargs: Any
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's output sequences and the prompt ids they start with (None: T5 without a prompt)."""
        self._require(False, "text generation")
        pixels = self._pixels(images)
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"got {pixels.shape[0]} images and {len(prompts)} prompts")
        for p in set(prompts):
            self.check_prompt(p, GenerationOptions(max_new_tokens=max_new_tokens))
        decoder_only = self.model.config.use_decoder_only_language_model
        ids = mask = None
        # OPT always gets a prompt (BOS alone for a caption); T5 with no prompt sees only the image
        if decoder_only or any(prompts):
            ids, mask = self.processor.prompt_inputs(prompts, "left" if decoder_only else "right")
            if not decoder_only and not all(prompts):
                # a caption batched with prompts sees only the image, as alone: its tokens (the end token of an
                # empty text) are masked out, its <image> tokens kept
                token = self.model.config.image_token_index
                image = ids == token if token is not None else torch.zeros_like(ids, dtype=torch.bool)
                empty = torch.tensor([not p for p in prompts])[:, None]
                mask = torch.where(empty & ~image, 0, mask)
            ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model.generate(pixel_values=pixels.to(self.device, self.model.dtype), input_ids=ids,
                                  attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)
        return out, ids

    def caption(self, images: Images, prompt: str | Sequence[str] = "",
                options: GenerationOptions = GenerationOptions()) -> list[str]:
        """Captions, optionally continuing a prompt (one for all images, or one per image)."""
        n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        return self.generate(images, prompts, options)

    def ask(self, images: Images, questions: Sequence[str], options: GenerationOptions = GenerationOptions()
            ) -> list[str]:
        """Answer ``questions[i]`` about ``images[i]`` (prompted as ``Question: ... Answer:``)."""
        return self.generate(images, [question_prompt(q) for q in questions], options)

    def chat(self, image: Image.Image | torch.Tensor, history: Sequence[tuple[str, str]], question: str,
             options: GenerationOptions = GenerationOptions()) -> str:
        """Answer ``question`` with the earlier (question, answer) turns in the prompt.

        The oldest turns are dropped when the prompt would not fit the model's positions."""
        pixels = image.unsqueeze(0) if isinstance(image, torch.Tensor) else self.preprocess([image])
        kept = list(history)
        while True:
            prompt = chat_prompt(kept, question)
            try:
                self.check_prompt(prompt, options)
                break
            except PipelineError:
                if not kept:
                    raise
                kept.pop(0)
        return self.generate(pixels, [prompt], options)[0]

    # -- retrieval -------------------------------------------------------------------------------

    def text_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Q-Former input_ids/attention_mask [B, T] (right-padded, no image tokens) for the retrieval model."""
        self.check_texts(texts)
        enc = self.processor.tokenizer(list(texts), padding=True, padding_side="right", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    @torch.inference_mode()
    def match_many(self, items: Sequence[tuple[Image.Image | torch.Tensor, Sequence[str]]]) -> list[list[MatchScore]]:
        """ITM probability and ITC similarity of each image with each of its texts; the vision encoder runs once."""
        self._require(True, "image-text matching")
        pixels = torch.stack([i if isinstance(i, torch.Tensor) else self.preprocess([i])[0] for i, _ in items])
        texts = [t for _, ts in items for t in ts]
        owner = torch.tensor([k for k, (_, ts) in enumerate(items) for _ in ts], device=self.device)
        ids, mask = (t.to(self.device) for t in self.text_ids(texts))
        feats = self.model.vision_features(pixels)  # [images, N+1, Dv]
        prob = self.model.itm_logits_from_features(feats[owner], ids, mask).float().softmax(dim=-1)[:, 1]  # [N]
        sim = itc_similarity(self.model.image_embeds_from_features(feats), self.model.text_embeds(ids, mask))
        itc = sim.float()[owner, torch.arange(len(texts), device=self.device)]  # [N]: each text with its image
        scores = [MatchScore(t, float(p), float(c)) for t, p, c in zip(texts, prob.tolist(), itc.tolist())]
        out, start = [], 0
        for _, ts in items:
            out.append(scores[start:start + len(ts)])
            start += len(ts)
        return out

    def match(self, image: Image.Image | torch.Tensor, texts: Sequence[str]) -> list[MatchScore]:
        return self.match_many([(image, texts)])[0]

    @torch.inference_mode()
    def image_embeds(self, images: Images) -> torch.Tensor:
        """Normalised ITC query embeddings [B, Q, E] (float32, CPU)."""
        self._require(True, "image features")
        return self.model.image_embeds(self._pixels(images)).float().cpu()

    @torch.inference_mode()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised ITC text embeddings [T, E] (float32, CPU)."""
        ids, mask = self.text_ids(texts)
        return self.model.text_embeds(ids.to(self.device), mask.to(self.device)).float().cpu()

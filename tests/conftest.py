"""Shared test helpers: tiny random BLIP-2 models built with transformers (our reference)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tests' checkpoints are temporary: their layouts must not land in the user's cache (test_layout_cache turns
# the cache back on, in a folder of its own)
os.environ["BLIP2_LAYOUT_CACHE"] = "0"
# tiny models: one thread avoids oversubscription when tests share the cores
torch.set_num_threads(1)

IMAGE_TOKEN = 99  # last id of the tiny vocabulary
VOCAB = 100
NUM_QUERY = 4


def tiny_hf_config(text: str = "opt", *, image_size: int = 28, cross_attention_frequency: int = 2,
                   image_token_index: int | None = IMAGE_TOKEN, **text_overrides):
    """A BLIP-2 config small enough to run in milliseconds, in transformers' own classes."""
    from transformers import Blip2Config, OPTConfig, T5Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=14, layer_norm_eps=1e-5)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                   cross_attention_frequency=cross_attention_frequency, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
    if text == "opt":
        kw = dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, vocab_size=VOCAB,
                  max_position_embeddings=64, dropout=0.0, bos_token_id=2, eos_token_id=3, pad_token_id=1)
        kw.update(text_overrides)
        text_config = OPTConfig(**kw).to_dict()
    else:
        kw = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        kw.update(text_overrides)
        text_config = T5Config(**kw).to_dict()
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text_config,
                       num_query_tokens=NUM_QUERY, image_token_index=image_token_index)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Re-randomise every parameter so no layer is near zero or identity (norms included)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        if name.endswith(("layer_norm.weight", "layernorm.weight", "LayerNorm.weight", "norm1.weight",
                          "norm2.weight", "_norm.weight", "post_layernorm.weight", "layer_norm1.weight",
                          "layer_norm2.weight")):
            p.copy_(1.0 + noise)
        else:
            p.copy_(noise)
    return model


def hf_blip2(text: str = "opt", seed: int = 0, cls_name: str = "Blip2ForConditionalGeneration", **cfg_kw):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(tiny_hf_config(text, **cfg_kw))
    randomize_(model, seed)
    model.eval()
    return model


@pytest.fixture(scope="module")
def hf_opt_dir(tmp_path_factory):
    """A tiny random transformers BLIP-2-OPT saved with save_pretrained: (model, directory)."""
    model = hf_blip2("opt", seed=1)
    d = tmp_path_factory.mktemp("hf_opt")
    model.save_pretrained(d)
    return model, str(d)


@pytest.fixture(scope="module")
def hf_t5_dir(tmp_path_factory):
    model = hf_blip2("t5", seed=2)
    d = tmp_path_factory.mktemp("hf_t5")
    model.save_pretrained(d)
    return model, str(d)


def pixel_batch(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def prompts_with_images(prompts: list[list[int]], pad_id: int = 1, image_token: int | None = IMAGE_TOKEN,
                        num_query: int = NUM_QUERY) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids / attention_mask laid out as the processor does: image tokens first, then the
    left-padded prompt (so the padding sits between the image tokens and the text)."""
    width = max(len(p) for p in prompts)
    ids, mask = [], []
    for p in prompts:
        pad = width - len(p)
        img = [image_token] * num_query if image_token is not None else []
        ids.append(img + [pad_id] * pad + p)
        mask.append([1] * len(img) + [0] * pad + [1] * len(p))
    return torch.tensor(ids), torch.tensor(mask)


# -- a tiny checkpoint directory (model + processor files), as users have on disk -------------------


def tiny_tokenizer(padding_side: str = "left"):
    """A word-level tokenizer over the tiny vocabulary: ``w4 ... w98`` are words, BOS ``<s>`` (2) starts
    every text as OPT's does, ``</s>`` (3) ends generation; ``<image>`` (99) is added by the processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": i for i in range(4, IMAGE_TOKEN)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 2)])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side=padding_side)


def tiny_processor(padding_side: str = "left"):
    """transformers' Blip2Processor for 28 px images with NUM_QUERY ``<image>`` tokens (id IMAGE_TOKEN)."""
    from transformers import Blip2Processor, BlipImageProcessor

    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 28, "width": 28}),
                               tokenizer=tiny_tokenizer(padding_side), num_query_tokens=NUM_QUERY)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    return processor


def save_tiny_checkpoint(directory, seed: int = 1, retrieval: bool = False):
    """Write a tiny random BLIP-2-OPT (or, with ``retrieval``, a Blip2ForImageTextRetrieval) and its
    processor with transformers' save_pretrained; returns the transformers model."""
    import transformers

    if retrieval:
        config = tiny_hf_config()
        config.qformer_config.use_qformer_text_input = True
        config.qformer_config.vocab_size = VOCAB
        config.image_text_hidden_size = 16
        torch.manual_seed(seed)
        model = randomize_(transformers.Blip2ForImageTextRetrieval(config), seed).eval()
    else:
        model = hf_blip2("opt", seed=seed)
    model.save_pretrained(directory)
    tiny_processor("right" if retrieval else "left").save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A directory with a tiny random BLIP-2-OPT and its processor (config.json, model.safetensors,
    generation_config.json, processor_config.json, tokenizer files), written by transformers."""
    directory = tmp_path_factory.mktemp("tiny_blip2_opt")
    save_tiny_checkpoint(directory, seed=1)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> str:
    """Like tiny_model_dir, for a tiny random BLIP-2 Flan-T5 (prompts right-padded into the encoder)."""
    directory = tmp_path_factory.mktemp("tiny_blip2_t5")
    hf_blip2("t5", seed=2).save_pretrained(directory)
    tiny_processor("right").save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_retrieval_dir(tmp_path_factory) -> str:
    """Like tiny_model_dir, for a tiny random Blip2ForImageTextRetrieval (ITM and ITC heads)."""
    directory = tmp_path_factory.mktemp("tiny_blip2_itm")
    save_tiny_checkpoint(directory, seed=3, retrieval=True)
    return str(directory)


def _mincore(addr: int, size: int) -> tuple[int, int]:
    """(pages of the addresses [addr, addr + size) whose file page is in the page cache, pages): mincore(2)."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    lo, hi = addr // page * page, -(-(addr + size) // page) * page
    vec = (ctypes.c_ubyte * ((hi - lo) // page))()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec), len(vec)


def cached_pages(path) -> int:
    """How many of the file's pages are in the page cache (mincore on a mapping of it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        try:
            return _mincore(addr, size)[0]
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)


def cached_share(tensors) -> float:
    """The share of the pages of CPU tensors ``tensors`` (views of mapped files) whose file page is in the page
    cache, mapped in this process or not."""
    counts = [_mincore(t.data_ptr(), t.numel() * t.element_size()) for t in tensors]
    return sum(c for c, _ in counts) / sum(n for _, n in counts)


@pytest.fixture
def layout_cache_folder(tmp_path, monkeypatch):
    """The layout cache on, in a cache folder of the test's own: its ``layouts`` folder; the writers the test
    started are waited for after it."""
    from blip2 import layout_files

    monkeypatch.setenv("BLIP2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BLIP2_LAYOUT_CACHE", raising=False)
    yield tmp_path / "cache" / "layouts"
    layout_files.wait()


def count_calls(monkeypatch, owner, name: str, record=lambda *args, **kwargs: 1) -> list:
    """``owner.name`` wrapped for the test: each call appends ``record(*args, **kwargs)`` (unless None) to the
    list returned, then runs the original."""
    calls: list = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        entry = record(*args, **kwargs)
        if entry is not None:
            calls.append(entry)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


# ways a cached safetensors file can be damaged (tests of the layout cache's files)
def truncate_file(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 64)


def zero_file_data(path: str) -> None:
    """Every byte after the header zeroed."""
    with open(path, "r+b") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
        f.seek(header)
        f.write(bytes(os.path.getsize(path) - header))


def break_file_header(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"}{")

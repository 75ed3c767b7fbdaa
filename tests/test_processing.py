"""Parity of blip2.processing with transformers' Blip2Processor, BLIP image processor and fast tokenizers.

Everything is built here: two tiny tokenizers trained with the ``tokenizers`` library (an OPT-style
byte-level BPE and a Flan-T5-style Unigram), wrapped and saved by transformers in its 5.x layout, plus
hand-written 4.x-layout directories like the published Salesforce checkpoints.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from blip2.processing import (  # noqa: E402
    BatchFeature,
    Blip2ImageProcessor,
    Blip2Processor,
    ImageLoadError,
    TextTokenizer,
    load_image,
)

transformers.logging.set_verbosity_error()

SENTENCES = [
    "a photo of a cat sitting on a mat",
    "Question: what is in the picture? Answer: two dogs.",
    "two dogs playing in the snow, don't they? I'm sure they're happy",
    "the quick brown fox jumps over the lazy dog",
    "café naïve — ünïcödé text and 日本語",
]
PROMPTS = [
    "a photo of",
    "Question: what is in the picture? Answer:",
    "two dogs playing in the snow , don't they ? café 日本語",
    "<image> in text and </s> inside",
    "  spaced   out\ttext ",
]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _added(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False,
            "special": True}


def opt_backend() -> Tokenizer:
    """OPT-style: byte-level BPE, </s> as BOS prepended by the post-processor, <pad> = 1."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 3, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return tok


def t5_backend(normalizer: bool) -> Tokenizer:
    """Flan-T5-style: Unigram with Metaspace, </s> appended, <pad> = 0, </s> = 1, <unk> = 2."""
    tok = Tokenizer(models.Unigram())
    if normalizer:  # T5's converter also collapses runs of spaces (5.x's T5Tokenizer class drops this)
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(SENTENCES * 3, trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return tok


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def _preprocessor_config(size: dict) -> dict:
    return {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": list(CLIP_MEAN), "image_processor_type": "BlipImageProcessor", "image_std": list(CLIP_STD),
            "processor_class": "Blip2Processor", "resample": 3, "rescale_factor": 0.00392156862745098, "size": size}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Processor directories: transformers 5.x save_pretrained output, and hand-written 4.x (Hub) layouts."""
    root = tmp_path_factory.mktemp("processors")
    out: dict[str, Path] = {}

    # 5.x layout, written by transformers itself.
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=opt_backend(), bos_token="</s>", eos_token="</s>",
                                              unk_token="</s>", pad_token="<pad>", padding_side="left")
    ip = transformers.BlipImageProcessor(size={"height": 224, "width": 224})
    out["opt5"] = root / "opt5"
    transformers.Blip2Processor(ip, hf, num_query_tokens=4).save_pretrained(out["opt5"])

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=t5_backend(normalizer=True), eos_token="</s>",
                                              unk_token="<unk>", pad_token="<pad>", clean_up_tokenization_spaces=True)
    ip = transformers.BlipImageProcessor(size={"height": 48, "width": 64})
    out["t55"] = root / "t55"
    transformers.Blip2Processor(ip, hf, num_query_tokens=3).save_pretrained(out["t55"])

    # 4.x layout, as published for Salesforce/blip2-opt-2.7b (tokenizer_class GPT2Tokenizer, <image> added).
    d = out["opt4"] = root / "opt4"
    d.mkdir()
    tok = opt_backend()
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    tok.save(str(d / "tokenizer.json"))
    image_id = str(tok.token_to_id("<image>"))
    _write_json(d / "tokenizer_config.json", {
        "add_bos_token": True, "add_prefix_space": False, "bos_token": "</s>", "clean_up_tokenization_spaces": True,
        "added_tokens_decoder": {"1": _added("<pad>", True), "2": _added("</s>", True),
                                 image_id: _added("<image>", False)},
        "eos_token": "</s>", "errors": "replace", "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>", "processor_class": "Blip2Processor", "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "</s>"})
    _write_json(d / "special_tokens_map.json", {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>",
                                                "unk_token": "</s>"})
    _write_json(d / "preprocessor_config.json", _preprocessor_config({"height": 224, "width": 224}))
    _write_json(d / "processor_config.json", {"num_query_tokens": 4, "processor_class": "Blip2Processor"})

    # Older 4.x layout (T5Tokenizer class, model_max_length set, no added_tokens_decoder): pad and unk
    # are only in special_tokens_map.json.
    d = out["t54"] = root / "t54"
    d.mkdir()
    tok = t5_backend(normalizer=False)
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    tok.save(str(d / "tokenizer.json"))
    _write_json(d / "tokenizer_config.json", {
        "additional_special_tokens": [], "clean_up_tokenization_spaces": True, "eos_token": "</s>", "extra_ids": 0,
        "model_max_length": 12, "processor_class": "Blip2Processor", "tokenizer_class": "T5Tokenizer"})
    _write_json(d / "special_tokens_map.json", {"eos_token": _added("</s>", False), "pad_token": "<pad>",
                                                "unk_token": "<unk>"})
    _write_json(d / "preprocessor_config.json", _preprocessor_config({"height": 32, "width": 40}))
    _write_json(d / "processor_config.json", {"num_query_tokens": 2, "processor_class": "Blip2Processor"})
    return out


@pytest.fixture(scope="module")
def pairs(dirs: dict[str, Path]) -> dict[str, tuple]:
    """name -> (transformers processor, our processor), both loaded from the same directory."""
    return {name: (transformers.Blip2Processor.from_pretrained(d), Blip2Processor.from_pretrained(d))
            for name, d in dirs.items()}


def mixed_images() -> list:
    """Every input kind the reference accepts, in odd sizes and aspect ratios."""
    rng = np.random.default_rng(0)

    def rgb(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    palette = Image.fromarray(rgb(33, 64)).convert("P")
    transparent = Image.fromarray(rgb(21, 50)).convert("P")
    transparent.info["transparency"] = int(np.asarray(transparent)[0, 0])
    return [
        Image.fromarray(rgb(37, 53)),
        Image.fromarray(rgb(300, 20)).convert("L"),
        Image.fromarray(rng.integers(0, 256, (40, 41, 2), dtype=np.uint8), "LA"),
        palette,
        transparent,
        Image.fromarray(rng.integers(0, 256, (50, 30, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(rgb(31, 29)).convert("CMYK"),
        Image.fromarray(rng.integers(0, 65535, (25, 26), dtype=np.uint16)),  # I;16
        Image.fromarray(rng.integers(-100, 1000, (26, 25), dtype=np.int32)),  # I (32-bit)
        Image.fromarray(rgb(20, 90)).convert("1"),
        rgb(40, 22),  # HWC uint8
        rng.integers(0, 256, (1, 30, 31), dtype=np.uint8),  # CHW, 1 channel
        rng.integers(0, 256, (30, 31, 4), dtype=np.uint8),  # HWC, 4 channels
        rng.random((3, 30, 31)).astype(np.float32),  # CHW float in [0, 1]
        rng.random((30, 31, 4)).astype(np.float32),  # HWC float RGBA
        rng.integers(0, 256, (19, 23, 3)).astype(np.float64),  # whole-number floats
        torch.from_numpy(rgb(28, 45)).permute(2, 0, 1).contiguous(),  # CHW uint8 tensor
        torch.rand(27, 33, 3),  # HWC float tensor
        torch.from_numpy(rgb(23, 37)).permute(2, 0, 1) / 255,  # as torchvision's ToTensor gives: k/255 in float32
        np.nextafter(rgb(18, 26) / 255, 0),  # float64 a hair below k/255: the reference's float32 step rounds up
    ]


# ---- images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["opt5", "t55", "t54"])
def test_pixel_values_identical_to_reference(pairs: dict, name: str) -> None:
    ref, ours = pairs[name]
    images = mixed_images()
    expected = ref.image_processor(images, return_tensors="pt")["pixel_values"]
    got = ours(images=images)["pixel_values"]
    size = ours.image_processor.size
    assert got.dtype == torch.float32 and got.shape == (len(images), 3, size["height"], size["width"])
    assert torch.equal(got, expected)
    # One image at a time gives the same rows.
    for i in (0, 4, 7, 13):
        assert torch.equal(ours.image_processor(images[i])["pixel_values"][0], expected[i])


def test_pixel_values_known_numbers() -> None:
    proc = Blip2ImageProcessor(size={"height": 8, "width": 6})
    gray = proc(Image.new("L", (13, 7), 128))["pixel_values"]
    expected = (np.float32(128 / 255) - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    assert gray.shape == (1, 3, 8, 6)
    assert torch.equal(gray[0, :, 3, 2], torch.from_numpy(expected))
    # A fully transparent pixel is composited onto white, whatever colour it stores.
    clear = proc(Image.new("RGBA", (5, 5), (10, 200, 30, 0)))["pixel_values"]
    white = (np.float32(1.0) - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    assert torch.equal(clear[0, :, 0, 0], torch.from_numpy(white))
    assert abs(clear[0, 0, 0, 0].item() - 1.9303361) < 1e-6


def test_image_files_like_reference(pairs: dict, tmp_path: Path) -> None:
    ref, ours = pairs["opt5"]
    rng = np.random.default_rng(1)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 256, (30, 50, 4), dtype=np.uint8), "RGBA").save(rgba)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    Image.fromarray(rng.integers(0, 256, (20, 60, 3), dtype=np.uint8)).save(rotated, exif=exif)
    gif = tmp_path / "anim.gif"
    Image.fromarray(rng.integers(0, 256, (17, 9, 3), dtype=np.uint8)).convert("P").save(gif)
    paths = [str(rgba), str(rotated), str(gif)]
    expected = ref.image_processor(paths, return_tensors="pt")["pixel_values"]
    assert torch.equal(ours(images=[rgba, rotated, gif])["pixel_values"], expected)  # Path objects too
    assert load_image(rotated).size == (20, 60)  # EXIF orientation applied: 60x20 stored, 20x60 shown


def test_image_processor_config_round_trip(dirs: dict, tmp_path: Path) -> None:
    ours = Blip2ImageProcessor.from_pretrained(dirs["t55"])  # 5.x: nested in processor_config.json
    assert ours.size == {"height": 48, "width": 64} and ours.resample == 3
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "preprocessor_config.json").read_text())
    expected = json.loads((dirs["opt4"] / "preprocessor_config.json").read_text())  # the Hub file's keys
    del expected["processor_class"]  # written only when saved as part of a processor
    assert written == expected | {"size": {"height": 48, "width": 64}}
    ref = transformers.BlipImageProcessor.from_pretrained(tmp_path)
    assert ref.size.height == 48 and ref.size.width == 64 and tuple(ref.image_mean) == CLIP_MEAN


# ---- text ----------------------------------------------------------------------------------------

TEXT_CASES = [
    {},
    {"padding": True},
    {"padding": "longest", "add_special_tokens": False},
    {"padding": "max_length", "max_length": 30},
    {"padding": "max_length", "truncation": True, "max_length": 9},
    {"truncation": True, "max_length": 8},
    {"max_length": 10},  # a max_length alone truncates
    {"padding": True, "truncation": "longest_first", "max_length": 11},
    {"truncation": True},  # model_max_length: 12 for t54, "no limit" for the others
    {"padding": "max_length"},
]


@pytest.mark.parametrize("name", ["opt5", "t55", "opt4", "t54"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_text_identical_to_reference(pairs: dict, name: str, side: str) -> None:
    ref, ours = pairs[name]
    sides = ref.tokenizer.padding_side, ours.tokenizer.padding_side
    ref.tokenizer.padding_side = ours.tokenizer.padding_side = side
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(len(PROMPTS))]
    try:
        for kwargs in TEXT_CASES:
            for with_images in (False, True):
                imgs = images if with_images else None
                expected = ref(images=imgs, text=PROMPTS, return_tensors=None, **kwargs)
                got = ours(images=imgs, text=PROMPTS, return_tensors=None, **kwargs)
                for key in ("input_ids", "attention_mask"):
                    assert got[key] == expected[key], (name, side, kwargs, with_images, key)
    finally:
        ref.tokenizer.padding_side, ours.tokenizer.padding_side = sides


CALL_CASES = [
    # the call conventions of transformers' Blip2Processor that client code uses
    {"padding": True, "padding_side": "right"},
    {"padding": True, "padding_side": "left"},
    {"padding": True, "return_attention_mask": False},
    {"padding": True, "return_token_type_ids": True},
    {"padding": True, "pad_to_multiple_of": 8},
    {"padding": "max_length", "max_length": 16, "truncation": True},
    {"text_kwargs": {"padding": "max_length", "max_length": 12, "padding_side": "right", "truncation": True}},
    {"text_kwargs": {"padding": True}, "max_length": 9},
    {"common_kwargs": {"return_tensors": "np"}, "padding": True},
    {"text_kwargs": {"return_tensors": "np", "padding": True}},
    {"images_kwargs": {"do_normalize": False}, "padding": True},
    {"do_resize": True, "size": {"height": 20, "width": 12}, "do_rescale": False, "padding": True},
]


@pytest.mark.parametrize("kwargs", CALL_CASES)
@pytest.mark.parametrize("name", ["opt5", "t54"])
def test_call_options_identical_to_reference(pairs: dict, name: str, kwargs: dict) -> None:
    ref, ours = pairs[name]
    images = [Image.new("RGB", (31, 17), (i * 40, 90, 200)) for i in range(3)]
    for imgs in (images, None):
        nested = {**kwargs.get("text_kwargs", {}), **kwargs.get("common_kwargs", {})}
        kw = kwargs if "return_tensors" in nested else {"return_tensors": "pt", **kwargs}
        expected = ref(images=imgs, text=PROMPTS[:3], **kw)
        got = ours(images=imgs, text=PROMPTS[:3], **kw)
        assert list(got) == list(expected), (kwargs, imgs is None)
        for key in expected:
            want = expected[key]
            assert type(got[key]) is type(want), key
            assert got[key].shape == want.shape and got[key].dtype == want.dtype, key
            if key == "pixel_values":
                np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want), atol=1e-5, rtol=0)
            else:
                assert np.array_equal(np.asarray(got[key]), np.asarray(want)), key


def test_call_options_that_do_not_exist_are_named(pairs: dict) -> None:
    _, ours = pairs["opt5"]
    with pytest.raises(TypeError, match=r"unknown option 'paddding'; accepted: padding, truncation"):
        ours(text="a photo", paddding=True)
    with pytest.raises(TypeError, match=r"unknown option 'text_kwargs\.do_resize'"):
        ours(text="a photo", text_kwargs={"do_resize": False})
    with pytest.raises(TypeError, match=r"unknown option 'images_kwargs\.padding'"):
        ours(images=Image.new("RGB", (8, 8)), images_kwargs={"padding": True})
    with pytest.raises(ValueError, match="padding was passed twice: in text_kwargs and as a keyword argument"):
        ours(text="a photo", text_kwargs={"padding": True}, padding="max_length")  # as the reference refuses


def test_from_pretrained_passes_the_hub_arguments_on(dirs: dict, monkeypatch) -> None:
    import blip2.processing as processing

    seen = {}
    real = processing.resolve_dir

    def spy(path, **kw):
        seen.update(kw)
        return real(path)

    monkeypatch.setattr(processing, "resolve_dir", spy)
    loaded = Blip2Processor.from_pretrained(dirs["opt5"], revision="v2", cache_dir="/tmp/c", token="t",
                                            local_files_only=True)
    assert seen == {"revision": "v2", "cache_dir": "/tmp/c", "token": "t", "local_files_only": True}
    assert loaded.num_query_tokens == 4


def test_image_tokens_come_first(pairs: dict) -> None:
    ref, ours = pairs["opt5"]  # left padding, 4 query tokens
    image = Image.new("RGB", (8, 8))
    out = ours(images=[image, image], text=["a photo of", "two dogs playing in the snow"], padding=True)
    image_id, pad_id, bos_id = ours.image_token_id, ours.tokenizer.pad_token_id, ours.tokenizer.bos_token_id
    assert image_id == len(ours.tokenizer) - 1 == ref.tokenizer.convert_tokens_to_ids("<image>")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == torch.int64 and ids.shape[0] == 2
    assert ids[:, :4].eq(image_id).all() and mask[:, :4].eq(1).all()
    # The short prompt is left-padded *after* the image tokens, then starts with BOS (</s> = 2).
    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0 and ids[0, 4:4 + n_pad].eq(pad_id).all() and ids[0, 4 + n_pad].item() == bos_id == 2
    assert ids[1, 4].item() == bos_id and mask[1].eq(1).all()
    # A text longer than max_length - Q is cut to max_length in all, image tokens kept.
    cut = ours(images=image, text="two dogs playing in the snow", max_length=7)
    assert cut["input_ids"].shape == (1, 7) and cut["input_ids"][0, :4].eq(image_id).all()


def test_tensors_and_to(pairs: dict) -> None:
    _, ours = pairs["t55"]
    out = ours(images=Image.new("RGB", (10, 10)), text="a photo of a cat")
    assert isinstance(out, BatchFeature) and list(out) == ["input_ids", "attention_mask", "pixel_values"]
    assert out.input_ids.shape == out.attention_mask.shape == (1, 3 + len(ours.tokenizer("a photo of a cat")["input_ids"]))
    half = out.to(torch.float16)
    assert half["pixel_values"].dtype == torch.float16 and half["input_ids"].dtype == torch.int64
    assert half.to("cpu", torch.bfloat16)["pixel_values"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="padding=True"):
        ours(text=["a", "a photo of a cat"])  # ragged rows cannot form a tensor


def test_tokenizer_attributes_match_reference(pairs: dict) -> None:
    for name, (ref, ours) in pairs.items():
        rt, ot = ref.tokenizer, ours.tokenizer
        assert (ot.pad_token_id, ot.eos_token_id, ot.bos_token_id, ot.unk_token_id) == (
            rt.pad_token_id, rt.eos_token_id, rt.bos_token_id, rt.unk_token_id), name
        assert len(ot) == len(rt) and ot.vocab_size == rt.vocab_size, name
        assert ot.model_max_length == rt.model_max_length, name
        assert ours.num_query_tokens == ref.num_query_tokens, name
    # The 4.x directories exercise transformers' per-class rebuild of the pipeline, the 5.x ones tokenizer.json as is.
    assert [type(pairs[n][0].tokenizer).__name__ for n in ("opt5", "t55", "opt4", "t54")] == [
        "TokenizersBackend", "TokenizersBackend", "GPT2Tokenizer", "T5Tokenizer"]
    assert pairs["opt5"][1].tokenizer.padding_side == "left"  # read from tokenizer_config.json
    assert pairs["opt4"][1].tokenizer.padding_side == "right"  # the Hub OPT config pads right
    assert pairs["t54"][1].tokenizer.eos_token_id == 1 and pairs["t54"][1].tokenizer.bos_token_id is None


def test_add_tokens_like_reference(dirs: dict) -> None:
    ref = transformers.AutoTokenizer.from_pretrained(dirs["opt5"])
    ours = TextTokenizer.from_pretrained(dirs["opt5"])
    for tokens, special in ((["<obj>", "dogs"], False), ([AddedToken("<box>", special=True)], True), ("<obj>", False)):
        assert ours.add_tokens(tokens, special_tokens=special) == ref.add_tokens(tokens, special_tokens=special)
    text = ["a <obj> and <box> dogs", "x<box>y"]
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    assert ours.convert_tokens_to_ids(["<obj>", "<box>", "a", "#?!"]) == ref.convert_tokens_to_ids(
        ["<obj>", "<box>", "a", "#?!"])  # an unknown token maps to unk (</s> here)
    ids = ours(text[0])["input_ids"]
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids[1]) == ref.convert_ids_to_tokens(ids[1])


@pytest.mark.parametrize("name", ["opt5", "t55", "opt4", "t54"])
def test_decode_identical_to_reference(pairs: dict, name: str) -> None:
    ref, ours = pairs[name]
    image = Image.new("RGB", (8, 8))
    ids = ref(images=[image] * len(PROMPTS), text=PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    extra = [ids[0, -3:].tolist() + [ours.tokenizer.pad_token_id] * 2, [ids[1, -1].item()]]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[2], skip_special_tokens=skip) == ref.decode(ids[2], skip_special_tokens=skip)
        for seq in extra:
            assert ours.decode(seq, skip_special_tokens=skip) == ref.decode(seq, skip_special_tokens=skip)
        assert ours.decode(int(ids[1, 5]), skip) == ref.decode(int(ids[1, 5]), skip_special_tokens=skip)
        assert ours.decode(ids.numpy(), skip) == ref.decode(ids.numpy(), skip_special_tokens=skip)
    texts = ours.batch_decode(ids, skip_special_tokens=True)
    assert "<image>" not in texts[0] and "<pad>" not in texts[0]


def test_t5_decode_cleans_spaces_like_reference(pairs: dict) -> None:
    ref, ours = pairs["t55"]
    ids = ref.tokenizer("two dogs . don't they ? sure , they 're")["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=True).endswith("dogs. don't they? sure, they're")
    raw = ours.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert raw.endswith(" . don't they ? sure , they 're")


# ---- save / load ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["opt5", "t55", "opt4", "t54"])
def test_our_save_loads_in_transformers(dirs: dict, name: str, tmp_path: Path) -> None:
    ours = Blip2Processor.from_pretrained(dirs[name])
    ours.tokenizer.padding_side = "left"
    ours.save_pretrained(tmp_path)
    assert {"processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= set(os.listdir(tmp_path))
    ref = transformers.Blip2Processor.from_pretrained(tmp_path)
    again = Blip2Processor.from_pretrained(tmp_path)
    assert ref.num_query_tokens == again.num_query_tokens == ours.num_query_tokens
    assert ref.tokenizer.padding_side == again.tokenizer.padding_side == "left"
    images = mixed_images()[:len(PROMPTS)]
    for kwargs in ({"padding": True}, {"padding": "max_length", "truncation": True, "max_length": 9}):
        expected = ref(images=images, text=PROMPTS, return_tensors="pt", **kwargs)
        for proc in (ours, again):
            got = proc(images=images, text=PROMPTS, **kwargs)
            assert set(got) == set(expected)
            for key in got:
                assert torch.equal(got[key], expected[key]), (name, kwargs, key)
    ids = expected["input_ids"]
    assert again.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    assert again.batch_decode(ids) == ref.batch_decode(ids)


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Salesforce/no-such-model"):
        Blip2Processor.from_pretrained("Salesforce/no-such-model")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextTokenizer.from_pretrained(tmp_path)


# ---- unreadable images ---------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height pixels whose data is a few bytes: PIL reads the size, not the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_unreadable_images_raise_image_load_error(tmp_path: Path, pairs: dict) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(os.urandom(256))
    truncated = tmp_path / "truncated.png"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    cases = [
        (garbage, {}, "not an image"),
        (tmp_path / "missing.png", {}, "no such file"),
        (truncated, {}, "truncated"),
        (tmp_path, {}, "directory"),
        (bomb, {}, "decompression bomb"),
        (small, {"max_pixels": 5000}, "max_pixels=5000"),
    ]
    for path, kwargs, reason in cases:
        with pytest.raises(ImageLoadError, match=reason) as info:
            load_image(path, **kwargs)
        assert str(path) in str(info.value) and isinstance(info.value, ValueError)
        assert info.value.__cause__ is None and info.value.__context__ is None  # no PIL traceback attached
    assert load_image(small).size == (100, 100)
    _, ours = pairs["opt5"]
    with pytest.raises(ImageLoadError, match="garbage.jpg"):
        ours(images=[str(small), str(garbage)], text="a photo")

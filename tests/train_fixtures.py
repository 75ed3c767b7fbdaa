"""Tiny models, tokenizers and data for the training tests (built with transformers and tokenizers).

Vocabularies are the synthetic world's words, so ``blip2.demo.world`` captions tokenize without unknowns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from conftest import randomize_
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

IMAGE_SIZE = 32
PATCH = 8
NUM_QUERY = 4

WORDS = ["a", "small", "large", "red", "green", "blue", "yellow", "purple", "orange", "circle", "square",
         "triangle", "and", ",", "what", "color", "is", "the", "?", "shape", "object", "how", "many", "shapes",
         "are", "there", "zero", "one", "two", "three", "photo", "of", "question", ":", "answer", "short"]
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
OPT_SPECIAL = ["<s>", "<pad>", "</s>", "\n", "<unk>"]  # bos "</s>" = 2, eos "\n" = 3 (as BLIP-2 OPT), pad = 1
T5_SPECIAL = ["<pad>", "</s>", "<unk>"]  # pad = 0, eos = 1


def bert_backend() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(BERT_SPECIAL + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def opt_backend() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(OPT_SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return tok


def t5_backend() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(T5_SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def image_processor_config() -> dict:
    return {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "BlipImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
            "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}


def hf_blip2_config(text: str = "opt", *, image_token: bool = True, dropout: float = 0.0, vision_layers: int = 2):
    """A transformers Blip2Config with 32 px images (4x4 patches of 8) and the world vocabulary."""
    from transformers import Blip2Config, OPTConfig, T5Config

    specials = OPT_SPECIAL if text == "opt" else T5_SPECIAL
    vocab = len(specials) + len(WORDS) + 1  # the tokenizer's ids, then <image> as the last id
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH, layer_norm_eps=1e-5)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                   cross_attention_frequency=1, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if text == "opt":
        lm = OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, vocab_size=vocab,
                       word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0, bos_token_id=2,
                       eos_token_id=3, pad_token_id=1).to_dict()
    else:
        lm = T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=vocab,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1).to_dict()
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=lm, num_query_tokens=NUM_QUERY,
                       image_token_index=vocab - 1 if image_token else None)


def write_blip2_dir(directory: Path, text: str = "opt", seed: int = 0, *, image_token: bool = True,
                    dropout: float = 0.0, vision_layers: int = 2) -> Path:
    """A tiny transformers Blip2ForConditionalGeneration with processor files, saved by transformers."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration(hf_blip2_config(text, image_token=image_token, dropout=dropout,
                                                                          vision_layers=vision_layers))
    randomize_(model, seed, std=0.2)
    model.save_pretrained(directory)
    backend = opt_backend() if text == "opt" else t5_backend()
    if text == "opt":
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="\n",
                                                   unk_token="<unk>", pad_token="<pad>")
    else:
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                                                   pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = transformers.BlipImageProcessor(**{k: v for k, v in image_processor_config().items()
                                                          if k != "image_processor_type"})
    transformers.Blip2Processor(image_processor, tok, num_query_tokens=NUM_QUERY if image_token else None
                                ).save_pretrained(directory)
    return directory


def write_bert_dir(directory: Path, seed: int = 0, *, with_head: bool = False, dropout: float = 0.0) -> Path:
    """A tiny Hugging Face BERT (BertModel, or BertForMaskedLM with its LM head) and its tokenizer."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(BERT_SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=40,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=0)
    model = (transformers.BertForMaskedLM if with_head else transformers.BertModel)(config)
    randomize_(model, seed, std=0.2)
    with torch.no_grad():  # LAVIS's Q-Former has no token types: zero them so BERT's output is comparable
        (model.bert if with_head else model).embeddings.token_type_embeddings.weight.zero_()
    model.save_pretrained(directory)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bert_backend(), unk_token="[UNK]", sep_token="[SEP]",
                                               pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    tok.save_pretrained(directory)
    return directory


def write_vision_preprocessor(directory: Path) -> None:
    (directory / "preprocessor_config.json").write_text(json.dumps(image_processor_config()))


def world_data(directory: Path, n: int, seed: int = 0, split: str = "train") -> Path:
    """``blip2.demo.world`` images at 64 px with captions.jsonl / vqa.jsonl; returns the split directory."""
    from blip2.demo import world

    return Path(world.write_dataset(directory, n, seed=seed, split=split, size=64))


def one_object_data(directory: Path, n: int, seed: int = 0, split: str = "train", size: int = 32) -> Path:
    """``blip2.demo.world`` scenes with one object each ("a small red circle": 36 captions, all 4 words), drawn
    at ``size`` px, with captions.jsonl; returns the split directory."""
    import numpy as np

    from blip2.demo import world

    root = directory / split
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(n):
            scene = world.sample_scene(np.random.default_rng([seed, i]), n_objects=1)
            rel = f"images/{i:05d}.png"
            world.render(scene, size).save(root / rel)
            f.write(json.dumps({"image": rel, "caption": world.caption(scene)}) + "\n")
    return root


def env_with_src() -> dict[str, str]:
    """The environment for a subprocess that imports this checkout's blip2."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env

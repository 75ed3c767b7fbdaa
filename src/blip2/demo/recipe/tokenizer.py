"""The demo model's tokenizer: one word-level vocabulary for the whole ``blip2.demo.world`` language.

Built with the ``tokenizers`` library, so the same ``tokenizer.json`` runs in our ``TextTokenizer`` and
in transformers' ``PreTrainedTokenizerFast`` / ``Blip2Processor``:

- normalizer: lower case; pre-tokenizer: words and punctuation ("what?" -> "what", "?")
- special tokens: ``<pad>`` 0, ``<s>`` 1 (bos, prepended to every text as OPT does), ``</s>`` 2 (eos: the
  LM ends every caption and answer with it, so generation stops), ``<unk>`` 3, and ``<image>`` last
  (an added special token: the processor's image placeholder; the model config's ``image_token_index``)
- decoder: words joined by spaces, with " ," / " ?" tidied ("a red circle, a blue square").

The Q-Former's text input (stage 1, retrieval model) uses the same vocabulary with ``add_eos=True``:
``<s> words </s>``, as BERT's ``[CLS] words [SEP]`` (``<s>`` is the CLS whose output is the ITC text
embedding, ``</s>`` ends the text ITG learns to generate).
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from blip2.processing import TextTokenizer
from blip2.demo.world import COLORS, COUNT_WORDS, SHAPES, SIZES

__all__ = ["SPECIAL_TOKENS", "WORDS", "IMAGE_TOKEN", "build_tokenizer", "vqa_prompt"]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
IMAGE_TOKEN = "<image>"
# Every word the world's captions, questions and prompts use (see blip2.demo.world.caption / questions).
WORDS = (
    ("a", "and", ",") + SIZES + COLORS + SHAPES
    + ("question", "answer", ":", "?", "what", "color", "is", "the", "shape", "object", "how", "many", "shapes",
       "are", "there") + COUNT_WORDS
    # the prompts of the paper's presets ("a photo of", "Question: {} Short answer:") and of chat turns
    # ("Question: q Answer: a. Question: ...")
    + (".", "short", "photo", "of")
)


def vqa_prompt(question: str) -> str:
    """The prompt the demo model answers (its captions take no prompt: image tokens + BOS only)."""
    return f"Question: {question} Answer:"


def build_tokenizer(add_eos: bool = False, model_max_length: int = 64) -> TextTokenizer:
    """The word-level tokenizer, as a ``TextTokenizer`` (``save_pretrained`` writes transformers' files).

    The LM's (default) puts ``<s>`` in front and pads on the left; the Q-Former's (``add_eos``) also
    ends every text with ``</s>`` and pads on the right (the CLS stays at position 0).
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(dict.fromkeys(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}" if add_eos else f"{BOS} $A",
        pair=f"{BOS} $A {EOS} $B {EOS}" if add_eos else f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    config = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
              "padding_side": "right" if add_eos else "left", "model_max_length": model_max_length}
    return TextTokenizer(backend, config)

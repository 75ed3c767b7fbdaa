"""Pretraining the language model: our ``OPTForCausalLM`` on the world's text.

A training sequence is the text about one scene. It opens with a *context* of exactly
``num_query_tokens`` tokens: the scene as a table, the caption's content words (size, colour, shape of
each object, left to right: "small red circle large blue square") padded with ``<pad>`` (no loss there);
then the caption and the question-answer pairs as documents (``<s> caption </s>``, ``<s> question : ... answer :
... </s>``) in random order, up to ``block`` tokens in all.

The context sits exactly where stage 2 puts the image: the projected queries replace it, so BOS comes
at the same position and the LM has already learned to read a description of the scene in those
positions. A large LM reads such a prefix from in-context skill; a tiny one learns it here. Documents
after the first can also be predicted from earlier ones, and start at many positions, so every position
embedding the demo uses gets trained.
"""

from __future__ import annotations

import numpy as np
import torch

from blip2.config import OPTConfig
from blip2.models.opt import OPTForCausalLM
from blip2.models.blip2 import causal_lm_loss
from blip2.processing import TextTokenizer
from blip2.demo.recipe.data import SceneData
from blip2.demo.recipe.pretraining import pretraining_loop
from blip2.demo.recipe.tokenizer import vqa_prompt

__all__ = ["FUNCTION_WORDS", "scene_table", "scene_documents", "pretrain_lm"]


FUNCTION_WORDS = "a , and"  # left out of the scene table


def scene_table(tokenizer: TextTokenizer, caption: str) -> list[int]:
    """The scene table's token ids: the caption's content words, "small red circle large blue square"."""
    drop = set(tokenizer(FUNCTION_WORDS, add_special_tokens=False)["input_ids"])
    return [t for t in tokenizer(caption, add_special_tokens=False)["input_ids"] if t not in drop]


def scene_documents(tokenizer: TextTokenizer, caption: str, qa: list[dict[str, str]]) -> list[list[int]]:
    """Token ids of each document about one scene: the caption, then each question with its answer (colour
    questions twice: finding the word before a shape in the table is the lookup a tiny LM learns slowest),
    and the same in the other prompt forms users send: "a photo of {caption}", "Question: {q} Short
    answer: {a}", and a chat turn ("Question: {q1} Answer: {a1}. Question: {q2} Answer: {a2}")."""
    texts = [caption] + [f"{vqa_prompt(q['question'])} {q['answer']}" for q in qa]
    texts += [f"{vqa_prompt(q['question'])} {q['answer']}" for q in qa if q.get("type") == "color"]
    texts.append(f"a photo of {caption}")
    first, last = qa[0], qa[-1]
    texts.append(f"Question: {first['question']} Short answer: {first['answer']}")
    texts.append(f"{vqa_prompt(first['question'])} {first['answer']}. {vqa_prompt(last['question'])} {last['answer']}")
    eos = tokenizer.eos_token_id
    return [ids + [eos] for ids in tokenizer(texts)["input_ids"]]


def _batch(docs: list[list[list[int]]], tables: list[list[int]], rng: np.random.Generator, context: int,
           block: int, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ids, mask, labels [B, T]: context (each scene's table, padded, attended, no loss), then documents."""
    rows = []
    for scene_docs, table in zip(docs, tables):
        row = (table + [pad] * context)[:context]
        for i in rng.permutation(len(scene_docs)):
            row += scene_docs[i]
        rows.append(row[:block])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :context] = -100
    return ids, mask, labels


def pretrain_lm(config: OPTConfig, tokenizer: TextTokenizer, data: SceneData, steps: int, batch_size: int, lr: float,
                context: int, seed: int = 0, block: int = 80, log_every: int = 50) -> OPTForCausalLM:
    """Next-token training on scene documents after a ``context``-token description (the number of
    image tokens stage 2 will put there); returns the model in eval mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    docs = [scene_documents(tokenizer, c, qa) for c, qa in zip(data.captions, data.qa)]
    tables = [scene_table(tokenizer, c) for c in data.captions]
    model = OPTForCausalLM(config)

    def loss_at(step: int) -> torch.Tensor:
        pick = rng.integers(len(docs), size=batch_size)
        ids, mask, labels = _batch([docs[k] for k in pick], [tables[k] for k in pick], rng, context, block,
                                   config.pad_token_id)
        return causal_lm_loss(model(model.get_input_embeddings()(ids), mask), labels)  # logits [B, T, V]

    return pretraining_loop(model, loss_at, steps, lr, 0.01, "lm", log_every)

"""BLIP-2's two training stages on a frozen image encoder, run on precomputed image features.

The encoder is frozen in both stages, so its output for every training image is computed once
(``encode_images``) and the stages read it: the same gradients as running the encoder each step, at
a fraction of the cost on a CPU.

Stage 1 (representation learning), the three losses of LAVIS ``Blip2Qformer.forward``:
- ITC: the text's CLS embedding against every image's query embeddings (max over queries), both
  directions, learned temperature. Texts that are equal are all positives (soft targets): in this
  world several images in a batch often share a caption.
- ITM: binary match / no match on (positive pair, hard negative image, hard negative text); negatives
  drawn with probability softmax(cosine / ``negative_temperature``), never a pair with an equal caption.
  LAVIS draws with the ITC temperature (~0.07): here that hands ITM near-duplicate captions (one size
  word apart) from the first steps, and a Q-Former trained from scratch stays at the prior; 0.5 still
  prefers similar pairs.
- ITG: the text generated from the queries (prefix-LM mask) through a BERT-style LM head tied to the
  word embeddings; the head is only for training.

Stage 2 (generative learning): queries -> Q-Former -> ``language_projection`` -> the frozen LM, trained
with the LM loss on the caption (no prompt) or on the answer to "Question: {q} Answer:", each ending
with eos.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Blip2Config
from ..modeling import Blip2ForConditionalGeneration, causal_lm_loss
from ..processing import TextTokenizer
from ..retrieval import Blip2ForImageTextRetrieval, itc_similarity
from ..vision import Blip2VisionModel
from .data import SceneData, normalize
from .schedule import Progress, lr_at, make_optimizer
from .tokenizer import vqa_prompt

__all__ = ["encode_images", "new_retrieval_model", "Stage1", "train_stage1", "build_stage2", "train_stage2", "stage2_batch"]


@torch.no_grad()
def encode_images(vision: Blip2VisionModel, pixels: Tensor, batch_size: int = 128) -> Tensor:
    """The frozen encoder's ``last_hidden_state`` for uint8 images [N, 3, S, S] -> [N, N_tokens, Dv]."""
    vision.eval()
    return torch.cat([vision(normalize(pixels[i:i + batch_size])).last_hidden_state
                      for i in range(0, len(pixels), batch_size)])


def _captions(tokenizer: TextTokenizer, captions: list[str]) -> tuple[Tensor, Tensor]:
    """Q-Former text (``build_tokenizer(add_eos=True)``: ``<s> words </s>``, right-padded) -> ids, mask [B, T]."""
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def new_retrieval_model(config: Blip2Config, vision: Blip2VisionModel) -> Blip2ForImageTextRetrieval:
    """A fresh stage-1 model around the pretrained encoder; text embeddings and heads get BERT's init."""
    model = Blip2ForImageTextRetrieval(config)
    model.vision_model.load_state_dict(vision.state_dict())
    std = config.qformer_config.initializer_range
    for module in (model.embeddings.word_embeddings, model.embeddings.position_embeddings,
                   model.vision_projection, model.text_projection, model.itm_head):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
    return model


class Stage1(nn.Module):
    """Retrieval model + what only stage-1 training needs (ITG head, temperature); forward -> losses."""

    def __init__(self, model: Blip2ForImageTextRetrieval, temperature: float = 0.07,
                 negative_temperature: float = 0.5) -> None:
        super().__init__()
        self.negative_temperature = negative_temperature
        cfg = model.config.qformer_config
        self.model = model
        self.itg_transform = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.GELU(),
                                           nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps))
        self.itg_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.temp = nn.Parameter(torch.tensor(temperature))

    def forward(self, feats: Tensor, ids: Tensor, mask: Tensor, same: Tensor,
                generator: torch.Generator) -> dict[str, Tensor]:
        """feats [B, N+1, Dv], ids/mask [B, T], same [B, B] bool (equal captions) -> losses."""
        m = self.model
        B, Q = ids.shape[0], m.config.num_query_tokens
        temp = self.temp.clamp(0.001, 0.5)
        # ITC
        image_embeds = m.image_embeds_from_features(feats)  # [B, Q, E]
        text_embeds = m.text_embeds(ids, mask)  # [B, E]
        cosine = itc_similarity(image_embeds, text_embeds)  # [B_img, B_txt]
        sim = cosine / temp
        targets = same.float() / same.float().sum(1, keepdim=True)
        itc = (-(F.log_softmax(sim, 1) * targets).sum(1).mean() - (F.log_softmax(sim.t(), 1) * targets).sum(1).mean()) / 2
        # ITM with hard negatives
        with torch.no_grad():
            def draw(s: Tensor) -> Tensor:
                w = (F.softmax(s.float(), 1) + 1e-4).masked_fill(same, 0.0)
                return torch.multinomial(w, 1, generator=generator).squeeze(1)
            neg_image = draw(cosine.t() / self.negative_temperature)  # for each text, an image
            neg_text = draw(cosine / self.negative_temperature)  # for each image, a text
        logits = m.itm_logits_from_features(torch.cat([feats, feats[neg_image], feats]),
                                            torch.cat([ids, ids, ids[neg_text]]), torch.cat([mask, mask, mask[neg_text]]))
        labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
        itm = F.cross_entropy(logits, labels)
        # ITG: queries see queries, text sees queries and the text before it
        queries = m.query_tokens.expand(B, -1, -1)
        joint = torch.cat([mask.new_ones(B, Q), mask], dim=1)
        hidden = m.qformer(m.embeddings(ids, queries), feats, query_length=Q, attention_mask=joint, causal_text=True)
        token_logits = F.linear(self.itg_transform(hidden[:, Q:]), m.embeddings.word_embeddings.weight, self.itg_bias)
        itg = causal_lm_loss(token_logits, ids.masked_fill(mask == 0, -100))
        return {"loss": itc + itm + itg, "itc": itc.detach(), "itm": itm.detach(), "itg": itg.detach()}


def train_stage1(model: Blip2ForImageTextRetrieval, tokenizer: TextTokenizer, feats: Tensor, data: SceneData,
                 steps: int, batch_size: int, lr: float, seed: int = 0, log_every: int = 50) -> Blip2ForImageTextRetrieval:
    """Stage 1 on precomputed features; the learned temperature ends in ``model.config.temperature``.
    ``tokenizer``: the Q-Former's (``build_tokenizer(add_eos=True)``)."""
    torch.manual_seed(seed)
    stage = Stage1(model)
    trainable = [p for n, p in stage.named_parameters() if not n.startswith("model.vision_model.")]
    for p in stage.model.vision_model.parameters():
        p.requires_grad_(False)
    opt = make_optimizer(trainable, lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    progress = Progress("stage1", steps, log_every)
    stage.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        index = torch.randint(len(data), (batch_size,), generator=g)
        captions = [data.captions[i] for i in index]
        same = torch.tensor([[a == b for b in captions] for a in captions])
        ids, mask = _captions(tokenizer, captions)
        out = stage(feats[index], ids, mask, same, g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        progress.update(step, **{k: v.item() for k, v in out.items()})
    model.config.temperature = float(stage.temp.detach().clamp(0.001, 0.5))
    return model.eval()


def build_stage2(config: Blip2Config, stage1: Blip2ForImageTextRetrieval, lm_state: dict[str, Tensor]
                 ) -> Blip2ForConditionalGeneration:
    """The generation model: encoder, queries and Q-Former (query path) from stage 1, the pretrained LM."""
    model = Blip2ForConditionalGeneration(config)
    model.vision_model.load_state_dict(stage1.vision_model.state_dict())
    model.query_tokens.data.copy_(stage1.query_tokens.data)
    own = model.qformer.state_dict()
    model.qformer.load_state_dict({k: v for k, v in stage1.qformer.state_dict().items() if k in own})
    model.language_model.load_state_dict(lm_state)
    return model


def stage2_batch(tokenizer: TextTokenizer, num_query_tokens: int, image_token: int, data: SceneData,
                 index: list[int], rng: np.random.Generator, caption_share: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """``[<image>]*Q <s> prompt target </s>`` rows, right-padded: ids, mask, labels (on target and eos only).

    Half the rows (``caption_share``) caption with no prompt; the rest answer one question, its type
    drawn uniformly among the scene's types so rare types (colour, shape) are trained as often as counts.
    """
    rows, targets = [], []
    for i in index:
        if rng.random() < caption_share:
            prompt, target = "", data.captions[i]
        else:
            qa = data.qa[i]
            kinds = sorted({q["type"] for q in qa})
            kind = kinds[rng.integers(len(kinds))]
            pick = [q for q in qa if q["type"] == kind]
            q = pick[rng.integers(len(pick))]
            prompt, target = vqa_prompt(q["question"]), q["answer"]
        prefix = tokenizer(prompt)["input_ids"]  # <s> + prompt words
        answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append([image_token] * num_query_tokens + prefix + answer)
        targets.append(len(answer))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for k, (r, n) in enumerate(zip(rows, targets)):
        ids[k, : len(r)] = torch.tensor(r)
        mask[k, : len(r)] = 1
        labels[k, len(r) - n: len(r)] = ids[k, len(r) - n: len(r)]
    return ids, mask, labels


def train_stage2(model: Blip2ForConditionalGeneration, tokenizer: TextTokenizer, feats: Tensor, data: SceneData,
                 steps: int, batch_size: int, lr: float, seed: int = 0, log_every: int = 50) -> Blip2ForConditionalGeneration:
    """Stage 2 on precomputed features: Q-Former, queries and projection learn; encoder and LM are frozen."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    for p in [*model.vision_model.parameters(), *model.language_model.parameters()]:
        p.requires_grad_(False)
    trainable = [model.query_tokens, *model.qformer.parameters(), *model.language_projection.parameters()]
    opt = make_optimizer(trainable, lr, weight_decay=0.05)
    progress = Progress("stage2", steps, log_every)
    model.train()
    model.language_model.eval()  # frozen: no dropout
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        index = rng.integers(len(data), size=batch_size).tolist()
        ids, mask, labels = stage2_batch(tokenizer, model.config.num_query_tokens, model.config.image_token_index,
                                         data, index, rng)
        query_output = model._query_output(feats[index])  # [B, Q, Dq]
        embeds, mask = model.merge_image_inputs(model.language_projection(query_output), ids, mask)
        loss = causal_lm_loss(model.language_model(embeds, mask), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        progress.update(step, loss=loss.item())
    return model.eval()

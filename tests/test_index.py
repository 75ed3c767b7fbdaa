"""blip2.apps.index: search and rank_texts against a brute-force LAVIS k_test ranking computed with the
transformers reference over all pairs; incremental building; save/load; folders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import pixel_batch, randomize_, tiny_hf_config  # noqa: E402

from blip2.apps.index import ImageIndex, list_images, rank_texts  # noqa: E402
from blip2.models.retrieval import Blip2ForImageTextRetrieval  # noqa: E402

QVOCAB = 120
N_IMAGES, N_TEXTS = 12, 5


class Loader:
    """preprocess(paths) -> pixels, from an in-memory collection; records what it was asked for."""

    def __init__(self, pixels: dict[str, torch.Tensor]) -> None:
        self.pixels = pixels
        self.calls: list[list[str]] = []

    def __call__(self, paths: list[str]) -> torch.Tensor:
        self.calls.append(list(paths))
        return torch.stack([self.pixels[p] for p in paths])

    def seen(self) -> list[str]:
        return [p for call in self.calls for p in call]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_hf_config(image_token_index=None)
    cfg.qformer_config.use_qformer_text_input = True
    cfg.qformer_config.vocab_size = QVOCAB
    torch.manual_seed(7)
    ref = randomize_(transformers.Blip2ForImageTextRetrieval(cfg).eval(), 7)
    d = tmp_path_factory.mktemp("hf")
    ref.save_pretrained(d)
    ours = Blip2ForImageTextRetrieval.from_pretrained(d)
    px = pixel_batch(N_IMAGES, seed=11)
    paths = [f"img{i:02d}.png" for i in range(N_IMAGES)]
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(1, QVOCAB, (N_TEXTS, 7), generator=g)
    ids[:, 0] = 101 % QVOCAB
    mask = torch.ones(N_TEXTS, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    with torch.no_grad():
        itc = ref(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image.t()  # [texts, images]
        itm = torch.stack([
            ref(pixel_values=px, input_ids=ids[t].expand(N_IMAGES, -1), attention_mask=mask[t].expand(N_IMAGES, -1),
                use_image_text_matching_head=True).logits_per_image[:, 1]
            for t in range(N_TEXTS)])  # [texts, images]
    return dict(ref=ref, ours=ours, px=px, paths=paths, pixels=dict(zip(paths, px)), ids=ids, mask=mask,
                itc=itc, itm=itm)


def lavis_k_test(itc: torch.Tensor, itm: torch.Tensor, k: int, k_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LAVIS compute_sim_matrix: -100 everywhere but the top k_test by ITC, which get ITM + ITC."""
    score = torch.full_like(itc, -100.0)
    for row in range(itc.shape[0]):
        top_sim, top_idx = itc[row].topk(k_test)
        score[row, top_idx] = itm[row, top_idx] + top_sim
    best = score.topk(k, dim=1)
    return best.indices, best.values


def build(s, batch_size: int = 4, chunk_size: int = 5, parts: tuple[int, ...] = (N_IMAGES,)) -> tuple[ImageIndex, Loader]:
    loader = Loader(s["pixels"])
    index = ImageIndex(s["ours"], loader, model_id="tiny", batch_size=batch_size, chunk_size=chunk_size)
    start = 0
    for n in parts:
        assert index.add(s["paths"][start:start + n]) == n
        start += n
    return index, loader


@pytest.mark.parametrize("k,rerank_k", [(4, 4), (3, 7), (5, 12)])
def test_search_equals_brute_force_itm_rerank(setup, k, rerank_k):
    s = setup
    index, loader = build(s)
    loader.calls.clear()
    got = index.search(s["ids"], s["mask"], k=k, rerank_k=rerank_k)
    want_idx, want_scores = lavis_k_test(s["itc"], s["itm"], k, rerank_k)
    assert torch.equal(got.indices, want_idx)
    assert torch.allclose(got.scores, want_scores, atol=1e-5, rtol=0)
    assert got.paths == [[s["paths"][i] for i in row] for row in want_idx.tolist()]
    # each candidate image was read once for the whole batch of texts
    candidates = {i for row in s["itc"].topk(rerank_k, dim=1).indices.tolist() for i in row}
    assert sorted(loader.seen()) == sorted(s["paths"][i] for i in candidates)


def test_reranking_changes_the_order(setup):
    """The case above is not trivial: ITM + ITC orders differently from ITC alone."""
    s = setup
    index, _ = build(s)
    itc_only = index.search(s["ids"], s["mask"], k=5, rerank_k=0)
    assert torch.equal(itc_only.indices, s["itc"].topk(5, dim=1).indices)
    assert torch.allclose(itc_only.scores, s["itc"].topk(5, dim=1).values, atol=1e-6)
    reranked = index.search(s["ids"], s["mask"], k=5, rerank_k=12)
    assert not torch.equal(itc_only.indices, reranked.indices)


def test_single_text_search(setup):
    s = setup
    index, _ = build(s)
    one = index.search(s["ids"][3], s["mask"][3], k=3, rerank_k=6)
    many = index.search(s["ids"], s["mask"], k=3, rerank_k=6)
    assert torch.equal(one.indices[0], many.indices[3])


def test_rank_texts_equals_brute_force(setup):
    s = setup
    images = s["px"][[2, 7, 9]]
    got = rank_texts(s["ours"], images, s["ids"], s["mask"], k=3, rerank_k=4, batch_size=2, chunk_size=2)
    want_idx, want_scores = lavis_k_test(s["itc"].t()[[2, 7, 9]], s["itm"].t()[[2, 7, 9]], 3, 4)
    assert torch.equal(got.indices, want_idx)
    assert torch.allclose(got.scores, want_scores, atol=1e-5, rtol=0)
    itc_only = rank_texts(s["ours"], images, s["ids"], s["mask"], k=2, rerank_k=0)
    assert torch.equal(itc_only.indices, s["itc"].t()[[2, 7, 9]].topk(2, dim=1).indices)


def test_add_in_parts_equals_all_at_once(setup):
    s = setup
    whole, _ = build(s)
    halves, loader = build(s, parts=(8, 4))  # batch-aligned split: the same batches are encoded
    assert loader.calls[-1] == s["paths"][8:]  # the second add encodes only the new images
    assert torch.equal(halves.embeddings, whole.embeddings)
    assert halves.paths == whole.paths
    for rerank_k in (0, 6):
        a = whole.search(s["ids"], s["mask"], k=4, rerank_k=rerank_k)
        b = halves.search(s["ids"], s["mask"], k=4, rerank_k=rerank_k)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    odd, _ = build(s, parts=(5, 7))  # other batch boundaries: same up to float rounding
    assert torch.allclose(odd.embeddings, whole.embeddings, atol=1e-6, rtol=0)
    assert torch.equal(odd.search(s["ids"], s["mask"], k=4, rerank_k=6).indices,
                       whole.search(s["ids"], s["mask"], k=4, rerank_k=6).indices)


def test_embeddings_are_the_normalised_query_embeddings(setup):
    s = setup
    index, _ = build(s)
    e = index.embeddings
    assert e.shape == (N_IMAGES, 4, s["ours"].config.image_text_hidden_size)
    with torch.no_grad():
        want = s["ref"](pixel_values=s["px"], input_ids=s["ids"][:1], attention_mask=s["mask"][:1]).image_embeds
    assert torch.allclose(e, want, atol=1e-6)


def test_adding_known_paths_is_a_no_op(setup):
    s = setup
    index, loader = build(s, parts=(6,))
    n_calls = len(loader.calls)
    assert index.add(s["paths"][:6]) == 0 and len(loader.calls) == n_calls
    assert index.add(s["paths"][4:8] + s["paths"][7:8]) == 2  # 4, 5 known; 7 twice
    assert index.paths == s["paths"][:8] and len(index) == 8


def test_save_load_round_trip(setup, tmp_path):
    s = setup
    index, _ = build(s, parts=(8, 4))
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert (meta["model_id"], meta["count"], len(meta["shards"])) == ("tiny", 12, 2)
    loader = Loader(s["pixels"])
    back = ImageIndex.load(tmp_path / "idx", s["ours"], loader, model_id="tiny", batch_size=4, chunk_size=5)
    assert loader.calls == []  # nothing re-encoded
    assert torch.equal(back.embeddings, index.embeddings) and back.paths == index.paths
    a = index.search(s["ids"], s["mask"], k=4, rerank_k=6)
    b = back.search(s["ids"], s["mask"], k=4, rerank_k=6)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    # a smaller index saved over it leaves no stale shard behind
    small, _ = build(s, parts=(3,))
    small.save(tmp_path / "idx")
    assert sorted(f for f in os.listdir(tmp_path / "idx") if f.endswith(".safetensors")) == ["embeds-00000.safetensors"]
    assert len(ImageIndex.load(tmp_path / "idx", s["ours"], loader)) == 3


def test_fp16_storage_round_trip(setup, tmp_path):
    s = setup
    index = ImageIndex(s["ours"], Loader(s["pixels"]), dtype=torch.float16)
    index.add(s["paths"])
    index.save(tmp_path)
    back = ImageIndex.load(tmp_path, s["ours"], Loader(s["pixels"]))
    assert back.embeddings.dtype == torch.float16 and torch.equal(back.embeddings, index.embeddings)
    assert torch.allclose(back.embeddings.float(), build(s)[0].embeddings, atol=1e-3)


def test_load_checks_model(setup, tmp_path):
    s = setup
    index, _ = build(s, parts=(2,))
    index.save(tmp_path)
    with pytest.raises(ValueError, match="built with model 'tiny', not 'other'"):
        ImageIndex.load(tmp_path, s["ours"], Loader(s["pixels"]), model_id="other")
    meta = json.loads((tmp_path / "index.json").read_text())
    meta["embed_dim"] = 7
    (tmp_path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"embeddings are \[N, 4, 7\]"):
        ImageIndex.load(tmp_path, s["ours"], Loader(s["pixels"]))
    with pytest.raises(FileNotFoundError, match="not an image index"):
        ImageIndex.load(tmp_path / "nowhere", s["ours"], Loader(s["pixels"]))


def test_argument_errors(setup):
    s = setup
    index = ImageIndex(s["ours"], Loader(s["pixels"]))
    with pytest.raises(ValueError, match="empty"):
        index.search(s["ids"], s["mask"])
    index.add(s["paths"])
    with pytest.raises(ValueError, match=r"rerank_k \(3\) must be 0 \(ITC only\) or at least k \(5\)"):
        index.search(s["ids"], s["mask"], k=5, rerank_k=3)
    bad = ImageIndex(s["ours"], lambda paths: torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"preprocess returned shape \(1, 3, 28, 28\) for 2 paths"):
        bad.add(["a", "b"])
    # a failed add leaves nothing behind: the same paths can be added once they load
    flaky = ImageIndex(s["ours"], Loader(s["pixels"]), batch_size=2)
    with pytest.raises(KeyError):
        flaky.add(s["paths"][:3] + ["missing.png"])
    assert len(flaky) == 0 and flaky.add(s["paths"][:3]) == 3


def test_folder_of_image_files(setup, tmp_path):
    from PIL import Image

    s = setup
    (tmp_path / "sub").mkdir()
    files = [tmp_path / "b.png", tmp_path / "a.JPG", tmp_path / "sub" / "c.png"]
    g = torch.Generator().manual_seed(3)
    for f in files:
        arr = (torch.rand(28, 28, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(f, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert list_images(tmp_path) == [str(tmp_path / "a.JPG"), str(tmp_path / "b.png"), str(tmp_path / "sub" / "c.png")]

    def load_images(paths: list[str]) -> torch.Tensor:
        arrays = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in paths]
        return torch.stack(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1

    index = ImageIndex(s["ours"], load_images, batch_size=2)
    assert index.add(tmp_path) == 3
    assert index.add(tmp_path) == 0
    hit = index.search(s["ids"][:1], s["mask"][:1], k=1, rerank_k=3)
    assert hit.paths[0][0] in index.paths

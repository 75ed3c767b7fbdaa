import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip2.demo import world
from blip2.demo.world import (
    COLORS, COUNT_WORDS, DEFAULT_SIZE, PALETTE, PERTURBATIONS, SHAPES, VARIANTS, Scene, caption,
    object_mask, perturb, questions, render, render_variant, sample_scene, write_dataset, write_examples,
)
from blip2.demo.world_eval import answer_correct, caption_correct, caption_scores, normalize_answer, parse_caption

ROOT = Path(__file__).resolve().parents[1]


def scenes(n: int, seed: int = 0) -> list[Scene]:
    return [sample_scene(np.random.default_rng([seed, i])) for i in range(n)]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- scenes


def test_scene_statistics():
    ss = scenes(3000)
    n = Counter(len(s.objects) for s in ss)
    assert set(n) == {1, 2, 3} and min(n.values()) > 900  # uniform 1..3
    objs = [o for s in ss for o in s.objects]
    for attr, values in (("shape", SHAPES), ("color", COLORS), ("size", ("small", "large"))):
        c = Counter(getattr(o, attr) for o in objs)
        assert set(c) == set(values) and min(c.values()) > 0.9 * len(objs) / len(values)  # no rejection bias
    for o in objs:  # whole bounding box inside the image
        assert o.extent <= o.center[0] <= 1 - o.extent and o.extent <= o.center[1] <= 1 - o.extent


def test_objects_do_not_overlap_and_order_is_visible():
    for s in scenes(1000):
        for res in (DEFAULT_SIZE, 4 * DEFAULT_SIZE):
            masks = [object_mask(o, res) for o in s.objects]
            assert all(m.sum() > 0 for m in masks)
            total = np.sum(masks, axis=0)
            assert total.max() <= 1
        for a, b in itertools.combinations(s.objects, 2):
            assert abs(a.center[0] - b.center[0]) >= world.MIN_DX
        xs = [o.center[0] for o in s.objects]
        assert xs == sorted(xs)


def test_objects_keep_a_gap_of_at_least_two_pixels():
    for s in scenes(300):
        masks = [object_mask(o, DEFAULT_SIZE) for o in s.objects]
        for a, b in itertools.combinations(masks, 2):
            ya, xa = np.nonzero(a)
            yb, xb = np.nonzero(b)
            d = np.sqrt((ya[:, None] - yb[None]) ** 2 + (xa[:, None] - xb[None]) ** 2).min()
            assert d >= 2.0


def test_large_is_about_twice_small():
    area = {("small", sh): [] for sh in SHAPES} | {("large", sh): [] for sh in SHAPES}
    for s in scenes(1500):
        for o in s.objects:
            area[o.size, o.shape].append(object_mask(o, DEFAULT_SIZE).sum())
    for sh in SHAPES:
        small, large = np.array(area["small", sh]), np.array(area["large", sh])
        assert large.min() > 2.2 * small.max()  # linear ratio >= 1.68 (before pixel rounding), ~1.9 on average
        assert 3.0 < large.mean() / small.mean() < 4.5
        assert small.min() >= 100 if sh != "triangle" else small.min() >= 50  # >= ~1.5 patches of 8 px


def test_scene_dict_round_trip():
    for s in scenes(20):
        d = json.loads(json.dumps(s.to_dict()))
        assert Scene.from_dict(d) == s


# ----------------------------------------------------------------------------- rendering


def test_render_matches_geometry_and_colours():
    for s in scenes(300):
        img = np.asarray(render(s), np.int32)
        assert img.shape == (DEFAULT_SIZE, DEFAULT_SIZE, 3)
        fine = [object_mask(o, 4 * DEFAULT_SIZE).reshape(DEFAULT_SIZE, 4, DEFAULT_SIZE, 4) for o in s.objects]
        anywhere = np.any([m.any(axis=(1, 3)) for m in fine], axis=0)
        assert (img[~anywhere] == s.background).all()  # untouched pixels are exactly background
        for o, m in zip(s.objects, fine):
            full = m.all(axis=(1, 3))  # pixels entirely inside the shape
            assert full.sum() > 20
            assert (img[full] == o.rgb).all()


def test_centre_pixel_is_nearest_its_colour_and_far_from_background():
    palette = np.array([PALETTE[c] for c in COLORS])
    for s in scenes(1000):
        img = np.asarray(render(s), np.float64)
        bg = np.array(s.background)
        for o in s.objects:
            px = img[int(o.center[1] * DEFAULT_SIZE), int(o.center[0] * DEFAULT_SIZE)]
            assert COLORS[np.linalg.norm(palette - px, axis=1).argmin()] == o.color
            assert np.linalg.norm(px - bg) > 120


def test_palette_margins_cover_the_jitter():
    palette = np.array([PALETTE[c] for c in COLORS], np.float64)
    pair = min(np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2))
    assert pair > 90
    assert pair / 2 > world.COLOR_JITTER * np.sqrt(3)  # jitter can never cross a midpoint
    backgrounds = np.array([s.background for s in scenes(2000)], np.float64)
    assert backgrounds.min() >= 190  # light tones
    assert np.ptp(backgrounds.mean(axis=1)) > 35  # varied
    assert min(np.linalg.norm(backgrounds - p, axis=1).min() for p in palette) > 140


def test_edges_are_anti_aliased():
    mixed = 0
    for s in scenes(50):
        img = np.asarray(render(s), np.int32)
        known = np.all(img == s.background, axis=-1) | np.any([np.all(img == o.rgb, axis=-1) for o in s.objects], axis=0)
        mixed += (~known).sum()
    assert mixed > 50 * 20  # every scene has dozens of blended edge pixels


def test_other_canvases_draw_the_same_scene_undistorted():
    for s in scenes(30):
        wide = np.asarray(render(s, (80, 60)))
        assert wide.shape == (60, 80, 3)
        assert (wide[:, 10:70] == np.asarray(render(s, 60))).all()
        assert (wide[:, :10] == s.background).all() and (wide[:, 70:] == s.background).all()
        pad = np.asarray(render(s, 128, content=96))
        assert (pad[16:112, 16:112] == np.asarray(render(s))).all()
        assert (pad[:16] == s.background).all()


# ----------------------------------------------------------------------------- text


def test_captions_name_every_object_left_to_right_and_parse_back():
    s = Scene.from_dict({"background": [230, 230, 230], "objects": [
        {"shape": "circle", "color": "red", "size": "large", "center": [0.7, 0.5], "extent": 0.17, "rgb": [210, 35, 35]},
        {"shape": "square", "color": "blue", "size": "small", "center": [0.2, 0.3], "extent": 0.09, "rgb": [40, 80, 220]},
        {"shape": "triangle", "color": "green", "size": "small", "center": [0.45, 0.8], "extent": 0.09, "rgb": [40, 160, 60]},
    ]})
    assert caption(s) == "a small blue square, a small green triangle and a large red circle"
    assert caption(Scene(s.objects[:1], s.background)) == "a large red circle"
    assert caption(Scene(s.objects[:2], s.background)) == "a small blue square and a large red circle"
    for sc in scenes(2000):
        text = caption(sc)
        truth = [(o.size, o.color, o.shape) for o in sc.objects]
        assert parse_caption(text) == truth
        assert caption_scores(text, sc) == {"objects_correct": True, "exact": True}
        assert text.count(" and ") == (len(sc.objects) > 1) and text.count(",") == max(0, len(sc.objects) - 2)


def test_questions_are_answered_correctly():
    types = Counter()
    zero_colors = Counter()
    for s in scenes(3000):
        qa = questions(s)
        shapes = Counter(o.shape for o in s.objects)
        colors = Counter(o.color for o in s.objects)
        for q in qa:
            assert set(q) == {"question", "answer", "type"}
            types[q["type"]] += 1
            words = q["question"].rstrip("?").split()
            if q["type"] == "color":
                shape = words[-1]
                assert shapes[shape] == 1
                assert q["answer"] == next(o.color for o in s.objects if o.shape == shape)
            elif q["type"] == "shape":
                color = words[-2]
                assert colors[color] == 1
                assert q["answer"] == next(o.shape for o in s.objects if o.color == color)
            elif q["type"] == "count":
                assert q["answer"] == COUNT_WORDS[len(s.objects)]
            else:
                color = words[2]
                assert q["answer"] == COUNT_WORDS[colors[color]]
                if colors[color] == 0:
                    zero_colors[color] += 1
        # every unique shape / unique colour is asked about; count is always asked, once
        assert sum(q["type"] == "color" for q in qa) == sum(v == 1 for v in shapes.values())
        assert sum(q["type"] == "shape" for q in qa) == sum(v == 1 for v in colors.values())
        assert sum(q["type"] == "count" for q in qa) == 1
        assert len({q["question"] for q in qa}) == len(qa)
        assert questions(s) == qa  # a pure function of the scene
    assert types["count"] == 3000
    n_count_color = types["count_color"]
    zero_share = sum(zero_colors.values()) / n_count_color
    assert 0.08 < zero_share < 0.25  # zero answers exist but are rare
    assert set(zero_colors) == set(COLORS) and min(zero_colors.values()) > 0.5 * max(zero_colors.values())


# ----------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_perturbations(name):
    expected = {"resize_80x60": (80, 60), "resize_64": (64, 64), "resize_128": (128, 128), "pad_128": (128, 128)}
    for s in scenes(10):
        clean = render(s)
        out = perturb(clean, np.random.default_rng(1), name)
        assert out.mode == "RGB"
        assert out.size == expected.get(name, clean.size)
        again = perturb(clean, np.random.default_rng(1), name)
        assert np.array_equal(np.asarray(out), np.asarray(again))
        if out.size == clean.size:
            diff = np.abs(np.asarray(out, np.int32) - np.asarray(clean, np.int32))
            assert diff.max() > 5  # it really changed the image
        if name == "brightness":
            shift = (np.asarray(out, np.float64) - np.asarray(clean, np.float64)).mean()
            assert 8 * 0.7 < abs(shift) <= 20
        if name == "pad_128":
            assert (np.asarray(out)[16:112, 16:112] == np.asarray(clean)).all()
            assert (np.asarray(out)[:16] == s.background).all()


def test_perturbed_large_objects_keep_their_colour():
    palette = np.array([PALETTE[c] for c in COLORS])
    for name in ("jpeg", "blur", "brightness"):
        for i, s in enumerate(scenes(200)):
            img = np.asarray(perturb(render(s), np.random.default_rng(i), name), np.float64)
            for o in s.objects:
                if o.size == "large":
                    px = img[int(o.center[1] * DEFAULT_SIZE), int(o.center[0] * DEFAULT_SIZE)]
                    assert COLORS[np.linalg.norm(palette - px, axis=1).argmin()] == o.color, (name, i)


def test_random_perturbation_and_variants():
    rng = np.random.default_rng(0)
    clean = render(scenes(1)[0])
    sizes = Counter(perturb(clean, rng).size for _ in range(200))
    assert sizes[(96, 96)] > 0 and sizes[(80, 60)] > 0 and sizes[(128, 128)] > 0
    s = scenes(1)[0]
    want = {"canvas_80x60": (80, 60), "canvas_128_pad": (128, 128), "canvas_64": (64, 64),
            "resize_80x60": (80, 60), "resize_64": (64, 64), "resize_128": (128, 128), "pad_128": (128, 128)}
    assert len(VARIANTS) == 11
    for name in VARIANTS:
        im = render_variant(s, name, np.random.default_rng(0))
        assert im.mode == "RGB" and im.size == want.get(name, (96, 96))
    with pytest.raises(ValueError):
        render_variant(s, "nope", rng)


# ----------------------------------------------------------------------------- checking answers


def test_parse_caption_is_tolerant():
    assert parse_caption("Two small red circles, and a big Blue square.") == [
        ("small", "red", "circle"), ("small", "red", "circle"), ("large", "blue", "square")]
    assert parse_caption("a red circle with a green triangle next to a square") == [
        (None, "red", "circle"), (None, "green", "triangle"), (None, None, "square")]
    assert parse_caption("") == []
    assert parse_caption("a large yellow circle and a small purple square") == [
        ("large", "yellow", "circle"), ("small", "purple", "square")]


def test_caption_scores():
    s = Scene.from_dict({"background": [230, 230, 230], "objects": [
        {"shape": "circle", "color": "red", "size": "large", "center": [0.3, 0.5], "extent": 0.17, "rgb": [210, 35, 35]},
        {"shape": "square", "color": "blue", "size": "small", "center": [0.7, 0.3], "extent": 0.09, "rgb": [40, 80, 220]},
    ]})
    cases = {
        "a large red circle and a small blue square": (True, True),
        "a small blue square, a large red circle": (True, True),  # order is not scored
        "a red circle and a blue square": (True, False),  # no sizes
        "a small red circle and a small blue square": (True, False),  # wrong size
        "a large red circle": (False, False),  # missing object
        "a large red circle, a small blue square and a green triangle": (False, False),  # invented
        "a large red square and a small blue circle": (False, False),  # attributes swapped
        "a large orange circle and a small blue square": (False, False),
    }
    for text, (objects, exact) in cases.items():
        assert caption_scores(text, s) == {"objects_correct": objects, "exact": exact}, text
        assert caption_correct(text, s) is objects and caption_correct(text, s, require_size=True) is exact


def test_answer_correct():
    assert normalize_answer(" Two.") == "two" and normalize_answer("3") == "three"
    assert answer_correct("red", "red") and answer_correct("Red.", "red") and answer_correct("it is red", "red")
    assert answer_correct("2", "two") and answer_correct("the circle", "circle") and answer_correct("circles", "circle")
    assert not answer_correct("red or blue", "red") and not answer_correct("blue", "red") and not answer_correct("", "zero")


# ----------------------------------------------------------------------------- datasets


def test_write_dataset_is_complete_and_deterministic(tmp_path):
    root = Path(write_dataset(tmp_path / "a", 50, seed=3, split="val"))
    assert root == tmp_path / "a" / "val"
    caps = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    vqa = [json.loads(line) for line in (root / "vqa.jsonl").read_text().splitlines()]
    recs = [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines()]
    assert len(caps) == len(recs) == 50
    assert len({c["image"] for c in caps}) == 50 and len(list((root / "images").glob("*.png"))) == 50
    n_q = 0
    for c, r in zip(caps, recs):
        assert not os.path.isabs(c["image"]) and c["image"] == r["image"]
        im = Image.open(root / c["image"])
        assert im.size == (96, 96) and im.mode == "RGB"
        scene = Scene.from_dict(r["scene"])
        assert c["caption"] == caption(scene)
        assert np.array_equal(np.asarray(im), np.asarray(render(scene)))
        n_q += len(questions(scene))
    assert len(vqa) == n_q and all(set(q) == {"image", "question", "answer", "type"} for q in vqa)
    assert {q["type"] for q in vqa} == {"color", "shape", "count", "count_color"}

    assert tree_digest(Path(write_dataset(tmp_path / "b", 50, seed=3, split="val"))) == tree_digest(root)
    other = tree_digest(Path(write_dataset(tmp_path / "c", 50, seed=4, split="val")))
    assert sum(a != b for a, b in zip(other.values(), tree_digest(root).values())) >= 48
    # image i does not depend on n; splits draw different scenes
    small = tree_digest(Path(write_dataset(tmp_path / "d", 10, seed=3, split="val")))
    assert all(small[k] == tree_digest(root)[k] for k in small if k.startswith("images/"))
    train = Path(write_dataset(tmp_path / "e", 50, seed=3, split="train"))
    assert (train / "captions.jsonl").read_text() != (root / "captions.jsonl").read_text()


def test_variant_datasets_keep_scenes(tmp_path):
    clean = Path(write_dataset(tmp_path / "clean", 40, seed=1, split="test"))
    for variant in ("jpeg", "random"):
        root = Path(write_dataset(tmp_path / variant, 40, seed=1, split="test", variant=variant))
        for f in ("captions.jsonl", "vqa.jsonl"):
            assert (root / f).read_text() == (clean / f).read_text()
        used = Counter(json.loads(line)["variant"] for line in (root / "scenes.jsonl").read_text().splitlines())
        assert (set(used) == {"jpeg"}) if variant == "jpeg" else (len(used) >= 5 and "clean" not in used)
        again = Path(write_dataset(tmp_path / (variant + "2"), 40, seed=1, split="test", variant=variant))
        assert tree_digest(again) == tree_digest(root)
    with pytest.raises(ValueError):
        write_dataset(tmp_path / "x", 1, variant="nope")


def test_generation_speed(tmp_path):
    t = time.process_time()  # CPU time: robust to a busy machine
    write_dataset(tmp_path, 1000, seed=0)
    assert time.process_time() - t < 6.0  # ~1.5 s on one core


# ----------------------------------------------------------------------------- CLI and examples


def test_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-m", "blip2.demo.world", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "--seed" in out.stdout and "--variant" in out.stdout
    out = subprocess.run([sys.executable, "-m", "blip2.demo.world", "--out", str(tmp_path), "--n", "7", "--seed", "2"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert len((tmp_path / "train" / "captions.jsonl").read_text().splitlines()) == 7


def test_bundled_examples_are_current(tmp_path):
    bundled = ROOT / "examples" / "images"
    captions = json.loads((bundled / "captions.json").read_text())
    assert write_examples(tmp_path) == captions
    assert sorted(captions) == [f"example_{i}.png" for i in range(1, 7)]
    assert [len(parse_caption(c)) for c in captions.values()] == [1, 1, 2, 2, 3, 3]
    for name in captions:
        # same pixels (PNG bytes may differ with the zlib that Pillow was built with)
        assert np.array_equal(np.asarray(Image.open(bundled / name)), np.asarray(Image.open(tmp_path / name)))
        assert (bundled / name).stat().st_size < 8000
        assert Image.open(bundled / name).size == (DEFAULT_SIZE, DEFAULT_SIZE)

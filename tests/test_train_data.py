"""Training data in the formats users already have: Hugging Face datasets (in Python and save_to_disk
folders), Parquet and CSV tables with an image column, gzip-compressed tar shards and brace-expanded shard
lists. Each gives the same samples (pixels and text) as a JSONL manifest of the same images; what cannot be
read is named with its file and line or row."""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from blip2.images import Blip2ImageProcessor, ImageLoadError
from blip2.train import ImageTextDataset, TrainConfig, TrainTransform, load_records
from blip2.train.common import make_dataset
from blip2.train.sources import expand_braces

CAPTIONS = ["a red square", "two green dots", "a blue sky", "one black cat", "a white wall"]


def png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12 + i, 10, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def images(tmp_path):
    """Five PNG files under tmp_path/img and a manifest of them: the reference every format is compared with."""
    (tmp_path / "img").mkdir()
    for i in range(len(CAPTIONS)):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(i))
    lines = [json.dumps({"image": f"img/{i}.png", "caption": c}) for i, c in enumerate(CAPTIONS)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def samples(source, **kw):
    """(captions, pixel_values [N, 3, 8, 8]) of every record of ``source``, without augmentation."""
    records, skipped = load_records(source, **kw)
    ds = ImageTextDataset(records, TrainTransform(Blip2ImageProcessor(size=8), augment=False), skipped=skipped)
    items = [ds[i] for i in range(len(ds))]
    assert all(item["bad"] == 0 for item in items)
    return [item["caption"] for item in items], torch.stack([item["pixel_values"] for item in items])


def assert_same(got, want):
    assert got[0] == want[0]
    assert torch.equal(got[1], want[1])


# -- Hugging Face datasets ------------------------------------------------------------------------------


def hf_dataset(root, kind="image"):
    """A datasets.Dataset of the five images: an Image feature (PIL images), paths, or raw bytes."""
    datasets = pytest.importorskip("datasets")
    if kind == "image":
        column = [Image.open(io.BytesIO(png(i))) for i in range(len(CAPTIONS))]
        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        return datasets.Dataset.from_dict({"image": column, "text": CAPTIONS}, features=features)
    if kind == "path":
        return datasets.Dataset.from_dict({"image_path": [str(root / "img" / f"{i}.png") for i in range(5)],
                                           "caption": CAPTIONS})
    return datasets.Dataset.from_dict({"jpg": [png(i) for i in range(5)], "sentence": CAPTIONS})


def test_datasets_in_python(images):
    datasets = pytest.importorskip("datasets")
    want = samples(str(images / "m.jsonl"))
    assert_same(samples(hf_dataset(images, "image")), want)  # "text" is the caption
    assert_same(samples(hf_dataset(images, "path")), want)  # image_path is an image column
    assert_same(samples(hf_dataset(images, "bytes"), columns={"image": "jpg", "caption": "sentence"}), want)
    assert_same(samples(datasets.DatasetDict({"train": hf_dataset(images)})), want)
    with pytest.raises(ValueError, match=r"splits \['validation'\] and no 'train'"):
        load_records(datasets.DatasetDict({"validation": hf_dataset(images)}))
    with pytest.raises(ValueError, match=r"datasets.Dataset: no image column \(looked for image, img.*columns: "
                                         r"jpg, sentence\)"):
        load_records(hf_dataset(images, "bytes"))
    with pytest.raises(ValueError, match=r"no column 'txt' \(columns: jpg, sentence\)"):
        load_records(hf_dataset(images, "bytes"), columns={"image": "jpg", "caption": "txt"})


def test_datasets_save_to_disk_folder(images):
    datasets = pytest.importorskip("datasets")
    want = samples(str(images / "m.jsonl"))
    hf_dataset(images).save_to_disk(str(images / "saved"))
    assert_same(samples(str(images / "saved")), want)
    datasets.DatasetDict({"train": hf_dataset(images)}).save_to_disk(str(images / "saved_dict"))
    assert_same(samples([str(images / "saved_dict")]), want)


def test_a_dataset_trains_through_make_dataset(images):
    """train_stage1/2 take what make_dataset takes: a Dataset object is data like a manifest path."""
    ds = make_dataset(hf_dataset(images), Blip2ImageProcessor(size=8), TrainConfig(augment=False))
    assert isinstance(ds, ImageTextDataset) and len(ds) == 5 and ds[2]["caption"] == CAPTIONS[2]


def test_table_records_pickle_for_worker_processes(images):
    hf_dataset(images).to_parquet(str(images / "t.parquet"))
    for source in (hf_dataset(images), str(images / "t.parquet")):
        records, _ = load_records(source)
        records[1].table.image(1)  # opened in this process
        copy = pickle.loads(pickle.dumps(records))  # what a spawned DataLoader worker gets
        assert np.array_equal(np.asarray(copy[1].table.image(1)), np.asarray(records[1].table.image(1)))


# -- Parquet and CSV ------------------------------------------------------------------------------------


def test_parquet_with_bytes_paths_or_image_records(images):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = samples(str(images / "m.jsonl"))
    pq.write_table(pa.table({"image": [png(i) for i in range(5)], "caption": CAPTIONS}), images / "bytes.parquet")
    pq.write_table(pa.table({"file_name": [f"img/{i}.png" for i in range(5)], "text": CAPTIONS}),
                   images / "paths.parquet")  # relative to the file
    hf_dataset(images).to_parquet(str(images / "hf.parquet"))  # datasets' Image feature: {"bytes", "path"}
    for name in ("bytes", "paths", "hf"):
        assert_same(samples(str(images / f"{name}.parquet")), want)


def test_csv_with_image_paths(images, caplog):
    rows = ["image,caption"] + [f"img/{i}.png,{c}" for i, c in enumerate(CAPTIONS)]
    rows.insert(3, "img/0.png,")  # line 4: no caption
    rows.insert(5, '"img/9.png","quoted, with a comma"')  # a missing file: replaced at training, counted
    (images / "d.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="blip2.train"):
        records, skipped = load_records(str(images / "d.csv"))
    assert skipped == 1 and f"{images / 'd.csv'}:4: skipped, needs an image and a caption" in caplog.text
    assert [r.caption for r in records] == CAPTIONS[:3] + ["quoted, with a comma"] + CAPTIONS[3:]
    ds = ImageTextDataset(records, TrainTransform(Blip2ImageProcessor(size=8), augment=False))
    assert ds[3]["bad"] == 1 and ds[3]["caption"] == CAPTIONS[3]
    (images / "q.csv").write_text("path,question,answer\nimg/0.png,what?,red\n")
    with pytest.raises(ValueError, match=r"q.csv: no image column \(looked for image, img, image_path, file_name, "
                                         r"filepath; columns: path, question, answer\)"):
        load_records(str(images / "q.csv"), task="vqa")
    records, _ = load_records(str(images / "q.csv"), task="vqa", columns={"image": "path"})
    assert (records[0].question, records[0].answer, records[0].image) == ("what?", "red", str(images / "img/0.png"))


def test_unreadable_tables_and_images_are_named(images):
    pytest.importorskip("pyarrow")
    (images / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: not a readable Parquet file"):
        load_records(str(images / "bad.parquet"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [png(0), b"garbage", png(2)], "caption": CAPTIONS[:3]}), images / "g.parquet")
    records, _ = load_records(str(images / "g.parquet"))
    with pytest.raises(ImageLoadError, match=r"cannot read image '.*g.parquet row 1': not an image in an accepted format"):
        records[1].table.image(1)
    ds = ImageTextDataset(records, TrainTransform(Blip2ImageProcessor(size=8), augment=False))
    assert ds[1]["bad"] == 1 and ds[1]["caption"] == CAPTIONS[2]  # replaced by the next row, counted
    (images / "data.jsonl").write_bytes(b'{"image": "img/0.png", "caption": "ok"}\n\x89PNG\x00\xff\xfe')
    records, skipped = load_records(str(images / "data.jsonl"))  # the line that is not UTF-8 is skipped alone
    assert [r.caption for r in records] == ["ok"] and skipped == 1
    with pytest.raises(FileNotFoundError, match=r"nothere.parquet: no such file"):
        load_records(str(images / "nothere.parquet"))


# -- tar shards: gzip-compressed, brace lists -------------------------------------------------------------


def write_shard(path, items, mode):
    with tarfile.open(path, mode) as tf:
        for key, caption in items:
            for name, data in ((f"{key}.png", png(key)), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_gzip_shards_and_brace_lists(images, monkeypatch):
    monkeypatch.setenv("BLIP2_CACHE_DIR", str(images / "cache"))
    want = samples(str(images / "m.jsonl"))
    items = list(enumerate(CAPTIONS))
    write_shard(images / "shard-000.tar.gz", items[:3], "w:gz")
    write_shard(images / "shard-001.tar.gz", items[3:], "w:gz")
    write_shard(images / "plain-000.tar", items[:2], "w")
    write_shard(images / "plain-001.tgz", items[2:], "w:gz")
    assert_same(samples(str(images / "shard-{000..001}.tar.gz")), want)
    assert_same(samples([str(images / "plain-000.tar"), str(images / "plain-001.tgz")]), want)
    unpacked = sorted(p.name for p in (images / "cache" / "shards").iterdir())
    assert len(unpacked) == 3 and all(p.endswith(".tar") for p in unpacked)  # once each, kept
    stamp = [(p, p.stat().st_mtime_ns) for p in (images / "cache" / "shards").iterdir()]
    samples(str(images / "shard-{000..001}.tar.gz"))
    assert [(p, p.stat().st_mtime_ns) for p in (images / "cache" / "shards").iterdir()] == stamp  # not again
    with pytest.raises(FileNotFoundError, match=r"shard-002.tar.gz: no such file \(from .*shard-\{000..002\}"
                                                r".tar.gz, 1 of 3 missing\)"):
        load_records(str(images / "shard-{000..002}.tar.gz"))
    (images / "broken.tar.gz").write_bytes(b"\x1f\x8b" + b"not really gzip")
    with pytest.raises(ValueError, match=r"broken.tar.gz: not a readable gzip-compressed tar shard"):
        load_records(str(images / "broken.tar.gz"))


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("x{8..10}") == ["x8", "x9", "x10"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("{a,{b,c}}.tar") == ["a.tar", "b.tar", "c.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"] and expand_braces("open{.tar") == ["open{.tar"]

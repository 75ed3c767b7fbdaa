"""Training examples in tables: Hugging Face ``datasets`` (a ``Dataset`` in Python, or a folder written by
``save_to_disk``), Parquet files and CSV files with an image column. Reading Parquet needs ``pyarrow`` and
``save_to_disk`` folders need ``datasets`` (both: ``pip install 'blip2[data]'``).

Columns: the image in ``image`` (or the first of ``IMAGE_COLUMNS`` present), holding file paths (relative to
the file's directory) or, in Parquet and datasets, encoded image bytes (a binary column, or the
``{"bytes", "path"}`` records of datasets' ``Image`` feature). The text in the fields manifests have
(``caption``, or ``question`` and ``answer``); a ``text`` column is read as the caption. ``columns`` maps
those names to a table's own: ``{"image": "jpg", "caption": "sentence"}``.

Texts are read with the table; images are read by row where a sample is loaded (``TableImages``), so a
table's images are never all in memory. A row without the text the task needs is skipped, counted and
logged with the file and its line (CSV) or row (Parquet, datasets).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from typing import Any

from PIL import Image

from blip2.images import ImageLoadError, load_image
from blip2.train.sources import Record, decode_image, record_fields

__all__ = ["IMAGE_COLUMNS", "TableImages", "is_saved_dataset", "read_csv", "read_dataset", "read_parquet"]

logger = logging.getLogger("blip2.train")

IMAGE_COLUMNS = ("image", "img", "image_path", "file_name", "filepath")
TEXT_COLUMNS = ("caption", "question", "answer", "prefix", "negative")
_DATA_EXTRA = "pip install 'blip2[data]'"


class TableImages:
    """The images of one table column, by row: ``image(row)`` -> an RGB PIL image, or ImageLoadError naming
    the table and the row. ``read(row)`` gives the cell (opened in each process where it is first used)."""

    def __init__(self, name: str, read: Callable[[int], Any], base_dir: str | None) -> None:
        self.name, self.read, self.base_dir = name, read, base_dir

    def image(self, row: int) -> Image.Image:
        where = f"{self.name} row {row}"
        value = self.read(row)
        if isinstance(value, dict):  # datasets' Image feature: encoded bytes, or a path
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return decode_image(bytes(value), where)
        if isinstance(value, str) and value:
            path = value if self.base_dir is None else os.path.join(self.base_dir, value)
            try:
                return load_image(path)  # type: ignore[return-value]  # a path gives a PIL image
            except (ImageLoadError, OSError) as e:
                raise ImageLoadError(f"{where}: {e}") from None
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        raise ImageLoadError(f"{where}: the image column holds {type(value).__name__}, expected image bytes or a path")


def _columns(available: list[str], columns: dict[str, str] | None, name: str) -> dict[str, str]:
    """Our field name -> the table's column, for the image and each text field the table has."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - {"image", *TEXT_COLUMNS})
    if unknown:
        raise ValueError(f"columns: unknown fields {unknown}; expected some of image, {', '.join(TEXT_COLUMNS)}")
    missing = sorted(c for c in columns.values() if c not in available)
    if missing:
        raise ValueError(f"{name}: no column {missing[0]!r} (columns: {', '.join(available)})")
    if "image" not in columns:
        found = [c for c in IMAGE_COLUMNS if c in available]
        if not found:
            raise ValueError(f"{name}: no image column (looked for {', '.join(IMAGE_COLUMNS)}; columns: "
                             f"{', '.join(available)}); name it with columns={{'image': ...}}")
        columns["image"] = found[0]
    for field in TEXT_COLUMNS:
        if field not in columns and field in available:
            columns[field] = field
    if "caption" not in columns and "text" in available:
        columns["caption"] = "text"
    return columns


def _records(name: str, texts: dict[str, list[Any]], n: int, images: TableImages | None, task: str,
             where: Callable[[int], str], image_paths: list[Any] | None = None) -> tuple[list[Record], int]:
    """One record per row of the text columns ``texts`` (field -> values); the image by row from ``images``,
    or the file ``image_paths[row]`` (CSV). ``where(row)``: the row as messages name it."""
    records: list[Record] = []
    skipped = 0
    for row in range(n):
        fields = record_fields({field: values[row] for field, values in texts.items()}, task)
        path = image_paths[row] if image_paths is not None else None
        if fields is None or (image_paths is not None and not (isinstance(path, str) and path.strip())):
            logger.warning("%s: skipped, needs an image and %s", where(row), _needed(task))
            skipped += 1
        elif images is not None:
            records.append(Record(name, row=row, table=images, **fields))
        else:
            records.append(Record(path.strip(), **fields))
    return records, skipped


def _needed(task: str) -> str:
    return {"caption": "a caption", "vqa": "a question and an answer"}.get(task, "a caption, or a question and an answer")


# -- CSV ---------------------------------------------------------------------------------------------------


def read_csv(path: str, task: str = "caption", columns: dict[str, str] | None = None) -> tuple[list[Record], int]:
    """Records of a CSV file with a header row; its image column holds file paths, relative to the file."""
    root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        lines: list[int] = []
        try:
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty, expected a header row naming the columns")
            cols = _columns(header, columns, path)
            rows = []
            for row in reader:
                rows.append(row)
                lines.append(reader.line_num)
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{reader.line_num + 1}: not UTF-8 text") from None
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: {e}") from None
    index = {c: header.index(c) for c in cols.values()}

    def cell(row: list[str], field: str) -> str | None:
        i = index[cols[field]]
        return row[i] if i < len(row) else None

    texts = {field: [cell(r, field) for r in rows] for field in cols if field != "image"}
    paths = [cell(r, "image") for r in rows]
    paths = [os.path.join(root, p.strip()) if isinstance(p, str) and p.strip() else None for p in paths]
    return _records(path, texts, len(rows), None, task, lambda i: f"{path}:{lines[i]}", image_paths=paths)


# -- Parquet -----------------------------------------------------------------------------------------------


def _pyarrow_parquet(path: str) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs pyarrow ({_DATA_EXTRA})") from None
    return pq


class ParquetColumn:
    """Cells of one column of a Parquet file by row, memory-mapped once per process (picklable: a worker
    process opens the file itself)."""

    def __init__(self, path: str, column: str) -> None:
        self.path, self.column = path, column
        self._array: Any = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "column": self.column, "_array": None, "_pid": -1}

    def __call__(self, row: int) -> Any:
        if self._pid != os.getpid():
            pq = _pyarrow_parquet(self.path)
            self._array = pq.read_table(self.path, columns=[self.column], memory_map=True).column(0)
            self._pid = os.getpid()
        return self._array[row].as_py()


def read_parquet(path: str, task: str = "caption", columns: dict[str, str] | None = None) -> tuple[list[Record], int]:
    """Records of a Parquet file; images by row, from bytes or paths relative to the file."""
    pq = _pyarrow_parquet(path)
    try:
        names = list(pq.read_schema(path).names)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    cols = _columns(names, columns, path)
    try:
        table = pq.read_table(path, columns=[cols[f] for f in cols if f != "image"])
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read its columns ({e})") from None
    texts = {field: table.column(cols[field]).to_pylist() for field in cols if field != "image"}
    images = TableImages(path, ParquetColumn(path, cols["image"]), os.path.dirname(os.path.abspath(path)))
    return _records(path, texts, table.num_rows, images, task, lambda i: f"{path} row {i}")


# -- Hugging Face datasets ---------------------------------------------------------------------------------


def is_saved_dataset(path: str) -> bool:
    """Is ``path`` a folder that ``datasets``' ``save_to_disk`` wrote (a Dataset or a DatasetDict)?"""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                       for f in ("state.json", "dataset_dict.json"))


def is_dataset(obj: Any) -> bool:
    """A ``datasets.Dataset`` or ``DatasetDict`` (told by their attributes, so ``datasets`` need not be imported)."""
    return hasattr(obj, "column_names") and (hasattr(obj, "features") or hasattr(obj, "keys"))


class DatasetColumn:
    """Cells of one column of a ``datasets.Dataset`` by row; datasets' ``Image`` feature is read undecoded
    (``{"bytes", "path"}``), so the image is decoded once, here."""

    def __init__(self, dataset: Any, column: str) -> None:
        dataset = dataset.select_columns([column])
        feature = dataset.features[column]
        if type(feature).__name__ == "Image" and getattr(feature, "decode", False):
            import datasets

            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset, self.column = dataset, column

    def __call__(self, row: int) -> Any:
        return self.dataset[row][self.column]


def read_dataset(dataset: Any, task: str = "caption", columns: dict[str, str] | None = None,
                 name: str = "datasets.Dataset", base_dir: str | None = None) -> tuple[list[Record], int]:
    """Records of a ``datasets.Dataset`` (a ``DatasetDict``: its "train" split), or of the ``save_to_disk``
    folder ``dataset``. ``base_dir``: where relative image paths start (the folder; else the working directory)."""
    if isinstance(dataset, str):
        try:
            import datasets
        except ImportError:
            raise ImportError(f"{dataset}: a folder written by datasets' save_to_disk; reading it needs the "
                              f"datasets package ({_DATA_EXTRA})") from None
        name = base_dir = dataset
        dataset = datasets.load_from_disk(dataset)
    if not hasattr(dataset, "features"):  # a DatasetDict
        splits = list(dataset.keys())
        if "train" not in splits:
            raise ValueError(f"{name}: a DatasetDict with splits {splits} and no 'train': pass the split to train on")
        logger.info("%s: training on the 'train' split of %s", name, splits)
        dataset, name = dataset["train"], f"{name}['train']"
    cols = _columns(list(dataset.column_names), columns, name)
    texts = {field: list(dataset[cols[field]]) for field in cols if field != "image"}
    images = TableImages(name, DatasetColumn(dataset, cols["image"]), base_dir)
    return _records(name, texts, len(dataset), images, task, lambda i: f"{name} row {i}")

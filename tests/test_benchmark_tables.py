"""The benchmark scripts' markdown: notes wrapped to readable lines, the recorded GPU table read back as it was
written, and docs/BENCHMARKS.md's blocks replaced between their markers."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import bench_gpu  # noqa: E402
from common import BENCHMARKS, Table, wrap, write_results  # noqa: E402

LONG = ("AMD EPYC (avx512f, avx512_bf16), 2 cores, 1 thread(s) used; torch 2.13.0+cpu; x transformers is the median "
        "of the per-round ratios - 2. a word that starts a list # or a heading + or a bullet, then more words " * 4)


def test_wrap_keeps_every_word_and_starts_no_block():
    text = wrap(LONG, 80)
    lines = text.splitlines()
    assert text.split() == LONG.split()
    assert len(lines) > 5 and max(len(line) for line in lines) <= 83  # a marker word may follow a full line
    # a continuation line never begins with what markdown reads as a list item, heading or quote
    assert [line for line in lines[1:] if line.split()[0] in ("-", "+", "*", "#", ">", "2.")] == []


def test_wrap_list_item_indents_its_continuation():
    lines = wrap("- " + "item " * 50, 40).splitlines()
    assert lines[0].startswith("- ") and all(line.startswith("  ") and line[2] != " " for line in lines[1:])


def test_table_markdown_paragraphs_and_one_list():
    table = Table("T", ["a", "b"], [["1", "2"]], ["first paragraph", "- one", "- two", "last paragraph"])
    assert table.markdown() == ("**T**\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nfirst paragraph\n\n- one\n- two\n\n"
                                "last paragraph")


def test_a_row_has_a_cell_per_column():
    table = Table("T", ["a", "b"])
    table.add(1, 2)
    with pytest.raises(ValueError, match="T: a row of 3 cells, the table has 2 columns"):
        table.add(1, 2, 3)
    assert table.rows == [["1", "2"]]


def test_generated_tables_have_a_cell_per_column():
    """Every row of every table in the benchmarks page has as many cells as its header."""
    with open(BENCHMARKS, encoding="utf-8") as f:
        lines = f.read().splitlines()
    header = None
    for line in lines:
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = line.count(" | ")
        else:
            assert line.startswith("|---") or line.count(" | ") == header, line


def test_recorded_gpu_table_reads_back_its_notes(tmp_path):
    written = Table(bench_gpu.TITLE, bench_gpu.COLUMNS, [["opt-125m", "fp16", "8", "ours", "0.262", "31", "1.11",
                                                          "26", "equal"]],
                    [LONG, "- a list item " * 20, "- another", "Peak MB: short."])
    path = tmp_path / "gpu.md"
    path.write_text(written.markdown() + "\n")
    read = bench_gpu.recorded(str(path))
    assert read.rows == written.rows
    assert [n.split() for n in read.notes[:-1]] == [n.split() for n in written.notes]
    assert read.notes[-1].startswith("Written by `python benchmarks/bench_gpu.py --record")


def test_write_results_replaces_only_the_marked_block(tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# B\n<!-- x:start -->\nold\n<!-- x:end -->\n<!-- y:start -->\nkept\n<!-- y:end -->\n")
    write_results("new **table**", "<!-- x:start -->", "<!-- x:end -->", str(page))
    assert page.read_text() == ("# B\n<!-- x:start -->\nnew **table**\n<!-- x:end -->\n<!-- y:start -->\nkept\n"
                                "<!-- y:end -->\n")
    with pytest.raises(SystemExit, match="no <!-- z:start --> ... <!-- z:end --> block"):
        write_results("t", "<!-- z:start -->", "<!-- z:end -->", str(page))


def test_benchmarks_page_has_every_generated_block():
    with open(BENCHMARKS, encoding="utf-8") as f:
        text = f.read()
    for name in ("bench", "bench-gpu", "bench-gpu-real", "demo-eval", "bench-real-fp32", "bench-real-bf16"):
        assert text.count(f"<!-- {name}:start -->") == 1 and text.count(f"<!-- {name}:end -->") == 1


def test_real_size_tables_are_one_block_per_dtype_stored_dtype_and_preset_set():
    import bench_real

    with open(BENCHMARKS, encoding="utf-8") as f:
        text = f.read()
    runs = [("bf16", None, None), ("fp32", None, None), ("bf16", "fp32", None), ("bf16", None, ["blip2-opt-6.7b"]),
            ("bf16", "fp32", ["blip2-opt-6.7b"])]
    names = []
    for dtype, stored, presets in runs:
        start, end = bench_real.markers(dtype, stored=stored, presets=presets)
        assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end)
        names.append(start)
    assert len(set(names)) == len(runs)  # no run writes over another's table
    assert bench_real.markers("bf16", presets=list(bench_real.PRESETS)) == bench_real.markers("bf16")
    assert bench_real.markers("bf16", stored="fp32", presets=["blip2-opt-6.7b"])[0] == \
        "<!-- bench-real-bf16-from-fp32-opt-6.7b:start -->"

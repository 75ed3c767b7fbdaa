"""benchmarks/bench_gpu_real.py, the run prepared for a GPU session, checked on the CPU with a tiny config: every
table filled with numbers that hang together, tokens compared, a quantization that cannot run here reported in its
row, the deadline honoured, each row logged as it is measured."""

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import bench_gpu_real  # noqa: E402
import bench_real  # noqa: E402
from conftest import tiny_hf_config  # noqa: E402


@pytest.fixture
def tiny_preset(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    configs.mkdir()
    tiny_hf_config("opt").to_json_file(str(configs / "tiny-opt-config.json"))
    monkeypatch.setattr(bench_real, "CONFIGS", str(configs))
    monkeypatch.setattr(bench_real, "CACHE", str(tmp_path / "cache"))
    return "tiny-opt"


def _rows(table):
    return {(r[2], r[3]): dict(zip(table.columns, r)) for r in table.rows}


def test_the_gpu_run_fills_its_tables_on_the_cpu(tiny_preset, tmp_path):
    log = tmp_path / "rows.log"
    caption, vision = bench_gpu_real.run([tiny_preset], [1, 2], [2], repeats=2, device="cpu", log=str(log))
    rows = _rows(caption)
    for batch in ("1", "2"):
        hf, ours = rows[(batch, "transformers")], rows[(batch, "ours")]
        for r in (hf, ours):
            t = float(r["s / batch"])
            assert t > 0 and float(r["images/s"]) == pytest.approx(int(batch) / t, rel=0.05)
            step = float(r["decoding step ms"])
            assert 0 < step < 1e3 * t  # one step is a part of the call
            assert r["% of HBM bound (decoding step)"].endswith("%")
        assert hf["x transformers"] == "1.00" and float(ours["x transformers"]) > 0
        assert ours["tokens"] == "equal"  # fp32 on the CPU: the same greedy tokens
    # load and the first call on the first batch's rows only; time to first caption is their sum
    first = rows[("1", "ours")]
    assert float(first["time to first caption s"]) == pytest.approx(
        float(first["load s"]) + float(first["first call s"]), abs=0.11)
    assert rows[("2", "ours")]["load s"] == "-" and rows[("2", "ours")]["time to first caption s"] == "-"
    # the vision encoder at the batches above one, both implementations, a share of the measured product rate
    vrows = _rows(vision)
    assert set(vrows) == {("2", "transformers"), ("2", "ours")}
    assert all(float(r["ms"]) > 0 and r["% of tensor-core peak"].endswith("%") for r in vrows.values())
    # quantization rows: bitsandbytes needs CUDA in ours, which says so in the row instead of stopping the run
    bnb = rows[("-", "ours + bitsandbytes 8-bit")]
    assert bnb["load s"].startswith("failed: QuantizationError") and "CUDA" in bnb["load s"]
    assert rows[("-", "ours + bitsandbytes 4-bit nf4")]["load s"].startswith("failed: QuantizationError")
    # torchao's int8 runs on a CPU: measured in both, without the HBM bound (a quantized step's bytes differ)
    if importlib.util.find_spec("torchao") is not None:
        for impl in ("transformers", "ours"):
            row = rows[("2", f"{impl} + torchao int8 weight-only")]
            assert float(row["s / batch"]) > 0 and row["% of HBM bound (decoding step)"] == "-"
    # every row reached the log as it was measured
    logged = log.read_text().splitlines()
    assert len(logged) == len(caption.rows) + len(vision.rows)
    assert "Not measured" not in " ".join(caption.notes)


def test_the_deadline_stops_new_work_and_says_what_was_left(tiny_preset):
    caption, vision = bench_gpu_real.run([tiny_preset], [1, 2], [2], repeats=1, device="cpu", deadline_s=0)
    assert caption.rows == [] and vision.rows == []
    left = next(n for n in caption.notes if n.startswith("Not measured"))
    assert "tiny-opt captions" in left and "tiny-opt vision" in left and "tiny-opt torchao int4 weight-only" in left


def test_without_cuda_the_recorded_run_is_shown(tmp_path):
    assert "No real-size GPU run recorded yet" in bench_gpu_real.recorded(str(tmp_path / "none.md"))
    (tmp_path / "gpu-real.md").write_text("**Real size on a GPU**\n\n| a |\n|---|\n")
    assert bench_gpu_real.recorded(str(tmp_path / "gpu-real.md")).startswith("**Real size on a GPU**")


def test_a_failing_variant_gets_its_row_and_the_run_goes_on(tiny_preset, monkeypatch):
    """A quantization library missing fails both of its rows; a timed round that runs out of memory fails its
    batch's row; every other row is still measured."""
    def missing(dtype):
        raise ImportError("No module named 'torchao'")

    monkeypatch.setattr(bench_gpu_real, "quantization_configs", lambda: {"torchao int8 weight-only": missing})
    real = bench_gpu_real.interleave

    calls = []

    def interleave(fns, repeats, device):  # the second batch's timed rounds fail (the vision rounds do not)
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(fns, repeats, device)

    monkeypatch.setattr(bench_gpu_real, "interleave", interleave)
    caption, vision = bench_gpu_real.run([tiny_preset], [1, 2], [2], repeats=1, device="cpu")
    rows = _rows(caption)
    assert float(rows[("1", "ours")]["s / batch"]) > 0  # the first batch measured
    assert rows[("2", "-")]["load s"] == "failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert ("2", "ours") not in rows
    assert len(vision.rows) == 2  # the vision encoder still measured, on the same models
    for impl in ("transformers", "ours"):
        assert "No module named 'torchao'" in rows[("-", f"{impl} + torchao int8 weight-only")]["load s"]

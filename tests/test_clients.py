"""Client code as people publish it (tests/clients/: a model card's snippets, a PEFT fine-tuning script, a
Trainer script, a streaming chat demo, feature extraction, quantized loading), each run twice on a tiny
checkpoint that transformers saved: as written, and with its one ``from transformers import Blip2...`` line
changed to ``from blip2 import ...``. Both runs must give the same results: texts, losses, features, adapter
outputs."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CLIENTS = Path(__file__).parent / "clients"
IMPORT_LINE = re.compile(r"^from transformers import (Blip2\w*(, Blip2\w*)*)$", re.M)


def client_source(name: str, library: str) -> str:
    """The script ``name`` as written (``library="transformers"``) or with its import line changed."""
    source = (CLIENTS / name).read_text()
    lines = IMPORT_LINE.findall(source)
    assert len(lines) == 1, f"{name}: expected one 'from transformers import Blip2...' line, found {len(lines)}"
    return source if library == "transformers" else IMPORT_LINE.sub(r"from blip2 import \1", source)


def run_client(name: str, library: str, *args: str, tmp_path: Path) -> dict:
    """Run the script as ``python name args...`` would, in this process; its global variables afterwards."""
    path = tmp_path / f"{library}_{name}"
    path.write_text(client_source(name, library))
    argv = sys.argv
    sys.argv = [str(path), *args]
    try:
        with torch.random.fork_rng():
            return runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("client_image") / "dog.png"
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(path)
    return str(path)


def both(name: str, tmp_path: Path, *args: str) -> tuple[dict, dict]:
    ref = run_client(name, "transformers", *[a.replace("{lib}", "transformers") for a in args], tmp_path=tmp_path)
    ours = run_client(name, "blip2", *[a.replace("{lib}", "blip2") for a in args], tmp_path=tmp_path)
    return ref, ours


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=atol, rtol=0)


def test_the_runner_changes_only_the_import_line():
    for script in sorted(CLIENTS.glob("*.py")):
        ref = client_source(script.name, "transformers").splitlines()
        ours = client_source(script.name, "blip2").splitlines()
        changed = [(a, b) for a, b in zip(ref, ours) if a != b]
        assert len(ref) == len(ours) and len(changed) == 1, script.name
        assert changed[0][1].startswith("from blip2 import Blip2"), changed


def test_model_card(tiny_model_dir, image_path, tmp_path):
    ref, ours = both("model_card.py", tmp_path, tiny_model_dir, image_path)
    for name in ("answer", "caption", "answers"):
        assert ours[name] == ref[name], name
    assert ours["answer"] and ours["caption"] and all(ours["answers"])


def test_streaming_chat(tiny_model_dir, image_path, tmp_path):
    ref, ours = both("streaming_chat.py", tmp_path, tiny_model_dir, image_path)
    assert ours["history"] == ref["history"]
    assert ours["transcript"] == ref["transcript"]  # the same text in the same pieces
    assert all(reply for _, reply in ours["history"])


def test_feature_extraction(tiny_model_dir, image_path, tmp_path):
    ref, ours = both("feature_extraction.py", tmp_path, tiny_model_dir, image_path)
    for name in ("image_embeds", "pooled", "qformer_features", "text_features", "hidden_states", "embedding"):
        assert ours[name].shape == ref[name].shape, name
    for name in ("image_embeds", "pooled", "qformer_features", "hidden_states", "embedding"):
        close(ours[name], ref[name])
    # the text's tokens; on left padding, where no key is left to attend, torch gives transformers zeros and
    # blip2 attends the position itself (no NaN on any torch): values nobody reads (docs/TRANSFORMERS.md)
    tokens = ref["text_inputs"]["attention_mask"].bool()
    assert not tokens.all()  # the two texts differ in length: there is padding to leave out
    close(ours["text_features"][tokens], ref["text_features"][tokens])


def test_peft_finetune(tiny_model_dir, image_path, tmp_path):
    pytest.importorskip("peft")
    ref, ours = both("peft_finetune.py", tmp_path, tiny_model_dir, image_path, str(tmp_path / "{lib}_adapter"))
    np.testing.assert_allclose(ours["losses"], ref["losses"], atol=1e-4, rtol=0)
    assert ref["losses"][-1] < ref["losses"][0]  # it trained
    close(ours["logits"], ref["logits"], atol=1e-3)
    assert ours["caption"] == ref["caption"]


def test_trainer_finetune(tiny_model_dir, image_path, tmp_path):
    pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    ref, ours = both("trainer_finetune.py", tmp_path, tiny_model_dir, image_path, str(tmp_path / "{lib}_out"))
    np.testing.assert_allclose(ours["losses"], ref["losses"], atol=1e-4, rtol=0)
    assert len(ours["losses"]) == 4
    from safetensors.torch import load_file

    from blip2 import Blip2ForConditionalGeneration

    # Trainer writes a full checkpoint for transformers' own classes only; for any other model, the weights
    # alone (docs/TRANSFORMERS.md): they load into the model the run started from, and equal transformers'
    assert not (tmp_path / "blip2_out" / "config.json").exists()
    weights = {lib: load_file(tmp_path / f"{lib}_out" / "model.safetensors") for lib in ("transformers", "blip2")}
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir)
    model.load_state_dict(weights["blip2"], strict=True)
    reference = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "transformers_out")
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        close(a, b, atol=1e-4)


def test_quantized_loading(tiny_model_dir, image_path, tmp_path):
    if not torch.cuda.is_available():
        # no GPU: bitsandbytes cannot load, and blip2 says so, naming what is needed and the CPU alternative
        with pytest.raises(Exception) as error:
            run_client("quantized_loading.py", "blip2", tiny_model_dir, image_path, tmp_path=tmp_path)
        message = str(error.value)
        assert "quantization_config" in message and "CUDA" in message and "fast.apply(model, \"int8\")" in message, message
        return
    ref, ours = both("quantized_loading.py", tmp_path, tiny_model_dir, image_path)
    assert ours["answer"] == ref["answer"]

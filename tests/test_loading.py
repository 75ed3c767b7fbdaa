"""``from_pretrained`` with transformers' loading arguments: each does what it does there, or is refused with an
error naming it; ``device_map`` plans and hooks; ``quantization_config`` (bitsandbytes, torchao)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import blip2.hub
from blip2 import Blip2ForConditionalGeneration, Blip2VisionModel, CheckpointError
from blip2.placement import dispatch, plan_layers
from blip2.quantized import QuantizationError, parse_quantization_config, quantize_language_model
from conftest import pixel_batch, prompts_with_images

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def inputs():
    ids, mask = prompts_with_images([[2, 10, 11, 12], [2, 20, 21, 22]])
    return pixel_batch(2, seed=3), ids, mask


def logits(model, inputs):
    with torch.no_grad():
        return model(*inputs).logits.float()


# -- dtype, attn_implementation, low_cpu_mem_usage -------------------------------------------------------


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_from_pretrained_draws_no_initial_values(hf_opt_dir, hf_t5_dir, text, monkeypatch):
    """from_pretrained builds the model on the meta device for the checkpoint to fill: drawing initial values
    there is wasted (and PyTorch's first random draw on meta imports torch._refs, ~1.5 s of every load), so
    nothing is drawn. A model built on a real device is still initialised."""
    drawn: list[str] = []
    for name in ("normal_", "trunc_normal_"):
        real = getattr(torch.nn.init, name)
        monkeypatch.setattr(torch.nn.init, name,
                            lambda t, *a, _real=real, **k: (drawn.append(t.device.type), _real(t, *a, **k))[1])
    model = Blip2ForConditionalGeneration.from_pretrained((hf_opt_dir if text == "opt" else hf_t5_dir)[1])
    assert drawn == []
    fresh = Blip2ForConditionalGeneration(model.config)
    assert drawn and set(drawn) == {"cpu"}
    assert fresh.language_model.get_input_embeddings().weight.std() > 0


def test_dtype_auto_is_the_checkpoints(hf_opt_dir, tmp_path):
    hf, _ = hf_opt_dir
    hf.to(torch.float16).save_pretrained(tmp_path)  # config.json says float16
    hf.to(torch.float32)
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype="auto")
    assert model.language_model.lm_head.weight.dtype == torch.float16
    assert model.qformer.layernorm.weight.dtype == torch.float32  # kept fp32, as transformers keeps it
    bf16 = Blip2ForConditionalGeneration.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert bf16.vision_model.post_layernorm.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype='float16' and torch_dtype='bfloat16' disagree"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype="float16", torch_dtype="bfloat16")


def test_attention_implementations_and_no_effect_arguments(hf_opt_dir, inputs):
    _, d = hf_opt_dir
    base = logits(Blip2ForConditionalGeneration.from_pretrained(d), inputs)
    for name in ("eager", "sdpa"):
        model = Blip2ForConditionalGeneration.from_pretrained(d, attn_implementation=name, low_cpu_mem_usage=True,
                                                              trust_remote_code=True)
        assert torch.equal(logits(model, inputs), base)
    with pytest.raises(ValueError, match="attn_implementation='flex': expected one of eager, sdpa, flash_attention_2"):
        Blip2ForConditionalGeneration.from_pretrained(d, attn_implementation="flex")
    if not CUDA:
        with pytest.raises((ImportError, ValueError), match="flash_attention_2"):
            Blip2ForConditionalGeneration.from_pretrained(d, attn_implementation="flash_attention_2")


def test_arguments_that_cannot_apply_are_named(hf_opt_dir):
    _, d = hf_opt_dir
    with pytest.raises(TypeError, match=r"unexpected arguments \['num_beams'\]"):
        Blip2ForConditionalGeneration.from_pretrained(d, num_beams=3)
    with pytest.raises(TypeError, match="offload_folder is not supported: blip2 does not offload weights to disk"):
        Blip2ForConditionalGeneration.from_pretrained(d, offload_folder="/tmp/x")
    with pytest.raises(TypeError, match="give device or device_map, not both"):
        Blip2ForConditionalGeneration.from_pretrained(d, device="cpu", device_map="cpu")


# -- where the files are: subfolder, variant, use_safetensors, Hub arguments --------------------------------


def test_subfolder_variant_and_use_safetensors(hf_opt_dir, tmp_path, inputs):
    hf, d = hf_opt_dir
    base = logits(Blip2ForConditionalGeneration.from_pretrained(d), inputs)
    sub = tmp_path / "repo" / "blip"
    shutil.copytree(d, sub)
    assert torch.equal(logits(Blip2ForConditionalGeneration.from_pretrained(tmp_path / "repo", subfolder="blip"),
                              inputs), base)
    with pytest.raises(FileNotFoundError, match="has no subfolder 'nope'"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path / "repo", subfolder="nope")
    os.rename(sub / "model.safetensors", sub / "model.fp16.safetensors")
    assert torch.equal(logits(Blip2ForConditionalGeneration.from_pretrained(sub, variant="fp16"), inputs), base)
    with pytest.raises(CheckpointError, match=r"no weights found \(expected model.safetensors"):
        Blip2ForConditionalGeneration.from_pretrained(sub)
    # a PyTorch file beside it: use_safetensors=False reads it, True refuses it
    torch.save({k: v * 0 + 1 if k == "language_projection.bias" else v for k, v in hf.state_dict().items()
                if not k.endswith(("embed_tokens.weight",)) or "decoder" in k}, sub / "pytorch_model.bin")
    from_bin = Blip2ForConditionalGeneration.from_pretrained(sub, use_safetensors=False)
    assert torch.equal(from_bin.language_projection.bias, torch.ones_like(from_bin.language_projection.bias))
    with pytest.raises(CheckpointError, match="no weights found with use_safetensors=True"):
        Blip2ForConditionalGeneration.from_pretrained(sub, use_safetensors=True)


def test_hub_arguments_reach_the_download(monkeypatch, hf_opt_dir):
    _, d = hf_opt_dir
    seen = {}

    def fake_snapshot(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return d

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    Blip2VisionModel.from_pretrained("org/blip", revision="v2", cache_dir="/c", token="t", local_files_only=True,
                                     force_download=True)
    assert {k: seen[k] for k in ("repo_id", "revision", "cache_dir", "token", "local_files_only", "force_download")} \
        == {"repo_id": "org/blip", "revision": "v2", "cache_dir": "/c", "token": "t", "local_files_only": True,
            "force_download": True}
    assert blip2.hub.resolve_dir(d) == d


# -- device_map -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device_map", ["auto", "cpu", {"": "cpu"}, {"vision_model": "cpu", "": "cpu"}, "balanced"])
def test_device_map_on_one_device(hf_opt_dir, inputs, device_map):
    if CUDA:
        pytest.skip("checks the CPU-only meaning of these maps")
    _, d = hf_opt_dir
    model = Blip2ForConditionalGeneration.from_pretrained(d, device_map=device_map)
    assert model.device == torch.device("cpu")
    assert torch.equal(logits(model, inputs), logits(Blip2ForConditionalGeneration.from_pretrained(d), inputs))


def test_device_map_errors_name_the_problem(hf_opt_dir):
    _, d = hf_opt_dir
    if not CUDA:
        with pytest.raises(ValueError, match="device_map='cuda:0': this machine has no CUDA device"):
            Blip2ForConditionalGeneration.from_pretrained(d, device_map="cuda:0")
    with pytest.raises(ValueError, match="device_map\\['vision_model'\\]='disk': blip2 does not offload"):
        Blip2ForConditionalGeneration.from_pretrained(d, device_map={"vision_model": "disk", "": "cpu"})
    with pytest.raises(ValueError, match="device_map names no device for 'language_model."):
        Blip2ForConditionalGeneration.from_pretrained(d, device_map={"vision_model": "cpu", "qformer": "cpu"})


def test_plan_spreads_the_language_model_layers(hf_opt_dir, hf_t5_dir):
    gpus = [torch.device("cuda", i) for i in range(2)]  # labels only: planning moves nothing
    opt = Blip2ForConditionalGeneration.from_pretrained(hf_opt_dir[1])
    plan = plan_layers(opt, gpus)
    assert plan[""] == gpus[0]  # vision, Q-Former, projection
    layers = [plan[f"language_model.model.decoder.layers.{i}"] for i in range(2)]
    assert layers == gpus  # one layer each
    assert plan["language_model.model.decoder.embed_tokens"] == gpus[0]
    assert plan["language_model.lm_head"] == gpus[0]  # tied to the embeddings
    t5 = Blip2ForConditionalGeneration.from_pretrained(hf_t5_dir[1])
    plan = plan_layers(t5, gpus, "sequential", max_memory={0: 10**9, 1: 10**9})
    assert plan["language_model.decoder.block.0"] == gpus[0]  # owns the position bias: with the masks
    assert set(plan.values()) == {gpus[0]}  # sequential: everything fits the first
    with pytest.raises(ValueError, match="does not fit max_memory"):
        plan_layers(t5, gpus, "sequential", max_memory={0: 1000, 1: 1000})


def test_dispatched_model_gives_the_same_tokens(hf_opt_dir, hf_t5_dir, inputs, monkeypatch):
    """The hooks that move activations between devices, on this machine's devices (two GPUs where there are).
    On one device every move is a no-op, so the test also counts that the hooks ran."""
    import blip2.placement as placement

    moved = []
    real_move = placement._move
    monkeypatch.setattr(placement, "_move", lambda value, device: moved.append(device) or real_move(value, device))
    devices = ([torch.device("cuda", i) for i in range(2)] if CUDA and torch.cuda.device_count() > 1
               else [torch.device("cpu")] * 2)
    for d in (hf_opt_dir[1], hf_t5_dir[1]):
        moved.clear()
        plain = Blip2ForConditionalGeneration.from_pretrained(d)
        split = Blip2ForConditionalGeneration.from_pretrained(d)
        dispatch(split, plan_layers(split, devices))
        pixels = inputs[0]
        want = plain.generate(pixels, max_new_tokens=6, num_beams=2)
        assert torch.equal(split.generate(pixels.to(devices[0]), max_new_tokens=6, num_beams=2).cpu(), want)
        assert len(moved) > 0  # the dispatch hooks ran on the split model's forward passes


# -- quantization_config ------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="checks the error without CUDA")
@pytest.mark.parametrize("kwargs", [{"load_in_8bit": True}, {"quantization_config": {"load_in_4bit": True}},
                                    {"quantization_config": "bnb8"}])
def test_bitsandbytes_without_cuda_names_what_is_missing(hf_opt_dir, kwargs):
    if kwargs.get("quantization_config") == "bnb8":
        transformers = pytest.importorskip("transformers")
        kwargs = {"quantization_config": transformers.BitsAndBytesConfig(load_in_8bit=True)}
    with pytest.raises(QuantizationError, match=r"bitsandbytes quantization needs a CUDA device \(this machine has "
                                                r"no CUDA device.*blip2.fast.apply\(model, \"int8\"\)"):
        Blip2ForConditionalGeneration.from_pretrained(hf_opt_dir[1], **kwargs)


def test_missing_library_is_named(hf_opt_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(QuantizationError, match=r"needs the torchao package \(pip install torchao\)"):
        Blip2ForConditionalGeneration.from_pretrained(
            hf_opt_dir[1], quantization_config={"quant_method": "torchao", "quant_type": "int8_weight_only"})


def test_bad_quantization_configs_are_named():
    with pytest.raises(QuantizationError, match="set exactly one of load_in_8bit and load_in_4bit"):
        parse_quantization_config({"load_in_8bit": True, "load_in_4bit": True})
    with pytest.raises(QuantizationError, match="bnb_4bit_quant_type expected nf4 or fp4, got 'int3'"):
        parse_quantization_config({"load_in_4bit": True, "bnb_4bit_quant_type": "int3"})
    with pytest.raises(QuantizationError, match="quant_method 'gptq' is not supported"):
        parse_quantization_config({"quant_method": "gptq"})
    spec = parse_quantization_config({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                      "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_use_double_quant": True})
    assert (spec.bits, spec.quant_type, spec.compute_dtype, spec.double_quant) == (4, "nf4", torch.bfloat16, True)


def test_torchao_int8_weight_only_loads_on_cpu(hf_opt_dir, inputs):
    pytest.importorskip("torchao")
    transformers = pytest.importorskip("transformers")
    from torchao.quantization import Int8WeightOnlyConfig

    d = hf_opt_dir[1]
    base = logits(Blip2ForConditionalGeneration.from_pretrained(d), inputs)
    model = Blip2ForConditionalGeneration.from_pretrained(
        d, quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()))
    q = model.language_model.model.decoder.layers[0].fc1.weight
    assert "Int8" in type(q).__name__  # the weights are int8 now
    got = logits(model, inputs)
    assert 0 < (got - base).abs().max() < 0.05 * base.abs().max()


def test_a_torchao_config_object_applies_as_given(hf_opt_dir):
    """Its options reach torchao (here per-tensor scales instead of the default per-row ones), as in transformers:
    a user's group size or int4 packing format is not swapped for the defaults."""
    pytest.importorskip("torchao")
    transformers = pytest.importorskip("transformers")
    from torchao.quantization import Int8WeightOnlyConfig, PerTensor

    def fc1_scale(config):
        model = Blip2ForConditionalGeneration.from_pretrained(
            hf_opt_dir[1], quantization_config=transformers.TorchAoConfig(config))
        return model.language_model.model.decoder.layers[0].fc1.weight.scale

    rows = Blip2ForConditionalGeneration.from_pretrained(hf_opt_dir[1]).language_model.config.ffn_dim
    assert fc1_scale(Int8WeightOnlyConfig()).numel() == rows  # one scale per output row
    assert fc1_scale(Int8WeightOnlyConfig(granularity=PerTensor())).numel() == 1


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_layers_replace_the_language_models_linears(hf_opt_dir, inputs, bits):
    """The conversion itself, on this machine's device (bitsandbytes runs these layers on CPU too)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    d = hf_opt_dir[1]
    base = logits(Blip2ForConditionalGeneration.from_pretrained(d), inputs)
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    spec = parse_quantization_config({"load_in_8bit": bits == 8, "load_in_4bit": bits == 4,
                                      "bnb_4bit_quant_type": "nf4"})
    quantize_language_model(model, spec, torch.device("cuda" if CUDA else "cpu"))
    kind = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    layer = model.language_model.model.decoder.layers[1]
    assert isinstance(layer.self_attn.q_proj, kind) and isinstance(layer.fc2, kind)
    assert type(model.language_model.lm_head) is torch.nn.Linear  # the head stays, as transformers leaves it
    assert type(model.language_projection) is torch.nn.Linear
    got = logits(model.to("cuda") if CUDA else model, [t.to(model.device) for t in inputs]).cpu()
    assert 0 < (got - base).abs().max()
    if bits == 8:  # int8 weights and inputs: near the float model
        assert (got - base).abs().max() < 0.05 * base.abs().max()
        return
    # nf4 moves a tiny random model's logits by a third of their range (2.3 of 6.5): instead, exactly the logits
    # of the float model given the 4-bit weights, dequantized
    reference = Blip2ForConditionalGeneration.from_pretrained(d, fast="none")
    plain = dict(reference.named_modules())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, kind):
                plain[name].weight.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).cpu())
    want = logits(reference, inputs)
    assert (got - want).abs().max() < (1e-2 if CUDA else 1e-4) * want.abs().max()


@pytest.mark.skipif(not CUDA, reason="bitsandbytes loading runs on CUDA")
@pytest.mark.parametrize("kwargs", [{"load_in_8bit": True},
                                    {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}])
def test_bitsandbytes_loading_on_cuda(hf_opt_dir, inputs, kwargs):
    pytest.importorskip("bitsandbytes")
    d = hf_opt_dir[1]
    base = logits(Blip2ForConditionalGeneration.from_pretrained(d, dtype="float16", device="cuda"),
                  [t.cuda() for t in inputs])
    model = Blip2ForConditionalGeneration.from_pretrained(d, dtype="float16", device_map={"": 0}, **kwargs)
    got = logits(model, [t.cuda() for t in inputs])
    assert (got - base).abs().max() < 0.3 * base.abs().max()
    assert model.generate(inputs[0].cuda().half(), max_new_tokens=4).shape[0] == 2

"""BEFORE/AFTER equivalence record for a refactor: the exact outputs of the demo models, the benchmark
presets and a few training steps, under every speed-up path, written to one JSON file; ``--compare``
then says which entries of two such files differ.

Usage (one tree at a time; the tree's ``src`` goes first on ``sys.path``, ahead of any editable install)::

    PYTHONPATH=/path/to/tree/src python benchmarks/equivalence.py --out before.json
    python benchmarks/equivalence.py --src /path/to/tree/src --out after.json
    python benchmarks/equivalence.py --compare before.json after.json   # exit 1 if any entry differs

The source tree is taken from ``--src``, else ``$BLIP2_EQUIV_SRC``, else the first entry of
``$PYTHONPATH``; it is inserted at ``sys.path[0]`` and ``blip2.__file__`` is printed and recorded.

Works with the layout before the refactor (``model.fuse()`` etc., ``blip2.bench``, ``blip2.assets``) and
after it (``blip2.fast.apply(model, mode, batch=...)``, ``blip2.apps.bench``, ``blip2.demo``): every
speed-up goes through ``apply_path`` and every module through ``resolve``.

Tensors are recorded as sha256 of their bytes (with dtype, shape and the first values), token ids in
full. A path that raises is recorded as ``<prefix>/error`` (exception type and message) so both runs can
still be compared entry by entry. Entries under ``_meta/`` (versions, timings, which file was imported)
are printed by ``--compare`` but do not count as differences.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EXAMPLES = os.path.join(REPO, "examples", "images")
PATHS = ("plain", "fuse", "int8", "int8-dynamic", "native", "compile")
PRESET_PATHS = ("plain", "fuse", "native")
VQA_PROMPT = "Question: how many shapes are there? Answer:"
NEW_TOKENS = 20
PRESET_NEW_TOKENS = 12


# -- source tree and module names --------------------------------------------------------------------


def source_tree(arg: str | None) -> str | None:
    """The ``src`` directory to import blip2 from: --src, $BLIP2_EQUIV_SRC, or the first $PYTHONPATH entry."""
    if arg:
        return arg
    if os.environ.get("BLIP2_EQUIV_SRC"):
        return os.environ["BLIP2_EQUIV_SRC"]
    first = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    return first or None


def put_first(src: str | None) -> None:
    """``src`` at ``sys.path[0]`` (removed elsewhere), and no blip2 imported yet from anywhere else."""
    if src is None:
        return
    src = os.path.abspath(src)
    sys.path[:] = [src] + [p for p in sys.path if os.path.abspath(p or ".") != src]
    for name in [m for m in sys.modules if m == "blip2" or m.startswith("blip2.")]:
        del sys.modules[name]


def resolve(*candidates: str) -> Any:
    """The first importable of ``candidates``: "pkg.module" or "pkg.module:attr". A missing module moves on
    to the next candidate; an import error inside a module that exists is raised."""
    errors = []
    for cand in candidates:
        mod_name, _, attr = cand.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            # only "this module (or a parent) does not exist" means "try the next name"
            if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
                errors.append(f"{cand}: {e}")
                continue
            raise
        if not attr:
            return mod
        if hasattr(mod, attr):
            return getattr(mod, attr)
        errors.append(f"{cand}: no attribute {attr}")
    raise ImportError("none of " + ", ".join(candidates) + " could be imported: " + "; ".join(errors))


def api() -> dict[str, Any]:
    """The names this script uses, wherever the tree keeps them."""
    return {
        "Model": resolve("blip2:Blip2ForConditionalGeneration", "blip2.modeling:Blip2ForConditionalGeneration"),
        "Retrieval": resolve("blip2:Blip2ForImageTextRetrieval", "blip2.retrieval:Blip2ForImageTextRetrieval"),
        "Processor": resolve("blip2:Blip2Processor", "blip2.processing:Blip2Processor"),
        "Config": resolve("blip2:Blip2Config", "blip2.config:Blip2Config"),
        "DEFAULT_MODEL": resolve("blip2.assets:DEFAULT_MODEL", "blip2.demo:DEFAULT_MODEL", "blip2:DEFAULT_MODEL"),
        "DEFAULT_RETRIEVAL_MODEL": resolve("blip2.assets:DEFAULT_RETRIEVAL_MODEL", "blip2.demo:DEFAULT_RETRIEVAL_MODEL",
                                           "blip2:DEFAULT_RETRIEVAL_MODEL"),
        "bench": resolve("blip2.bench", "blip2.apps.bench"),
    }


# -- the one adapter for the speed-up paths ----------------------------------------------------------

_OLD_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fuse": ("fuse", {}),
    "int8": ("quantize_int8", {}),
    "int8-dynamic": ("quantize_int8", {"dynamic": True, "vision": True}),
    "native": ("native", {}),
    "compile": ("compile", {}),  # native=True, the default
}
_NEW_MODES = {"plain": "none", "fuse": "fuse", "int8": "int8", "int8-dynamic": "int8-dynamic", "native": "native",
              "compile": "compile"}


def has_old_api(model: Any) -> bool:
    """The layout before the refactor: speed-ups are methods of the model. (Not ``compile``: every
    ``nn.Module`` has torch's own ``compile``, so it tells nothing.)"""
    return hasattr(model, "quantize_int8") and hasattr(model, "native") and hasattr(model, "fuse")


def apply_path(model: Any, path: str, batch: int = 1) -> Any:
    """``model`` with speed-up ``path`` (one of ``PATHS``): the model's own methods where it has them (the
    layout before the refactor), else ``blip2.fast.apply(model, mode, batch=batch)``."""
    if path not in _NEW_MODES:
        raise ValueError(f"path {path!r}: expected one of {PATHS}")
    if has_old_api(model):
        if path == "plain":
            return model
        method, kwargs = _OLD_METHODS[path]
        if path == "compile":
            kwargs = {"batch": batch}  # native=True, the default
        out = getattr(model, method)(**kwargs)
    else:
        out = importlib.import_module("blip2.fast").apply(model, _NEW_MODES[path], batch=batch)
    return model if out is None else out


# -- recording ---------------------------------------------------------------------------------------


def tensor_record(t: Any, head: int = 8) -> dict[str, Any]:
    """sha256 of a tensor's bytes (contiguous, CPU), its dtype, shape and first ``head`` values."""
    import torch

    t = t.detach().cpu().contiguous()
    raw = t.view(torch.uint8) if t.dtype in (torch.bfloat16, torch.float16) else t
    data = raw.numpy().tobytes()
    flat = t.reshape(-1)[:head]
    return {"sha256": hashlib.sha256(data).hexdigest(), "dtype": str(t.dtype), "shape": list(t.shape),
            "head": [float(x) for x in flat.float()] if t.is_floating_point() else [int(x) for x in flat]}


def record_intermediates(rec: "Recorder", prefix: str, out: Any) -> None:
    """The forward's image features, Q-Former output and LM inputs, to tell where a difference starts."""
    # the names before the refactor, then transformers' (vision_outputs, qformer_outputs), which it adopted
    for name, names in (("image_embeds", ("image_embeds", "vision_outputs")),
                        ("qformer_output", ("qformer_output", "qformer_outputs")),
                        ("language_model_inputs", ("language_model_inputs",))):
        value = next((getattr(out, n) for n in names if n in getattr(out, "keys", lambda: ())() or
                      n in getattr(out, "__dataclass_fields__", {})), None)
        value = getattr(value, "last_hidden_state", value)
        if value is not None and hasattr(value, "detach"):
            rec[f"{prefix}/forward_{name}"] = tensor_record(value)


def ids_record(t: Any) -> list[list[int]]:
    return t.detach().cpu().tolist()


class Recorder:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.failures: list[str] = []

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def guard(self, prefix: str, fn: Callable[[], None]) -> bool:
        """Run ``fn``; an exception becomes ``<prefix>/error``. Times go to ``_meta/seconds/<prefix>``."""
        t = time.perf_counter()
        ok = True
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failing path is a result too
            ok = False
            # compared: the exception type; informational: its message (it names modules, which move)
            self.data[f"{prefix}/error"] = type(e).__name__
            self.data[f"_meta/errors/{prefix}"] = f"{type(e).__name__}: {e}"
            self.failures.append(prefix)
            print(f"[{prefix}] FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            traceback.print_exc(limit=4, file=sys.stderr)
        self.data[f"_meta/seconds/{prefix}"] = round(time.perf_counter() - t, 2)
        print(f"[{prefix}] {'ok' if ok else 'error'} ({time.perf_counter() - t:.1f} s)", flush=True)
        return ok


def example_images() -> tuple[list[Any], list[str], list[str]]:
    from PIL import Image

    with open(os.path.join(EXAMPLES, "captions.json")) as f:
        truth = json.load(f)
    names = list(truth)
    return ([Image.open(os.path.join(EXAMPLES, n)).convert("RGB") for n in names], list(truth.values()), names)


# -- 1. the demo model under every path --------------------------------------------------------------


def record_demo(rec: Recorder, A: dict[str, Any], paths: tuple[str, ...]) -> None:
    import torch

    model_dir = A["DEFAULT_MODEL"]
    processor = A["Processor"].from_pretrained(model_dir)
    images, captions, names = example_images()
    rec["demo/images"] = names
    caption_in = processor(images=images)
    one_in = processor(images=images[:1])
    vqa_in = processor(images=images, text=[VQA_PROMPT] * len(images), padding=True)
    forward_in = processor(images=images, text=captions, padding=True)
    rec["demo/inputs/pixel_values"] = tensor_record(caption_in["pixel_values"])
    rec["demo/inputs/vqa_input_ids"] = ids_record(vqa_in["input_ids"])
    rec["demo/inputs/forward_input_ids"] = ids_record(forward_in["input_ids"])
    logits: dict[str, Any] = {}

    for path in paths:
        prefix = f"demo/{path}"

        def run(path: str = path, prefix: str = prefix) -> None:
            model = A["Model"].from_pretrained(model_dir).eval()
            model = apply_path(model, path, batch=1)
            with torch.no_grad():
                gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)
                rec[f"{prefix}/caption_batch"] = ids_record(model.generate(caption_in["pixel_values"], **gen))
                rec[f"{prefix}/caption_one"] = ids_record(model.generate(one_in["pixel_values"], **gen))
                rec[f"{prefix}/vqa_batch"] = ids_record(model.generate(
                    vqa_in["pixel_values"], vqa_in["input_ids"], vqa_in["attention_mask"], **gen))
                if path in ("plain", "fuse"):
                    out = model(forward_in["pixel_values"], forward_in["input_ids"], forward_in["attention_mask"])
                    lg = out.logits.float()
                    logits[path] = lg
                    rec[f"{prefix}/forward_logits"] = tensor_record(lg)
                    record_intermediates(rec, prefix, out)

        rec.guard(prefix, run)
    if "plain" in logits and "fuse" in logits:  # informational: how far fuse is from plain within one tree
        rec["demo/fuse/forward_logits_max_abs_diff_vs_plain"] = float((logits["fuse"] - logits["plain"]).abs().max())


# -- 2. the retrieval model --------------------------------------------------------------------------


def record_retrieval(rec: Recorder, A: dict[str, Any]) -> None:
    import torch

    model_dir = A["DEFAULT_RETRIEVAL_MODEL"]
    model = A["Retrieval"].from_pretrained(model_dir).eval()
    processor = A["Processor"].from_pretrained(model_dir)
    images, captions, _ = example_images()
    images, texts = images[:2], captions[:2]
    with torch.no_grad():
        inputs = processor(images=images, text=texts, padding=True)
        itc = model.itc_scores(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])  # [2 img, 2 txt]
        # ITM scores pairs: all four (image i, text j), row-major
        pairs = processor(images=[images[0], images[0], images[1], images[1]], text=[texts[0], texts[1]] * 2,
                          padding=True)
        itm = model.itm_scores(pairs["pixel_values"], pairs["input_ids"], pairs["attention_mask"]).reshape(2, 2)
        itm_logits = model.itm_logits(pairs["pixel_values"], pairs["input_ids"], pairs["attention_mask"])
        fwd = model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    rec["retrieval/input_ids"] = ids_record(inputs["input_ids"])
    rec["retrieval/itc_scores"] = tensor_record(itc)
    rec["retrieval/itm_scores"] = tensor_record(itm)
    rec["retrieval/itm_logits"] = tensor_record(itm_logits)
    rec["retrieval/forward_itc_logits"] = tensor_record(fwd[0])


# -- 3. the benchmark presets ------------------------------------------------------------------------


def preset_checkpoint(bench: Any, preset: str) -> str:
    """benchmarks/common.py's ``checkpoint``: a random transformers BLIP-2 of the preset's size (seed 0),
    saved once in $BLIP2_BENCH_CACHE (default <tmp>/blip2-bench). Replicated rather than imported, since
    common.py puts its own tree's src first on sys.path."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration as HF

    cache = os.environ.get("BLIP2_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "blip2-bench"))
    d = os.path.join(cache, preset)
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        torch.manual_seed(0)
        HF(Blip2Config.from_dict(bench.PRESETS[preset])).save_pretrained(d)
    return d


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_presets(rec: Recorder, A: dict[str, Any], presets: list[str], dtypes: list[str]) -> None:
    import torch

    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    bench = A["bench"]
    rec["presets/available"] = sorted(bench.PRESETS)
    for preset in presets:
        if preset not in bench.PRESETS:
            rec[f"presets/{preset}/error"] = "not in PRESETS"
            rec.failures.append(f"presets/{preset}")
            continue
        rec[f"presets/{preset}/config_sha256"] = hashlib.sha256(
            json.dumps(bench.PRESETS[preset], sort_keys=True).encode()).hexdigest()
        holder: dict[str, Any] = {}

        def build(preset: str = preset) -> None:
            d = preset_checkpoint(bench, preset)
            holder["dir"] = d
            # the checkpoint is transformers' own: the same file must be used in both runs
            rec[f"_meta/presets/{preset}/checkpoint_sha256"] = file_sha256(os.path.join(d, "model.safetensors"))

        if not rec.guard(f"presets/{preset}/checkpoint", build):
            continue
        d = holder["dir"]
        for dtype in dtypes:
            for path in PRESET_PATHS:
                prefix = f"presets/{preset}/{dtype}/{path}"

                def run(path: str = path, prefix: str = prefix, dtype: str = dtype) -> None:
                    model = A["Model"].from_pretrained(d, dtype=torch_dtypes[dtype], device="cpu").eval()
                    pixels, ids, mask = bench.decode_inputs(model.config, 2, "cpu")
                    pixels = pixels.to(torch_dtypes[dtype])
                    if path == "plain" and dtype == dtypes[0]:
                        rec[f"presets/{preset}/inputs/pixel_values"] = tensor_record(pixels.float())
                        rec[f"presets/{preset}/inputs/input_ids"] = ids_record(ids)
                    model = apply_path(model, path, batch=2)
                    with torch.no_grad():
                        out = model.generate(pixels, ids, mask, max_new_tokens=PRESET_NEW_TOKENS,
                                             min_new_tokens=PRESET_NEW_TOKENS, do_sample=False, num_beams=1)
                        rec[f"{prefix}/tokens"] = ids_record(out)
                        if path in ("plain", "fuse"):
                            # one forward over the prompt and the generated tokens
                            if model.config.use_decoder_only_language_model:
                                fwd_ids, kw = torch.cat([ids, out[:, -PRESET_NEW_TOKENS:]], 1), {}
                            else:
                                fwd_ids, kw = ids, {"decoder_input_ids": out}
                            out = model(pixels, fwd_ids, torch.ones_like(fwd_ids), **kw)
                            rec[f"{prefix}/forward_logits"] = tensor_record(out.logits)
                            record_intermediates(rec, prefix, out)

                rec.guard(prefix, run)


# -- 4. training steps -------------------------------------------------------------------------------


def record_training(rec: Recorder, A: dict[str, Any], steps: int = 3) -> None:
    """(a) ``train_stage2`` on the demo model for ``steps`` optimizer steps over the six example images
    (batch 2, no augmentation, fp32): the logged losses and a hash of the trained weights; (b) a hand-written
    loop: ``model(pixel_values, input_ids, labels=...)``, backward and AdamW, ``steps`` times."""
    import torch

    model_dir = A["DEFAULT_MODEL"]
    _, captions, names = example_images()

    def stage2() -> None:
        train = resolve("blip2.train", "blip2.apps.train", "blip2.training")
        with tempfile.TemporaryDirectory() as tmp:
            manifest = os.path.join(tmp, "captions.jsonl")
            with open(manifest, "w") as f:
                for n, c in zip(names, captions):
                    f.write(json.dumps({"image": os.path.join(EXAMPLES, n), "caption": c}) + "\n")
            torch.manual_seed(0)
            model = A["Model"].from_pretrained(model_dir)
            processor = A["Processor"].from_pretrained(model_dir)
            config = train.TrainConfig(max_steps=steps, batch_size=2, lr=1e-4, min_lr=1e-5, warmup_lr=1e-5,
                                       warmup_steps=1, augment=False, log_every=1, seed=3)
            metrics = train.train_stage2(model, processor, manifest, config)
        rec["train/stage2/loss"] = [m["loss"] for m in metrics]
        timing = ("time", "sec", "samples_per", "throughput")
        rec["train/stage2/metrics"] = [{k: v for k, v in m.items() if not k.startswith(timing)}
                                       for m in metrics]
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        rec["train/stage2/state_dict_sha256"] = h.hexdigest()

    def manual() -> None:
        from PIL import Image

        torch.manual_seed(0)
        model = A["Model"].from_pretrained(model_dir)
        processor = A["Processor"].from_pretrained(model_dir)
        model.train()
        images = [Image.open(os.path.join(EXAMPLES, n)).convert("RGB") for n in names[:3]]
        inputs = processor(images=images, text=captions[:3], padding=True)
        labels = inputs["input_ids"].clone()
        labels[inputs["attention_mask"] == 0] = -100
        image_token = model.config.image_token_index
        if image_token is not None:
            labels[inputs["input_ids"] == image_token] = -100
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        losses, grad_norms = [], []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            out = model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], labels=labels)
            out.loss.backward()
            grad_norms.append(float(torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for p in model.parameters() if p.grad is not None]))))
            opt.step()
            losses.append(float(out.loss.detach()))
        rec["train/manual/loss"] = losses
        rec["train/manual/grad_norm"] = grad_norms

    rec.guard("train/stage2", stage2)
    rec.guard("train/manual", manual)


# -- comparison --------------------------------------------------------------------------------------


def compare(a_path: str, b_path: str) -> int:
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    keys = sorted(set(a) | set(b))
    differ = []
    for k in keys:
        if k.startswith("_meta/"):
            if a.get(k) != b.get(k) and not k.startswith("_meta/seconds/"):
                print(f"(info) {k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}")
            continue
        if k not in a or k not in b or a[k] != b[k]:
            differ.append(k)
            short = lambda v: (json.dumps(v)[:200] + ("..." if len(json.dumps(v)) > 200 else ""))  # noqa: E731
            print(f"DIFFERS {k}:\n  A: {short(a[k]) if k in a else '<missing>'}\n"
                  f"  B: {short(b[k]) if k in b else '<missing>'}")
    compared = [k for k in keys if not k.startswith("_meta/")]
    print(f"{len(compared) - len(differ)} of {len(compared)} entries equal; {len(differ)} differ")
    return 1 if differ else 0


# -- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"))
    p.add_argument("--src",
                   help="the tree's src directory (default: $BLIP2_EQUIV_SRC, else the first $PYTHONPATH entry)")
    p.add_argument("--out", help="where to write the JSON record")
    p.add_argument("--threads", type=int, default=1, help="torch threads (fixed, so both runs reduce alike)")
    p.add_argument("--paths", default=",".join(PATHS), help="demo-model paths to record")
    p.add_argument("--presets", default="opt-125m,flan-t5-small")
    p.add_argument("--dtypes", default="fp32,bf16", help="preset dtypes (fp32 and/or bf16)")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out: demo,retrieval,presets,train")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("--out is required (or --compare A B)")

    src = source_tree(args.src)
    put_first(src)
    import torch

    torch.set_num_threads(args.threads)
    import blip2

    print(f"blip2 imported from {blip2.__file__}", flush=True)
    if src and not os.path.abspath(blip2.__file__).startswith(os.path.abspath(src) + os.sep):
        print(f"WARNING: blip2 does not come from {src}", file=sys.stderr)
    skip = {s for s in args.skip.split(",") if s}
    rec = Recorder()
    t0 = time.perf_counter()
    rec["_meta/blip2_file"] = blip2.__file__
    rec["_meta/src"] = src
    rec["_meta/torch"] = torch.__version__
    rec["_meta/threads"] = torch.get_num_threads()
    try:
        import transformers

        rec["_meta/transformers"] = transformers.__version__
    except ImportError:
        rec["_meta/transformers"] = None
    A = api()
    rec["_meta/default_model"] = A["DEFAULT_MODEL"]
    rec["_meta/fast_api"] = "model methods" if has_old_api(A["Model"]) else "blip2.fast"
    try:
        kernels = resolve("blip2.kernels", "blip2.fast.kernels")
        rec["_meta/kernels_status_at_start"] = kernels.status()
    except Exception as e:  # noqa: BLE001
        rec["_meta/kernels_status_at_start"] = f"{type(e).__name__}: {e}"

    if "demo" not in skip:
        paths = tuple(x for x in args.paths.split(",") if x)
        rec.guard("demo", lambda: record_demo(rec, A, paths))
    if "retrieval" not in skip:
        rec.guard("retrieval", lambda: record_retrieval(rec, A))
    if "presets" not in skip:
        rec.guard("presets", lambda: record_presets(rec, A, [x for x in args.presets.split(",") if x],
                                                       [x for x in args.dtypes.split(",") if x]))
    if "train" not in skip:
        rec.guard("train", lambda: record_training(rec, A))
    try:
        rec["_meta/kernels_status_at_end"] = resolve("blip2.kernels", "blip2.fast.kernels").status()
    except Exception as e:  # noqa: BLE001
        rec["_meta/kernels_status_at_end"] = f"{type(e).__name__}: {e}"
    rec["_meta/failed"] = rec.failures
    rec["_meta/seconds/total"] = round(time.perf_counter() - t0, 1)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rec.data, f, indent=1, sort_keys=True)
    print(f"wrote {len(rec.data)} entries to {args.out} in {time.perf_counter() - t0:.1f} s; "
          f"failed: {rec.failures or 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoints in the Hugging Face format: read their weights, build models from them, write them.

A checkpoint is a directory with ``config.json`` and weights as ``model.safetensors``, sharded
safetensors (``model.safetensors.index.json``) or the legacy ``pytorch_model.bin`` (read with
``weights_only=True``). Models are built on the meta device and the loaded tensors are assigned,
never copied into random weights. The files are memory-mapped copy-on-write: a tensor whose dtype and
device are the model's is used in place, so loading reads nothing and the weights come from the page
cache when first used; any other is converted piece by piece, releasing the mapped pages as it goes.
Either way loading needs the memory of the loaded weights alone. Where a checkpoint directory is (local
or a Hub snapshot), and its file names, are ``blip2.hub``'s.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from blip2.config import Blip2Config
from blip2.converted import ConvertedCopy, PlanEntry
from blip2.hub import BIN_INDEX, BIN_SINGLE, CONFIG_FILE, SAFE_INDEX, SAFE_SINGLE, read_config, read_json, resolve_dir
from blip2.layout_files import Foreground
from blip2.loading import LoadOptions, check_flash_attention, config_dtype
from blip2.mapped import Origin, convert, prefetch_in_background, safetensors_views
from blip2.model_utils import ModelUtilitiesMixin
from blip2.placement import device_for_key, dispatch, placement_of, resolve_device_map
from blip2.quantized import QuantizationError, check_available, parse_quantization_config, quantize_language_model

__all__ = ["CheckpointError", "DTYPES", "DTYPE_NAMES", "atomic_write", "parse_dtype", "weight_files",
           "iter_checkpoint_tensors", "load_into", "save_state_dict", "PretrainedMixin"]

# Keys some writers add that carry no weights (buffers recomputed at build time).
# Old T5 files also carry a cross-attention relative bias on decoder block 0 that nothing reads.
_IGNORABLE = re.compile(r"((^|\.)(position_ids|inv_freq|num_batches_tracked)"
                        r"|decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: names the file, the key and what was expected."""


def _with_variant(name: str, variant: str | None) -> str:
    """transformers' variant names: model.safetensors -> model.fp16.safetensors,
    model.safetensors.index.json -> model.safetensors.index.fp16.json."""
    if not variant:
        return name
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def weight_files(directory: str, variant: str | None = None, use_safetensors: bool | None = None) -> list[str]:
    """The weight files of a checkpoint directory: safetensors preferred, only them with ``use_safetensors=True``,
    only PyTorch files with False; ``variant`` (``"fp16"``) reads ``model.fp16.safetensors`` and the like."""
    kinds = {True: [(SAFE_INDEX, SAFE_SINGLE)], False: [(BIN_INDEX, BIN_SINGLE)],
             None: [(SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)]}[use_safetensors]
    names = [_with_variant(n, variant) for pair in kinds for n in pair]
    for index_name in names[::2]:
        index = os.path.join(directory, index_name)
        if os.path.exists(index):
            weight_map = read_json(index, CheckpointError).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: not a valid shard index (no \"weight_map\" object)")
            files = [os.path.join(directory, name) for name in dict.fromkeys(weight_map.values())]
            for fpath in files:
                if not os.path.exists(fpath):
                    raise CheckpointError(f"{index}: names shard {os.path.basename(fpath)}, which is missing")
            return files
    for single in names[1::2]:
        fpath = os.path.join(directory, single)
        if os.path.exists(fpath):
            return [fpath]
    which = "" if use_safetensors is None else f" with use_safetensors={use_safetensors}"
    raise CheckpointError(f"{directory}: no weights found{which} (expected {', '.join(names[1::2])} or "
                          f"{', '.join(names[::2])})")


def iter_checkpoint_tensors(directory: str, files: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one at a time, in the stored dtype, so a caller can convert and drop as it goes.

    The tensors are views of the files mapped copy-on-write (``mapped.safetensors_views``,
    ``torch.load(mmap=True)``): nothing is read until a tensor is used, its bytes then come straight from
    the page cache, and writing into one (training, an in-place op) copies the page, never reaching the file.
    ``convert`` gives one in another dtype or on another device without holding both. ``files``: the weight
    files to read (default: ``weight_files(directory)``)."""
    for fpath in files or weight_files(directory):
        yield from _read_safetensors(fpath) if fpath.endswith(".safetensors") else _read_pytorch(fpath)


def _read_safetensors(fpath: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file, in file order, each a view of one private mapping of the file.

    safetensors checks the header before anything is mapped (its length, JSON, dtypes, shapes and offsets
    against the file's size), so a malformed or truncated file fails here, naming the file. The views are made
    by ``mapped.safetensors_views``, without reading: safetensors' own tensors touch their first page, and for
    a file not in the page cache each touch reads megabytes ahead (5.6 GB of blip2-opt-2.7b's 15.5 GB, 4-6 s of
    a load after the files left the cache), most of it weights that a cached layout replaces."""
    from safetensors import SafetensorError, safe_open

    key = None
    try:
        with safe_open(fpath, framework="pt") as f:
            try:
                view = safetensors_views(fpath)
            except (OSError, RuntimeError, ValueError):  # a mapping torch cannot make here: safetensors' tensors
                view = _none
            for key in getattr(f, "offset_keys", f.keys)():
                t = view(key)
                yield key, f.get_tensor(key) if t is None else t
    except (SafetensorError, OSError, RuntimeError, TypeError) as e:
        where = "" if key is None else f" (tensor {key!r})"
        if any(words in str(e) for words in _SIZE_ERRORS):
            where += ": truncated (its size is not the one its header gives)"
        raise CheckpointError(f"{fpath}: not a valid safetensors file{where}: {e}") from None


def _none(_key: str) -> None:
    return None


# safetensors' words for a file shorter than its header says (most often a download cut short)
_SIZE_ERRORS = ("file not fully covered", "invalid header length", "header too small")


def _read_pytorch(fpath: str) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        sd = torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{fpath}: cannot read PyTorch weights ({e})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{fpath}: expected a state dict, got {type(sd).__name__}")
    yield from sd.items()


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """``{alias: source}`` for parameters registered under several names (tied weights)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def _target_dtype(model: nn.Module, name: str, stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None or not stored.is_floating_point:
        return stored
    keeps = getattr(model, "keeps_fp32", None)
    if keeps is not None and keeps(name, dtype):
        return torch.float32
    return dtype


def load_into(model: nn.Module, directory: str, *, dtype: torch.dtype | None = None,
              device: torch.device | str | Callable[[str], torch.device] = "cpu", key_prefix: str = "",
              files: list[str] | None = None, plan: list[PlanEntry] | None = None,
              tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
              keep: Callable[[str], bool] | None = None) -> None:
    """Assign the checkpoint's tensors to ``model`` (built on the meta device), strictly.

    Missing, unexpected or mis-shaped keys are errors naming the key and both shapes. Tied
    aliases (one parameter under several names) may be absent from the file, as writers store
    them once; when the file has both and they differ, each name gets its own tensor.
    ``key_prefix`` selects a sub-model inside a bigger checkpoint (``vision_model.``, ...). ``device`` may be a
    function of the key (a ``device_map`` that splits the model); ``files`` as ``iter_checkpoint_tensors``.
    Keys starting with one of ``model._ignored_checkpoint_prefixes`` are skipped: parts of a bigger
    model the class leaves out (a text tower loaded from a full retrieval checkpoint).
    Each tensor is checked before it is converted (``convert``): in the stored dtype and on the CPU the
    model holds the file's mapped tensor itself. ``plan``, where given, gets an entry for each tensor taken
    (``blip2.converted.PlanEntry``: keys, dtypes, shape); ``tensors``, the ``(key, tensor)`` pairs to take
    instead of the files' (some from a converted copy). ``keep``: the keys taken as stored whatever ``dtype``
    says, their conversion left to the caller (the plan gives the dtype they are for).
    """
    expected = model.state_dict(keep_vars=True)
    tied = tied_parameters(model)
    ignored = tuple(getattr(model, "_ignored_checkpoint_prefixes", ()))
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []

    device_for = device if callable(device) else lambda _key: device
    # the converted tensors just before the next in its file (they are stored back to back): the pages that
    # reading the next maps around it are released with it (``convert``'s ``back``)
    run, end = 0, -1
    for key, tensor in tensors if tensors is not None else iter_checkpoint_tensors(directory, files):  # (mapped)
        if key_prefix:
            if not key.startswith(key_prefix):
                continue
            key = key[len(key_prefix):]
        if ignored and key.startswith(ignored):
            continue
        if key not in expected:
            if not _IGNORABLE.search(key):
                unexpected.append(key)
            continue
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{directory}: tensor {key!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"but the model expects {tuple(want.shape)}"
            )
        back = run if tensor.data_ptr() == end else 0
        target = _target_dtype(model, key, tensor.dtype, dtype)
        if plan is not None:
            plan.append((key_prefix + key, key, tensor.dtype, target, tuple(tensor.shape)))
        loaded[key] = convert(tensor, tensor.dtype if keep is not None and keep(key) else target, device_for(key), back)
        nbytes = tensor.numel() * tensor.element_size()
        run, end = (back + nbytes if loaded[key] is not tensor else 0), tensor.data_ptr() + nbytes
    if unexpected:
        shown = ", ".join(unexpected[:10]) + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else "")
        raise CheckpointError(f"{directory}: unexpected keys in the checkpoint, not used by "
                              f"{type(model).__name__}: {shown}")
    missing = [k for k in expected if k not in loaded and k not in tied]
    if missing:
        shown = ", ".join(f"{k} {tuple(expected[k].shape)}" for k in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise CheckpointError(f"{directory}: missing keys for {type(model).__name__}: {shown}{more}")
    # aliases absent from the file, or equal to their source, share the source's Parameter again
    # the same bytes need no comparison (a mapped file stores a tied pair once): reading both would page in the
    # largest table of the model twice
    retie = [a for a, src in tied.items() if a not in loaded or loaded[a].data_ptr() == loaded[src].data_ptr()
             or torch.equal(loaded[a], loaded[src])]
    for alias in retie:
        loaded[alias] = loaded[tied[alias]]
    model.load_state_dict(loaded, strict=True, assign=True)
    for alias in retie:
        owner, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(tied[alias]))
    _materialize_buffers(model, device_for)


def _materialize_buffers(model: nn.Module, device_for: Callable[[str], torch.device | str]) -> None:
    """Rebuild non-persistent buffers left on the meta device (they are not in the checkpoint)."""
    for name, module in model.named_modules():
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "init_buffers"):
                names = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
                raise RuntimeError(f"{type(module).__name__} has buffers {names} not in the checkpoint and no "
                                   f"init_buffers()")
            module.init_buffers(torch.device(device_for(name)))


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, flags=re.I)
    if not m:
        raise ValueError(f"max_shard_size: expected bytes or e.g. '5GB', got {size!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def save_state_dict(state_dict: dict[str, torch.Tensor], directory: str,
                    max_shard_size: int | str = "5GB", tied: dict[str, str] | None = None) -> list[str]:
    """Write safetensors (sharded with an index above ``max_shard_size``); returns the file names.

    Tied aliases are dropped: the format stores each tensor once and the loader re-ties them.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tied = tied or {}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k not in tied}
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    for old in (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX):
        if os.path.exists(os.path.join(directory, old)):
            os.remove(os.path.join(directory, old))
    for stale in os.listdir(directory):
        if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", stale):
            os.remove(os.path.join(directory, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SAFE_SINGLE), metadata={"format": "pt"})
        return [SAFE_SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, SAFE_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return names + [SAFE_INDEX]


# The one table of dtype names, used by every command's --dtype and by from_pretrained: torch's names
# and their short aliases. "auto" (not a dtype: each caller decides what it means) comes first in DTYPE_NAMES.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = ("auto", *DTYPES)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A name of ``DTYPES`` (or a torch dtype) -> the torch dtype; ``"auto"`` and None -> None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    return DTYPES[dtype]


@contextmanager
def atomic_write(path: str) -> Iterator[str]:
    """``with atomic_write(path) as tmp:`` write ``tmp``; on leaving, it replaces ``path`` in one rename, so a
    reader, or a run killed while writing, sees the old file or the new one, never half of one. The folder is
    created if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    yield tmp
    os.replace(tmp, path)


M = TypeVar("M", bound="PretrainedMixin")
# of a model (on the meta device) and the dtype a load asks for: the keys to take as stored, or None
Defer = Callable[[nn.Module, "torch.dtype | None"], "Callable[[str], bool] | None"]


class PretrainedMixin(ModelUtilitiesMixin):
    """``from_pretrained`` / ``save_pretrained`` (and transformers' other model utilities, ``ModelUtilitiesMixin``)
    for our ``nn.Module`` classes.

    Subclasses set ``config_class`` and may set ``_keep_in_fp32_modules`` (module paths kept in
    fp32 when a lower precision is asked for) or override ``keeps_fp32``.
    """

    config_class: Any = None
    _keep_in_fp32_modules: tuple[str, ...] = ()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict``, with each tied alias (the OPT head: one table under two names) a copy, so that
        writers which refuse tensors sharing memory take it (safetensors' ``save_file``, which transformers'
        ``Trainer.save_model`` calls for a model not of its own classes); loading re-ties equal copies."""
        sd = super().state_dict(*args, **kwargs)  # type: ignore[misc]
        if kwargs.get("keep_vars") or (len(args) > 2 and args[2]):
            return sd
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for alias in tied_parameters(self):  # type: ignore[arg-type]
            if prefix + alias in sd:
                sd[prefix + alias] = sd[prefix + alias].clone()
        return sd

    def keeps_fp32(self, key: str, dtype: torch.dtype) -> bool:
        """Whether parameter ``key`` stays fp32 when the model is loaded in ``dtype``."""
        return any(key == p or key.startswith(p + ".") for p in self._keep_in_fp32_modules)

    @classmethod
    def _config_from_dict(cls, d: dict[str, Any], source: str) -> Any:
        return cls.config_class.from_dict(d, source=source)

    @classmethod
    @Foreground()  # the cache's file writers pause until it returns (blip2.layout_files)
    def from_pretrained(cls: type[M], path_or_id: str | os.PathLike, **kwargs: Any) -> M:
        """The model of a checkpoint directory or Hub id, with transformers' arguments (docs/TRANSFORMERS.md):
        ``dtype`` / ``torch_dtype`` (a dtype, its name, or "auto": the one config.json names), ``device_map``
        (``blip2.placement``), ``quantization_config`` (``blip2.quantized``), ``attn_implementation``,
        ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``subfolder``,
        ``variant``, ``use_safetensors``, ``max_memory``; and ``device``, blip2's one device for everything.
        An argument that cannot apply is an error naming it."""
        return cls._load(path_or_id, kwargs)

    @classmethod
    def _load(cls: type[M], path_or_id: str | os.PathLike, kwargs: dict[str, Any], defer: Defer | None = None) -> M:
        """``from_pretrained``; ``defer``: of the model (on the meta device) and the dtype asked for, the keys
        whose conversion the caller does after a load onto the CPU (``model._deferred``: key -> dtype)."""
        opts = LoadOptions.parse(kwargs)
        directory = resolve_dir(path_or_id, **opts.hub)
        if opts.subfolder:
            directory = os.path.join(directory, opts.subfolder)
            if not os.path.isdir(directory):
                raise FileNotFoundError(f"{path_or_id}: has no subfolder {opts.subfolder!r}")
        raw = read_config(directory, CheckpointError)
        config, prefix = cls._select_config(raw, os.path.join(directory, CONFIG_FILE))
        want = parse_dtype(config_dtype(raw) if opts.dtype == "auto" else opts.dtype)
        files = weight_files(directory, opts.variant, opts.use_safetensors)  # fail before building anything
        quant = None if opts.quantization_config is None else parse_quantization_config(opts.quantization_config)
        if quant is not None and not torch.cuda.is_available():
            check_available(quant, torch.device("cpu"))  # what quantizing lacks says more than device_map would
        where = resolve_device_map(opts.device_map, opts.device)
        first = where if isinstance(where, torch.device) else torch.device("cuda:0")
        check_flash_attention(opts.attn_implementation, first, want)
        if quant is not None:
            check_available(quant, first)
            if not isinstance(where, torch.device):
                raise QuantizationError("quantization_config: a quantized model loads onto one device "
                                        "(device_map={'': 0}), not split over several")
        with torch.device("meta"):
            model = cls(config)
        placement = placement_of(model, where, want, opts.max_memory)
        load_device: Any = "cpu" if quant is not None else where
        if placement is not None:
            load_device = lambda key: device_for_key(placement, key)  # noqa: E731
        # a load in another dtype on the CPU maps the weights converted by an earlier one (blip2.converted)
        cpu = isinstance(where, torch.device) and where.type == "cpu"
        copy = ConvertedCopy.of(cls, files, prefix, want) if quant is None and cpu else None
        defer = defer if quant is None and placement is None and cpu else None
        model, files = _load_weights(cls, config, model, directory, files, want, load_device, prefix, copy, defer)
        if quant is None and placement is None:
            # which tensors are still the files' (blip2.fast.layout_cache: a layout made from them is the files')
            model._origin = Origin.of(files, model)
            # the first weights a first call reads, read ahead while the caller prepares its inputs
            prefetch_in_background(t for part in ("vision_model", "qformer") if hasattr(model, part)
                                   for t in nn.Module.state_dict(getattr(model, part), keep_vars=True).values())
        if quant is not None:
            quantize_language_model(model, quant, first)
            model.to(first)
        if placement is not None:
            dispatch(model, placement)
        model.eval()
        if hasattr(model, "_after_load"):
            model._after_load(directory)
        return model

    @classmethod
    def _select_config(cls, raw: dict[str, Any], source: str) -> tuple[Any, str]:
        return cls._config_from_dict(raw, source), ""

    def _config_to_save(self) -> dict[str, Any]:
        d = self.config.to_dict()  # type: ignore[attr-defined]
        d["architectures"] = [type(self).__name__]
        dtypes = {p.dtype for p in self.parameters() if p.is_floating_point()}  # type: ignore[attr-defined]
        d["dtype"] = str(next(iter(dtypes - {torch.float32}), torch.float32)).removeprefix("torch.")
        return d

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(self._config_to_save(), f, indent=2, sort_keys=True)
            f.write("\n")
        # nn.Module's own state dict: the aliases it shares are left out by ``tied``, so no copy of them is made
        save_state_dict(nn.Module.state_dict(self), directory, max_shard_size=max_shard_size,  # type: ignore[arg-type]
                        tied=tied_parameters(self))  # type: ignore[arg-type]
        if hasattr(self, "_save_extra"):
            self._save_extra(directory)


def _load_weights(cls: type, config: Any, model: nn.Module, directory: str, files: list[str], dtype: torch.dtype | None,
                  device: Any, prefix: str, copy: ConvertedCopy | None,
                  defer: Defer | None) -> tuple[nn.Module, list[str]]:
    """``model`` with the checkpoint's weights, and the files they came from: the converted copy's
    (``blip2.converted``) where it holds them, else the checkpoint's (the copy written where the load converted)."""
    sources = functools.partial(iter_checkpoint_tensors, directory, files)
    if copy is not None and copy.path.exists():
        def read(tensors: Iterable[tuple[str, torch.Tensor]], plan: list[PlanEntry]) -> None:
            load_into(model, directory, dtype=dtype, key_prefix=prefix, tensors=tensors, plan=plan)

        if copy.load(read, sources):
            return model, [*files, str(copy.path)]
        with torch.device("meta"):
            model = cls(config)  # anew: the refused copy's tensors are not half of it
    plan: list[PlanEntry] = []
    keep = defer(model, dtype) if defer is not None else None
    load_into(model, directory, dtype=dtype, device=device, key_prefix=prefix, files=files, plan=plan, keep=keep)
    if keep is not None:
        model.__dict__["_deferred"] = {key: target for _, key, stored, target, _ in plan
                                       if stored != target and keep(key)}
    if copy is not None:
        copy.write(plan, sources)
    return model, files


class SubmodelMixin(PretrainedMixin):
    """``from_pretrained`` for a part of BLIP-2 (the vision tower, the Q-Former).

    Reads a directory of that part alone, or a whole BLIP-2 checkpoint, taking the sub-config
    ``_blip2_config_key`` and the weights under ``_blip2_prefix``.
    """

    _blip2_config_key: str = ""
    _blip2_prefix: str = ""

    @classmethod
    def _select_config(cls, raw: dict[str, Any], source: str) -> tuple[Any, str]:
        if raw.get("model_type") in ("blip-2", "blip_2"):
            return getattr(Blip2Config.from_dict(raw, source), cls._blip2_config_key), cls._blip2_prefix
        return cls._config_from_dict(raw, source), ""

"""Native CPU kernels of blip2, built from C++ source on the machine that runs them.

- ``row_product(x, w, scale, bias)`` (``row_product.cpp``): one row of activations times a weight matrix,
  the product of every layer when decoding one token at a time. Such a step reads every weight once per
  token, so it is bound by how fast one core streams memory; the source says how it keeps that stream
  fast (fp32, bf16 and weight-only int8 weights; 2-3x ``F.linear`` with one row).
- ``blocked_linear(x, w, bias, n)`` (``blocked.cpp``): any number of rows times a weight in blip2's blocked
  layout (``block_weight``), the products of a language model fused for decoding several rows at once
  (``blip2.fast.linear``'s "blocked" format): 1.4-1.6x oneDNN's speed at 8 rows, where a step is bound by the
  weight stream and the multiply-adds together, and as fast as oneDNN for a prefill's hundreds of rows.
- ``greedy_head(x, screen, norms, w, bias, banned)`` (``screen.cpp``): greedy decoding's next token,
  exactly the argmax of the fp32 head's logits, from a bfloat16 screen of the vocabulary
  (``screen_weight``) with a proven error bound and the few candidates it leaves computed by the head's
  own code: half the head's bytes and multiply-adds.
- ``blip2_kernels::t5_step`` and ``opt_step`` (``steps.cpp``, which includes the other sources; its pieces
  in ``decode.cpp``): a whole decoding step, the decoder's norms, attention over the cache and products in
  one call, for one row or (on blocked weights) several (``blip2.fast.native`` hands the weights over); or,
  for ``greedy_head``, the step up to the head's input. The steps take their weights and scalars by name
  (``slots.cpp``; ``blip2_kernels::step_schema(op)`` gives the names).

The source is compiled once per machine with the system C++ compiler (``$CXX``, else ``c++``/``g++``)
against the installed torch, with ``-march=native``, about 15 s, and cached in
``$BLIP2_CACHE_DIR/kernels`` (default ``$XDG_CACHE_HOME/blip2`` or ``~/.cache/blip2``) under a name that hashes
the sources, the torch build, the compiler and the CPU's flags. Loading a library runs its code, so the cache
is private: its folder is created 0700 and not used if another user owns it or others can write in it; a
library is written under a temporary name and renamed, with its SHA-256 beside it (``.sha256``), and loaded
only if it is a file of this user's that others cannot write and its content has that hash; otherwise it is
built again (into a private temporary folder, for this process only, where the cache cannot be used).
It needs Linux on x86-64 with AVX-512 F and BW, or AVX2 and FMA (``cpu_supported``): the kernels compute in
16-lane vectors (``simd.h``), one AVX-512 register or two AVX2 halves, with the same sums on both. bfloat16
blocked weights and the greedy head's screen need AVX-512 BF16 besides. ``load()`` builds and loads it and says
whether it is there; ``status()`` says why not. Where it is not (no compiler, another CPU, ``BLIP2_KERNELS=0``),
the callers keep their portable path (a compiled step whose products are a compiled reduction: the same sums,
in another order).

Callers: ``blip2.fast.linear.decode_format`` (the language models' default layout in ``blip2.fast.fuse``) and
``blip2.fast.decoding.compile_step`` load the kernels (building them if need be); "blocked" ``FusedLinear``
layers call ``blocked_linear``, ``linear._row_product`` calls ``row_product`` for every one-row product of a
compiled step, and ``blip2.fast.native`` / ``compile_decoding`` put ``blip2.fast.native``'s step in front
where it covers the model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from blip2._compat import register_fake
from blip2.cache import cache_dir, private_dir

__all__ = ["load", "ready", "status", "build_key", "row_product", "row_product_supports", "blocked_linear",
           "blocked_supports", "block_weight", "blocked_shape", "unblock_weight", "screen_supports", "screen_weight",
           "screen_blocks", "greedy_head", "many_query_attention", "cache_dir", "cpu_flags",
           "cpu_supported"]

log = logging.getLogger("blip2.fast.kernels")

# the translation unit compiled (it includes the others), and every file the build reads: all the sources
# here, so that a change to any of them (or a new one) changes the cached library's name
_SOURCE = Path(__file__).with_name("steps.cpp")
_SOURCES = tuple(sorted(p for ext in ("*.cpp", "*.h") for p in Path(__file__).parent.glob(ext)))
_OP = "blip2_kernels::row_product"
_BLOCKED_OP = "blip2_kernels::blocked_linear"
_ATTENTION_OP = "blip2_kernels::many_query_attention"
_BLOCK = 16  # output columns per block of the blocked layout (blocked.cpp's kBlock)
# either set builds (simd.h): AVX-512 F and BW, or AVX2 with FMA (two 8-lane halves per 16-lane vector)
_NEEDED_FLAGS = (("avx512f", "avx512bw"), ("avx2", "fma"))
_BUILD_TIMEOUT_S = 600
_FLOATS = (torch.float32, torch.bfloat16)

_loaded = False  # the op is registered in this process
_library_name: str | None = None  # the loaded library's file name, which hashes everything its build read
_bf16_dot = False  # the loaded build multiplies bf16 with AVX-512 BF16 (the CPU has it; -march=native)
_status = "not built yet: call blip2.fast.kernels.load()"
_tried = False
_lock = threading.Lock()  # one build at a time in a process (a server compiling from several threads)


def ready() -> bool:
    """Whether the kernels are loaded in this process (never builds; cheap enough for a forward pass)."""
    return _loaded


def status() -> str:
    """Where the kernels stand: "loaded from <path>", or why they are not."""
    return _status


def build_key() -> str | None:
    """What the loaded kernels were built from (the sources, torch, the compiler and the CPU's flags), as the
    cached library's name says it; None where they are not loaded."""
    return _library_name if _loaded else None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supported(flags: set[str] | None = None) -> bool:
    """Whether a CPU with these feature flags (default: this one's) runs the kernels: AVX-512 F and BW, or
    AVX2 and FMA."""
    flags = cpu_flags() if flags is None else flags
    return any(set(needed) <= flags for needed in _NEEDED_FLAGS)


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _command(compiler: str, source: Path, output: Path) -> list[str]:
    root = Path(torch.__file__).parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [compiler, "-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            str(source), "-o", str(output),
            f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{root / 'lib'}"]


def _library_path(compiler: str, flags: set[str]) -> Path:
    """The cached library's path: a name that changes with anything the build depends on."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256()
    sources = (p.name.encode() + b"\0" + p.read_bytes() for p in _SOURCES)
    command = " ".join(_command("cc", Path("s"), Path("o")))
    for part in (*sources, torch.__version__.encode(), str(torch.version.git_version).encode(), compiler.encode(),
                 version.encode(), " ".join(sorted(flags)).encode(), command.encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / "kernels" / f"blip2_kernels-{key.hexdigest()[:20]}.so"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hash_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _trusted(library: Path) -> bool:
    """Whether ``library`` is one this user built: a regular file (not a link) of theirs that others cannot
    write, whose content has the hash written beside it at the build."""
    try:
        st = library.lstat()
        recorded = _hash_file(library).read_text().strip()
    except OSError:
        return False
    mine = stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    return mine and _digest(library) == recorded


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(compiler: str, target: Path) -> None:
    """Compiles the source into ``target`` and writes its hash beside it. Both are written under a temporary
    name and renamed, so a concurrent build or an interrupted one never leaves a broken library under the
    cached name (a library whose hash is missing or another is built again)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        log.info("building the blip2 kernels (once per machine, about 10 s): %s", target)
        done = subprocess.run(_command(compiler, _SOURCE, Path(tmp)), capture_output=True, text=True,
                              timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"{Path(compiler).name} exited with {done.returncode}:\n{tail}")
        os.chmod(tmp, 0o700)  # the linker's mode follows the umask, which may let the group write
        _write_atomically(_hash_file(target), _digest(Path(tmp)).encode() + b"\n")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library(compiler: str, flags: set[str]) -> tuple[Path, bool]:
    """A library built from the sources for this machine, and whether it is this process's own: the cached one
    if it can be trusted, else built into the cache; where the cache cannot be used (not private, not
    writable), built into a private temporary folder for this process (its own: removed once loaded)."""
    path = _library_path(compiler, flags)
    try:
        private_dir(path.parent)
        if not _trusted(path):
            _build(compiler, path)
        return path, False
    except OSError as e:
        log.warning("blip2 kernels: not using the cache (%s); building them for this process only", e)
        path = Path(tempfile.mkdtemp(prefix="blip2-kernels-")) / path.name
        try:
            _build(compiler, path)
        except BaseException:
            shutil.rmtree(path.parent, ignore_errors=True)
            raise
        return path, True


def _unavailable(reason: str, warn: bool = False) -> bool:
    global _status
    _status = reason
    (log.warning if warn else log.debug)("blip2 kernels not used: %s", reason)
    return False


def load() -> bool:
    """Builds the kernels if this machine has none cached, loads them, and returns whether they are
    there. Tried once per process; later calls return the first answer at once."""
    with _lock:
        return _load()


def _load() -> bool:
    global _loaded, _status, _tried, _bf16_dot, _library_name
    if _tried:
        return _loaded
    _tried = True
    if os.environ.get("BLIP2_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return _unavailable("disabled by BLIP2_KERNELS")
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return _unavailable(f"needs Linux on x86-64, this is {sys.platform} on {platform.machine()}")
    flags = cpu_flags()
    if not cpu_supported(flags):
        wanted = " or ".join(", ".join(needed) for needed in _NEEDED_FLAGS)
        return _unavailable(f"the CPU lacks {wanted}")
    compiler = _compiler()
    if compiler is None:
        return _unavailable("no C++ compiler (set $CXX, or install g++)")
    try:
        path, own = _library(compiler, flags)
        try:
            torch.ops.load_library(str(path))
        finally:
            if own:  # a loaded library's mapping outlives its file; left, one folder a process piled up in /tmp
                shutil.rmtree(path.parent, ignore_errors=True)
        _register_fake()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return _unavailable(f"the build or load failed: {e}", warn=True)
    _loaded = True
    _library_name = path.name
    _bf16_dot = "avx512_bf16" in flags
    _status = f"loaded from {path}"
    return True


def _register_fake() -> None:
    # the output's shape and dtype, for tracing in torch.compile
    @register_fake(_OP)
    def _(x: Tensor, w: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @register_fake(_BLOCKED_OP)
    def _(x: Tensor, w: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @register_fake(_ATTENTION_OP)
    def _(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        B, H, L, D = q.shape
        return q.new_empty(B, L, H * D)


def row_product_supports(x: Tensor, w: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> bool:
    """Whether ``row_product(x, w, scale, bias)`` takes these: the kernels loaded, all on the CPU, x one row
    (``x.numel() == K``), w a contiguous [N, K] of float32 (x float32), bfloat16 (x bfloat16) or int8 with
    a scale (x either), scale and bias contiguous [N] of float32 or bfloat16."""
    if not _loaded or x.device.type != "cpu" or w.device.type != "cpu" or w.dim() != 2:
        return False
    if x.numel() != w.shape[1] or not w.is_contiguous():
        return False
    for t in (scale, bias):
        if t is not None and (t.device.type != "cpu" or t.dtype not in _FLOATS or t.numel() != w.shape[0]
                              or not t.is_contiguous()):
            return False
    if w.dtype == torch.int8:
        return scale is not None and x.dtype in _FLOATS
    return w.dtype == x.dtype and x.dtype in _FLOATS


def row_product(x: Tensor, w: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """x [..., K] holding one row, w [N, K] (int8 with ``scale`` [N]) -> [..., N] in x's dtype:
    ``(x @ w.T) * scale + bias`` accumulated in fp32 and rounded once. Check ``row_product_supports``
    first."""
    return torch.ops.blip2_kernels.row_product(x, w, scale, bias)


def blocked_supports(dtype: torch.dtype) -> bool:
    """Whether ``blocked_linear`` takes weights of ``dtype`` here: the kernels loaded, float32, or bfloat16
    on a CPU with AVX-512 BF16 (the build targets this CPU)."""
    if not _loaded:
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _bf16_dot)


def blocked_shape(n: int, k: int, dtype: torch.dtype) -> tuple[int, ...]:
    """The shape ``block_weight`` gives an [n, k] weight of ``dtype``."""
    nb = -(-n // _BLOCK)
    return (nb, k, _BLOCK) if dtype == torch.float32 else (nb, -(-k // 2), _BLOCK, 2)


def block_weight(w: Tensor, out: Tensor | None = None) -> Tensor:
    """A weight [N, K] in the blocked layout of ``blocked_linear``, zero-padded to whole blocks: float32
    [ceil(N / 16), K, 16] (block b, k, column j holds ``w[16 b + j, k]``), bfloat16
    [ceil(N / 16), ceil(K / 2), 16, 2] (pairs of neighbouring k). ``out``: where to write it (of
    ``blocked_shape``), say the rows of a larger blocked weight."""
    if w.dim() != 2 or w.dtype not in _FLOATS:
        raise ValueError(f"block_weight: expected a float32/bfloat16 [N, K] weight, got {w.dtype} {tuple(w.shape)}")
    # copied straight into the result: a padded copy, then a permuted one, held three copies of the layer at
    # once, which a model laid out layer by layer paid at its peak (tests/test_load_memory.py)
    n, k = w.shape
    whole, left = n // _BLOCK, n % _BLOCK
    if out is None:
        out = w.new_empty(blocked_shape(n, k, w.dtype))
    elif tuple(out.shape) != blocked_shape(n, k, w.dtype) or out.dtype != w.dtype:
        raise ValueError(f"block_weight: out {out.dtype} {tuple(out.shape)}, expected {w.dtype} "
                         f"{blocked_shape(n, k, w.dtype)}")
    if _loaded and w.is_contiguous() and out.is_contiguous():
        torch.ops.blip2_kernels.block_weight_into(w, out)  # at the memory's pace; the copies below at a third
        return out
    if w.dtype == torch.float32:
        out[:whole].copy_(w[:whole * _BLOCK].view(whole, _BLOCK, k).transpose(1, 2))
        if left:
            out[whole].zero_()
            out[whole, :, :left].copy_(w[whole * _BLOCK:].t())
        return out
    pairs = k // 2
    if left or k % 2:
        out.zero_()  # the padding
    # views [blocks, rows, pairs, 2] of the whole blocks and of the last one's rows, in w and in out
    parts = [(w[:whole * _BLOCK].view(whole, _BLOCK, k), out[:whole].permute(0, 2, 1, 3))]
    if left:
        parts.append((w[whole * _BLOCK:][None], out[whole:].permute(0, 2, 1, 3)[:, :left]))
    for src, dest in parts:
        dest[..., :pairs, :].copy_(src[..., :2 * pairs].unflatten(-1, (pairs, 2)))
        if k % 2:
            dest[..., pairs, 0].copy_(src[..., k - 1])
    return out


def unblock_weight(b: Tensor, n: int, k: int) -> Tensor:
    """``block_weight``'s inverse: the plain [n, k] weight (a new tensor)."""
    if b.dim() == 3:
        return b.transpose(1, 2).reshape(-1, b.shape[1])[:n, :k].contiguous()
    return b.permute(0, 2, 1, 3).reshape(b.shape[0] * _BLOCK, -1)[:n, :k].contiguous()


def blocked_linear(x: Tensor, w: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """x [..., K] times a blocked weight (``block_weight``) of ``out_features`` outputs, plus ``bias``
    [out_features] -> [..., out_features] in x's dtype, which must be the weight's. Accumulated in fp32 in
    the plain order of k and rounded once. Check ``blocked_supports`` first."""
    return torch.ops.blip2_kernels.blocked_linear(x, w, bias, out_features)


def many_query_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v for q, k, v [B, H, L, D] bfloat16 (views of a fused qkv will do), no mask ->
    [B, L, H * D], the heads side by side: a vision encoder's self-attention through the blocked products
    (attention.cpp), the scores in fp32. Needs what bf16 ``blocked_linear`` needs (``blocked_supports``)."""
    return torch.ops.blip2_kernels.many_query_attention(q, k, v, scale)


def screen_supports(w: Tensor) -> bool:
    """Whether ``greedy_head`` can screen a head weight ``w``: the kernels loaded on a CPU with AVX-512 BF16,
    and ``w`` a float32 CPU weight, plain [N, K] or blocked."""
    return (_loaded and _bf16_dot and w.device.type == "cpu" and w.dtype == torch.float32
            and (w.dim() == 2 or (w.dim() == 3 and w.shape[2] == _BLOCK)))


# the blocks a screen is made of at a time: its temporaries (the rows in fp32 and float64, 256 rows) stay a few MB
# (4096 rows at a time took 0.2x the weights of a 16-layer model of width 768 at the peak beside its layout)
_SCREEN_BLOCKS = 16


@torch.no_grad()
def screen_weight(w: Tensor, n: int | None = None) -> tuple[Tensor, Tensor]:
    """The screen of a float32 head weight for ``greedy_head``: (its bfloat16 copy in the blocked layout,
    norms [2, N] float32: each row's length and the length of its bf16 rounding error, computed in float64 and
    rounded up). ``w``: plain [N, K], or blocked (``block_weight``) holding ``n`` rows. Made 256 rows at a
    time, with no whole copy of the head beside it (blip2-opt-2.7b's fp32 head is 515 MB)."""
    if w.dtype != torch.float32 or w.dim() not in (2, 3) or (w.dim() == 3 and n is None):
        raise ValueError(f"screen_weight: expected a float32 [N, K] or blocked weight (with n), got {w.dtype} "
                         f"{tuple(w.shape)}")
    n, k = (w.shape[0], w.shape[1]) if w.dim() == 2 else (n, w.shape[1])
    screen = torch.empty(blocked_shape(n, k, torch.bfloat16), dtype=torch.bfloat16)
    norms = torch.empty(2, n)
    for lo in range(0, screen.shape[0], _SCREEN_BLOCKS):
        hi = min(lo + _SCREEN_BLOCKS, screen.shape[0])
        screen_blocks(w, n, lo, hi, screen[lo:hi], norms[:, lo * _BLOCK:hi * _BLOCK])
    return screen, norms


def screen_blocks(w: Tensor, n: int, lo: int, hi: int, screen: Tensor, norms: Tensor) -> None:
    """Blocks [lo, hi) of the screen of head ``w`` (plain, or blocked with ``n`` rows), written into ``screen``
    (those blocks) and ``norms`` ([2, their rows]): to make a screen, or to check a stored one."""
    r0, r1 = lo * _BLOCK, min(hi * _BLOCK, n)
    rows = unblock_weight(w[lo:hi], r1 - r0, w.shape[1]) if w.dim() == 3 else w[r0:r1]
    wb = rows.bfloat16()
    block_weight(wb, out=screen)
    exact = rows.double()
    both = torch.stack([exact.norm(dim=1), (exact - wb.double()).norm(dim=1)])
    up = both.float()
    norms.copy_(torch.where(up.double() < both, torch.nextafter(up, torch.tensor(float("inf"))), up))


def greedy_head(x: Tensor, screen: Tensor, norms: Tensor, w: Tensor, bias: Tensor | None,
                banned: Tensor) -> tuple[Tensor, Tensor]:
    """The argmax over the vocabulary of ``x @ w.T + bias`` (x [R, K] float32; w the float32 head, blocked
    or [N, K]) with the ids ``banned`` (int64) left out, as the full head's logits give it (ties to the
    lowest id), computed from the screen ``screen_weight`` made of the same head. Returns (tokens [R],
    how many logits each row computed exactly: N where it computed them all). Check ``screen_supports``."""
    return torch.ops.blip2_kernels.greedy_head(x, screen, norms, w, bias, banned)

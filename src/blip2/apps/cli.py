"""The ``blip2`` command. Each subcommand is a plain typed function; ``build_parser`` is the one place
that maps command-line options onto their parameters (option ``--batch-size`` -> ``batch_size``).

Exit codes: 0 success; 1 some images could not be read (each reported, the rest done);
2 a usage or setup error (bad option, missing model, output conflict); 3 an internal failure (a bug or a
fault of the machine, with its traceback; results written so far are kept); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from blip2._version import __version__
from blip2.apps.captioning import Ranks, caption_job, expand_inputs, read_results
from blip2.apps.errors import CliError, cli_message
from blip2.apps.index import ImageIndex, list_images
from blip2.apps.options import add_dtype_option, add_fast_option, non_negative_number, port, positive_number
from blip2.apps.pipeline import GenerationOptions, Pipeline, PipelineError
from blip2.hub import read_json
from blip2.processing import ImageFiles

__all__ = ["CliError", "build_parser", "expand_inputs", "main", "read_results"]

INDEX_DIR = ".blip2-index"  # where `blip2 search FOLDER` keeps the folder's index, inside the folder
EXIT_INTERNAL = 3


# -- subcommands ------------------------------------------------------------------------------------


def _options(max_new_tokens: int, num_beams: int) -> GenerationOptions:
    try:
        return GenerationOptions(max_new_tokens=max_new_tokens, num_beams=num_beams)
    except ValueError as e:
        raise CliError(str(e)) from None


def _check_output_folder(output: str | None) -> None:
    folder = os.path.dirname(os.path.abspath(output)) if output else None
    if folder is not None and not os.path.isdir(folder):
        raise CliError(f"{output}: the folder {folder} does not exist")


def _open_image(path: str) -> Any:
    from blip2.processing import ImageLoadError, load_image

    try:
        return load_image(path)
    except ImageLoadError as e:
        raise CliError(str(e)) from None


def caption(paths: list[str], model: str | None = None, device: str = "auto", dtype: str = "auto",
            prompt: str = "", batch_size: int = 8, num_beams: int = 1, max_new_tokens: int = 30,
            output: str | None = None, resume: bool = False, overwrite: bool = False, workers: int = 2,
            fast: str = "auto") -> int:
    """Caption images: files, folders (recursive), globs or list files."""
    options = _options(max_new_tokens, num_beams)
    if batch_size < 1 or workers < 0:
        raise CliError("--batch-size must be at least 1 and --workers at least 0")
    if (resume or overwrite) and output is None:
        raise CliError("--resume and --overwrite need --output")
    if resume and overwrite:
        raise CliError("--resume and --overwrite exclude each other")
    if any("\ud800" <= c <= "\udfff" for c in prompt):  # bytes of the command line that were not UTF-8
        raise CliError(f"--prompt {prompt!r}: not valid UTF-8")
    _check_output_folder(output)
    ranks = Ranks.from_env()
    try:
        return caption_job(ranks, paths, model, device, dtype, prompt, batch_size, options, output, resume,
                           overwrite, workers, fast)
    finally:
        ranks.close()


def ask(image: str, questions: list[str], model: str | None = None, device: str = "auto", dtype: str = "auto",
        num_beams: int = 1, max_new_tokens: int = 30, fast: str = "auto") -> int:
    """Answer questions about an image, one answer line per question."""
    options = _options(max_new_tokens, num_beams)
    picture = _open_image(image)
    pipe = Pipeline.load(model, device=device, dtype=dtype, fast=fast)
    pixels = pipe.preprocess([picture]).expand(len(questions), -1, -1, -1)
    for answer in pipe.ask(pixels, questions, options):
        print(answer)
    return 0


def chat(image: str, model: str | None = None, device: str = "auto", dtype: str = "auto", num_beams: int = 1,
         max_new_tokens: int = 30, fast: str = "auto") -> int:
    """Talk about an image: one question per line on stdin, earlier turns kept in the prompt."""
    options = _options(max_new_tokens, num_beams)
    picture = _open_image(image)
    pipe = Pipeline.load(model, device=device, dtype=dtype, fast=fast)
    pixels = pipe.preprocess([picture])[0]
    history: list[tuple[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input (Ctrl-D)
            return 0
        question = line.strip()
        if not question:
            continue
        answer = pipe.chat(pixels, history, question, options)
        print(answer, flush=True)
        history.append((question, answer))


def match(image: str, texts: list[str], model: str | None = None, device: str = "auto", dtype: str = "auto") -> int:
    """Score texts against an image with a retrieval checkpoint: ITM probability and ITC similarity."""
    picture = _open_image(image)
    pipe = Pipeline.load(model, device=device, dtype=dtype)
    for score in pipe.match(picture, texts):
        print(f"itm={score.itm:.4f}\titc={score.itc:.4f}\t{score.text}")
    return 0


def search(target: str, text: str, model: str | None = None, device: str = "auto", dtype: str = "auto", k: int = 5,
           rerank_k: int = 32, index: str | None = None, batch_size: int = 32) -> int:
    """Find the images that best match a text, in a folder or a saved index, with a retrieval checkpoint.

    A folder is indexed on first use (in FOLDER/.blip2-index, or --index DIR) and later runs encode only
    new images. Prints the top k as ``score<TAB>path``: ITC similarity plus, for the best rerank_k, the
    ITM logit (LAVIS's re-ranking)."""
    if k < 1 or batch_size < 1 or not (rerank_k == 0 or rerank_k >= k):
        raise CliError("--k and --batch-size must be at least 1, --rerank-k 0 (ITC only) or at least --k")
    is_index = os.path.isfile(os.path.join(target, "index.json"))
    if not is_index and not os.path.isdir(target):
        raise CliError(f"{target}: no such folder or image index")
    pipe = Pipeline.load(model, device=device, dtype=dtype)
    pipe.text_ids([text])  # fails early, and clearly, on a captioning checkpoint
    model_id = _model_id(pipe.name)
    failed = 0
    if is_index:
        found = _load_index(target, pipe, model_id, batch_size)
    else:
        folder = os.path.normpath(target)
        directory = index or os.path.join(folder, INDEX_DIR)
        found = _load_index(directory, pipe, model_id, batch_size) if os.path.exists(directory) else None
        if found is not None and any(not os.path.exists(p) for p in found.paths):
            print(f"note: {directory}: images were removed from {folder}; rebuilding the index", file=sys.stderr)
            found = None
        if found is None:
            found = ImageIndex(pipe.model, _index_reader(pipe), model_id=model_id, batch_size=batch_size)
        new, failed = _add_images(found, list_images(folder), batch_size)
        if new:
            found.save(directory)
            print(f"indexed {new} new images in {directory} ({len(found)} in all)", file=sys.stderr)
    if len(found) == 0:
        raise CliError(f"{target}: no readable images to search")
    ids, mask = pipe.text_ids([text])
    result = found.search(ids, mask, k=min(k, len(found)), rerank_k=min(rerank_k, len(found)))
    for path, score in zip(result.paths[0], result.scores[0].tolist()):
        print(f"{score:.4f}\t{path}")
    return 1 if failed else 0


def _model_id(name: str) -> str:
    """What an index records as its model: an absolute directory, or the Hub id."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def _index_reader(pipe: Pipeline) -> Callable[[list[str]], torch.Tensor]:
    from blip2.processing import load_image

    return lambda paths: pipe.preprocess([load_image(p) for p in paths])


def _load_index(directory: str, pipe: Pipeline, model_id: str, batch_size: int) -> ImageIndex:
    try:
        return ImageIndex.load(directory, pipe.model, _index_reader(pipe), model_id=model_id, batch_size=batch_size)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot use the index in {directory}: {e} (delete it to rebuild, or pass another --index)") from None


def _add_images(found: ImageIndex, paths: list[str], batch_size: int) -> tuple[int, int]:
    """Add the paths not yet indexed, a batch at a time; an unreadable image is reported and left out.
    Returns (added, failed)."""
    from blip2.processing import ImageLoadError

    todo = [p for p in paths if p not in set(found.paths)]
    added = failed = 0
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        try:
            added += found.add(batch)
            continue
        except ImageLoadError:  # the index is unchanged: add the batch one image at a time
            pass
        for path in batch:
            try:
                added += found.add([path])
            except ImageLoadError as e:
                print(f"error: {e}", file=sys.stderr)
                failed += 1
    return added, failed


def embed(paths: list[str], output: str, texts: list[str] | None = None, model: str | None = None,
          device: str = "auto", dtype: str = "auto", batch_size: int = 32, workers: int = 2,
          overwrite: bool = False) -> int:
    """Write ITC features to a .safetensors file, with a retrieval checkpoint.

    ``image_embeds`` [N, Q, E] and ``text_embeds`` [T, E] (--text), L2-normalised, float32; the metadata
    holds ``images`` and ``texts`` (JSON lists, in row order) and ``model``."""
    from safetensors.torch import save_file

    if os.path.exists(output) and not overwrite:
        raise CliError(f"{output} exists: pass --overwrite to replace it")
    _check_output_folder(output)
    if batch_size < 1 or workers < 0:
        raise CliError("--batch-size must be at least 1 and --workers at least 0")
    images, problems = expand_inputs(paths)
    for arg, reason in problems:
        print(f"error: {arg}: {reason}", file=sys.stderr)
    pipe = Pipeline.load(model, device=device, dtype=dtype)
    texts = texts or []
    tensors = {"text_embeds": pipe.text_embeds(texts)} if texts else {}
    done: list[str] = []
    parts: list[torch.Tensor] = []
    failed = len(problems)
    loader = torch.utils.data.DataLoader(ImageFiles(images, pipe.processor.image_processor), batch_size=batch_size,
                                         num_workers=workers, collate_fn=list)
    for batch in loader:
        for path, _, reason in batch:
            if reason is not None:
                print(f"error: {reason}", file=sys.stderr)
                failed += 1
        good = [(path, pixels) for path, pixels, _ in batch if pixels is not None]
        if good:
            parts.append(pipe.image_embeds(torch.stack([px for _, px in good])))
            done += [path for path, _ in good]
    if parts:
        tensors["image_embeds"] = torch.cat(parts)
    if not tensors:
        raise CliError("nothing to embed: no readable images and no --text")
    metadata = {"images": json.dumps(done), "texts": json.dumps(texts), "model": _model_id(pipe.name)}
    save_file({name: t.contiguous() for name, t in tensors.items()}, output, metadata=metadata)
    print(f"done: {len(done)} images and {len(texts)} texts embedded, {failed} failed; wrote {output}", file=sys.stderr)
    return 1 if failed else 0


def convert(checkpoints: list[str], output: str, kind: str, image_size: int = 224, text_config: str | None = None,
            config: str | None = None, processor: str | None = None) -> int:
    """Convert Salesforce LAVIS BLIP-2 .pth checkpoint(s) to a Hugging Face directory.

    --kind says which LAVIS model they come from: feature_extractor or itm (-> Blip2ForImageTextRetrieval),
    opt or t5 (-> Blip2ForConditionalGeneration). The architecture is the published one (ViT-g, OPT-2.7b or
    Flan-T5-XL; --text-config names another language model's config.json) unless --config gives a whole
    BLIP-2 config.json. --processor copies the processor and tokenizer files from a checkpoint."""
    from blip2.config import Blip2Config, OPTConfig, T5Config
    from blip2.convert.lavis import convert_lavis_checkpoint, lavis_config
    from blip2.processing import Blip2Processor

    if config is not None and (text_config is not None or image_size != 224):
        raise CliError("--config gives the whole architecture: drop --text-config and --image-size")
    lm_config: OPTConfig | T5Config | None = None
    if text_config is not None:  # a file that is missing or not JSON: an error naming it
        lm_config = (OPTConfig if kind == "opt" else T5Config).from_dict(read_json(text_config, CliError),
                                                                         source=text_config)
    copy_from = None
    if processor is not None:  # read it before writing anything
        try:
            copy_from = Blip2Processor.from_pretrained(processor)
        except (OSError, ValueError) as e:
            raise CliError(f"--processor {processor}: {e}") from None
    try:
        target = Blip2Config.from_json_file(config) if config else lavis_config(kind, image_size, lm_config)
        convert_lavis_checkpoint(checkpoints, output, kind, target)
    except (OSError, ValueError) as e:  # ConfigError, LavisConversionError: they name the file or key
        raise CliError(str(e)) from None
    if copy_from is not None:
        copy_from.save_pretrained(output)
    print(f"wrote {output}", file=sys.stderr)
    return 0


def serve(model: str | None = None, device: str = "auto", dtype: str = "auto", num_beams: int = 1,
          max_new_tokens: int = 30, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8,
          max_wait_ms: float = 10.0, max_queue: int = 64, timeout: float = 60.0, max_upload_mb: float = 10.0,
          max_pixels: int = 40_000_000, fast: str = "auto", max_connections: int = 256,
          allow_origin: Sequence[str] = (), scheduler: str = "continuous", image_cache: int = 64,
          prefix_cache_mb: float = 512.0, fetch_images: bool = False) -> int:
    """Serve caption, VQA and match over HTTP (needs the serve extra: fastapi, uvicorn)."""
    try:
        from blip2.apps.server import ServerSettings, bind, run_server
    except ImportError as e:
        raise CliError(f"blip2 serve needs the serve extra ({e.name} is missing): pip install 'blip2[serve]'") from None
    try:
        settings = ServerSettings(options=_options(max_new_tokens, num_beams), max_batch_size=max_batch_size,
                                  max_wait_ms=max_wait_ms, max_queue=max_queue, timeout_s=timeout,
                                  max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels,
                                  max_connections=max_connections, allow_origins=tuple(allow_origin),
                                  scheduler=scheduler, image_cache=image_cache, prefix_cache_mb=prefix_cache_mb,
                                  fetch_images=fetch_images)
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        sock = bind(host, port)
    except OSError as e:
        raise CliError(str(e)) from None
    with sock:
        try:
            run_server(Pipeline.load(model, device=device, dtype=dtype, fast=fast), settings, sock)
        except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: uvicorn has shut down cleanly
            pass
    return 0


# -- the parser -------------------------------------------------------------------------------------

# Commands that hand their arguments to a module of their own: `blip2 NAME ARGS...` -> module.main(ARGS).
# The module is imported only when its command runs, so one that fails to import breaks no other command.
DELEGATED = {
    "train": ("blip2.train", "train stage 1 (Q-Former: ITC, ITM, ITG), stage 2 (Q-Former and projection against "
                             "a frozen LM) or fine-tune; torchrun for several processes"),
    "eval": ("blip2.eval.run", "evaluate on VQAv2, OK-VQA, GQA, COCO/NoCaps captions or Flickr30K/COCO retrieval"),
    "bench": ("blip2.apps.bench", "time decoding of a model preset or checkpoint: tokens/s against the memory-bandwidth bound"),
    "cache": ("blip2.apps.cache_command", "list or clear blip2's cache: converted copies, layouts, kernels, shards"),
}


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR_OR_HUB_ID",
                   help="checkpoint directory or Hugging Face Hub id (default: the bundled demo model)")
    g.add_argument("--device", default="auto", metavar="auto|cpu|cuda",
                   help="where to run (default: auto = cuda when available)")
    add_dtype_option(g)


def _generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=30, help="most tokens to generate (default: 30)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search width; 1 is greedy (default: 1)")
    add_fast_option(g)


def _command(sub: Any, func: Callable[..., int], **kw: Any) -> argparse.ArgumentParser:
    doc = inspect.getdoc(func) or ""
    p = sub.add_parser(func.__name__, help=doc.splitlines()[0], description=doc, **kw)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2", description="BLIP-2 captioning, VQA, image-text matching and "
                                     "serving, in pure PyTorch; loads Hugging Face checkpoints.")
    parser.add_argument("--version", action="version", version=f"blip2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _generation_commands(sub)
    _retrieval_commands(sub)
    _convert_command(sub)
    _serve_command(sub)
    for name, (module, help_text) in DELEGATED.items():
        p = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
        p.add_argument("argv", nargs=argparse.REMAINDER)
        p.set_defaults(func=_delegate(module))
    return parser


def _generation_commands(sub: Any) -> None:
    p = _command(sub, caption, epilog="Scale out with: torchrun --nproc_per_node N -m blip2 caption ... "
                 "(inputs split across ranks, one merged --output).")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image file, folder (searched recursively), glob, or list file (*.txt, one path per line)")
    _model_options(p)
    _generation_options(p)
    p.add_argument("--prompt", default="", help="text the caption continues, e.g. 'a photo of'")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (default: 2)")
    p.add_argument("--output", "-o", metavar="FILE.jsonl",
                   help="append one JSON object per image, flushed after every batch")
    p.add_argument("--resume", action="store_true", help="skip the images already in --output")
    p.add_argument("--overwrite", action="store_true", help="empty --output first")

    p = _command(sub, ask)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("questions", nargs="+", metavar="QUESTION")
    _model_options(p)
    _generation_options(p)

    p = _command(sub, chat)
    p.add_argument("image", metavar="IMAGE")
    _model_options(p)
    _generation_options(p)


def _retrieval_commands(sub: Any) -> None:
    p = _command(sub, match)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    _model_options(p)

    p = _command(sub, search)
    p.add_argument("target", metavar="INDEX_OR_FOLDER", help="a folder of images, or an index directory")
    p.add_argument("text", metavar="TEXT")
    _model_options(p)
    p.add_argument("--k", type=int, default=5, help="how many images to print (default: 5)")
    p.add_argument("--rerank-k", type=int, default=32,
                   help="re-rank this many ITC candidates with the ITM head; 0: ITC only (default: 32)")
    p.add_argument("--index", metavar="DIR", help=f"where to keep a folder's index (default: FOLDER/{INDEX_DIR})")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")

    p = _command(sub, embed)
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders, globs or list files")
    p.add_argument("--output", "-o", required=True, metavar="FILE.safetensors")
    p.add_argument("--text", dest="texts", action="append", metavar="TEXT", help="a text to embed (repeatable)")
    _model_options(p)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (default: 2)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def _convert_command(sub: Any) -> None:
    p = _command(sub, convert)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT.pth")
    p.add_argument("--output", "-o", required=True, metavar="DIR")
    p.add_argument("--kind", required=True, choices=["feature_extractor", "itm", "opt", "t5"],
                   help="the LAVIS model the weights come from")
    p.add_argument("--image-size", type=int, default=224, help="224, or 364 for the -coco models (default: 224)")
    p.add_argument("--text-config", metavar="CONFIG.json", help="the language model's config, for OPT-6.7b / Flan-T5-XXL")
    p.add_argument("--config", metavar="CONFIG.json", help="a BLIP-2 config.json for the whole architecture")
    p.add_argument("--processor", metavar="DIR_OR_HUB_ID", help="copy the processor and tokenizer from this checkpoint")


def _serve_command(sub: Any) -> None:
    p = _command(sub, serve)
    _model_options(p)
    _generation_options(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=port, default=8000, help="port; 0 picks a free one (default: 8000)")
    g.add_argument("--max-batch-size", type=int, default=8, help="most requests in one forward pass (default: 8)")
    g.add_argument("--max-wait-ms", type=non_negative_number, default=10.0, help="wait for batch-mates (default: 10)")
    g.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503 (default: 64)")
    g.add_argument("--timeout", type=positive_number, default=60.0, help="seconds before a request gets 504 (default: 60)")
    g.add_argument("--max-upload-mb", type=positive_number, default=10.0, help="largest request body (default: 10)")
    g.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="largest image, width x height, checked before decoding (default: 40000000)")
    g.add_argument("--max-connections", type=int, default=256,
                   help="open connections; one more is answered 503 and closed (default: 256)")
    g.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a site (https://host[:port]) whose pages may POST here; repeat it, or '*' for any "
                        "(default: only the server's own page)")
    g.add_argument("--scheduler", choices=("continuous", "micro"), default="continuous",
                   help="how the OpenAI endpoints batch: continuous (the default; rows join and leave the decoding "
                        "batch every step; beam search falls back to micro) or micro (a batch runs to its longest end)")
    g.add_argument("--image-cache", type=int, default=64, help="images whose vision output is kept (default: 64)")
    g.add_argument("--prefix-cache-mb", type=float, default=512.0,
                   help="MiB of OPT keys and values kept for a chat's next question (default: 512; 0: none)")
    g.add_argument("--fetch-images", action="store_true", help="fetch http(s) image URLs (default: data URLs only)")


def _delegate(module: str) -> Callable[[list[str]], int]:
    """Run ``module.main(argv) -> int``, which parses its own options; the module is imported here, when its
    command was chosen."""

    def run(argv: list[str]) -> int:
        try:
            entry = importlib.import_module(module).main
        except Exception as e:  # not installed, or broken: only this command is unavailable
            raise CliError(f"this command is unavailable: importing {module} failed ({type(e).__name__}: {e})") from None
        return int(entry(argv) or 0)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kwargs = {k: v for k, v in vars(args).items() if k in inspect.signature(args.func).parameters}
    try:
        return args.func(**kwargs)
    except (CliError, PipelineError) as e:
        print(f"blip2 {args.command}: error: {cli_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blip2 {args.command}: interrupted (results written so far are kept; "
              f"caption --resume continues)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `blip2 caption ... | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    except Exception:  # not the input's fault: a bug, or the machine's (a disk error, memory, a dead worker)
        traceback.print_exc()
        print(f"blip2 {args.command}: internal error (exit code {EXIT_INTERNAL}; the traceback above says where): "
              "results written so far are kept", file=sys.stderr)
        return EXIT_INTERNAL

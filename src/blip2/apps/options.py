"""The options every ``blip2`` command spells the same way, whichever module parses them: ``--dtype`` (the
names of ``blip2.checkpoint.DTYPE_NAMES``) and ``--fast`` (the modes of ``blip2.apps.pipeline.FAST``)."""

from __future__ import annotations

import argparse
import math

from blip2.apps.pipeline import FAST
from blip2.checkpoint import DTYPE_NAMES

__all__ = ["add_dtype_option", "add_fast_option", "non_negative_number", "port", "positive_number"]

Parser = argparse._ActionsContainer  # a parser or an argument group


def add_dtype_option(parser: Parser, default: str = "auto") -> None:
    parser.add_argument("--dtype", default=default, choices=DTYPE_NAMES,
                        help=f"weights dtype: auto (float32 on CPU, bfloat16 on a GPU that has it, else float16), "
                             f"float32, bfloat16, float16, or fp32, bf16, fp16 (default: {default})")


def add_fast_option(parser: Parser, default: str = "auto") -> None:
    parser.add_argument("--fast", default=default, choices=FAST,
                        help="speed-up: auto (the fastest exact one this machine runs: native, cuda-graph or "
                             "fuse), fuse (fused projections, same tokens), int8 (int8 language-model weights), "
                             "int8-dynamic (int8 products in the language model and vision encoder: the fastest "
                             "for batches on CPU, most tokens the same; CPU only), native (the whole decoder in "
                             "one native call per token for the batch: the fastest exact path on CPU, same "
                             "tokens; CPU only), cuda-graph (fuse + decoding step replayed as a CUDA graph, same "
                             f"tokens; CUDA only) (default: {default})")


# argparse types: a value out of range is a usage error naming the option (exit 2), not a traceback later


def port(text: str) -> int:
    """A TCP port: 0 (any free one) to 65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 (any free one) to 65535, got {value}")
    return value


def positive_number(text: str) -> float:
    """A finite number above 0 (not inf or nan)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text}")
    return value


def non_negative_number(text: str) -> float:
    """A finite number, 0 or more."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of 0 or more, got {text}")
    return value

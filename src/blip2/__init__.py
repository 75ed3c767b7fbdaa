"""blip2: a fast, pure-PyTorch BLIP-2 that loads and writes Hugging Face checkpoints."""

import os as _os

from .config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, ConfigError, OPTConfig, T5Config

__version__ = "0.1.0"

# The model the `blip2` command and server use when no --model is given: the bundled demo checkpoint.
DEFAULT_MODEL = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "assets", "demo")

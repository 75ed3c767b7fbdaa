"""blip2: a fast, pure-PyTorch BLIP-2 that loads and writes Hugging Face checkpoints."""

from .config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, ConfigError, OPTConfig, T5Config

__version__ = "0.1.0"

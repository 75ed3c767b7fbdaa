"""blip2: a fast, pure-PyTorch BLIP-2 that loads and writes Hugging Face checkpoints."""

import os as _os

from .checkpoint import CheckpointError
from .config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, ConfigError, OPTConfig, T5Config
from .generation import GenerationConfig, generate
from .convert_lavis import LavisConversionError, convert_lavis_checkpoint, convert_lavis_state_dict
from .images import BatchFeature, Blip2ImageProcessor, ImageLoadError, load_image
from .index import ImageIndex, Ranking, SearchResult, list_images, rank_texts
from .modeling import Blip2ForConditionalGeneration, Blip2Model, Blip2Output
from .processing import Blip2Processor, TextTokenizer
from .qformer import Blip2QFormerModel
from .retrieval import Blip2ForImageTextRetrieval, Blip2TextModelWithProjection, Blip2VisionModelWithProjection
from .vision import Blip2VisionModel

__version__ = "0.1.0"

# The model the `blip2` command and server use when no --model is given: the bundled demo checkpoint.
DEFAULT_MODEL = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "assets", "demo")

__all__ = [
    "Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection", "Blip2VisionModelWithProjection",
    "ImageIndex", "LavisConversionError", "Ranking", "SearchResult", "convert_lavis_checkpoint",
    "convert_lavis_state_dict", "list_images", "rank_texts",
    "BatchFeature", "Blip2ImageProcessor", "Blip2Processor", "ImageLoadError", "TextTokenizer", "load_image",
    "Blip2Config", "Blip2ForConditionalGeneration", "Blip2Model", "Blip2Output", "Blip2QFormerConfig",
    "Blip2QFormerModel", "Blip2VisionConfig", "Blip2VisionModel", "CheckpointError", "ConfigError",
    "GenerationConfig", "OPTConfig", "T5Config", "generate", "DEFAULT_MODEL",
]

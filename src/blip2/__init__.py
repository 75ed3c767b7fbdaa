"""blip2: a fast, pure-PyTorch BLIP-2 that loads and writes Hugging Face checkpoints."""

from blip2._version import __version__
from blip2.apps.index import ImageIndex, Ranking, SearchResult, list_images, rank_texts
from blip2.checkpoint import CheckpointError
from blip2.config import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, ConfigError, OPTConfig, T5Config
from blip2.convert.lavis import LavisConversionError, convert_lavis_checkpoint, convert_lavis_state_dict
from blip2.demo import DEFAULT_MODEL
from blip2.fast import lazy as _lazy
from blip2.generation import GenerationConfig, generate
from blip2.images import BatchFeature, Blip2ImageProcessor, ImageLoadError, load_image
from blip2.models.blip2 import Blip2ForConditionalGeneration, Blip2Model
from blip2.models.qformer import Blip2QFormerModel
from blip2.models.retrieval import (Blip2ForImageTextRetrieval, Blip2TextModelWithProjection,
                                    Blip2VisionModelWithProjection)
from blip2.models.vision import Blip2VisionModel
from blip2.processing import Blip2Processor, TextTokenizer

Blip2Model.speed_layer = _lazy  # generate() takes the fastest exact path by default (blip2.fast.lazy)

__all__ = [
    "Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection", "Blip2VisionModelWithProjection",
    "ImageIndex", "LavisConversionError", "Ranking", "SearchResult", "convert_lavis_checkpoint",
    "convert_lavis_state_dict", "list_images", "rank_texts",
    "BatchFeature", "Blip2ImageProcessor", "Blip2Processor", "ImageLoadError", "TextTokenizer", "load_image",
    "Blip2Config", "Blip2ForConditionalGeneration", "Blip2Model", "Blip2QFormerConfig",
    "Blip2QFormerModel", "Blip2VisionConfig", "Blip2VisionModel", "CheckpointError", "ConfigError",
    "GenerationConfig", "OPTConfig", "T5Config", "generate", "DEFAULT_MODEL", "__version__",
]

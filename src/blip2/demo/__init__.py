"""Models bundled with the package: a small BLIP-2 trained from scratch by ``python -m blip2.demo.recipe``
on the synthetic world of ``blip2.demo.world`` (see the README's "Bundled demo model").

- ``DEFAULT_MODEL``: ``Blip2ForConditionalGeneration`` (captions with no prompt; answers to
  "Question: {q} Answer:"), with its processor files.
- ``DEFAULT_RETRIEVAL_MODEL``: ``Blip2ForImageTextRetrieval`` (ITC and ITM), with its processor files.

Both are plain Hugging Face directories: they load in transformers as well.
"""

import os

__all__ = ["DEFAULT_MODEL", "DEFAULT_RETRIEVAL_MODEL"]

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(_HERE, "assets", "demo")
DEFAULT_RETRIEVAL_MODEL = os.path.join(_HERE, "assets", "demo-retrieval")

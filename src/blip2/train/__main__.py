"""``python -m blip2.train stage1|stage2|finetune ...`` (the same as ``blip2 train ...``)."""

import sys

from blip2.train import main

sys.exit(main())

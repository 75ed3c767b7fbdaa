"""``python -m blip2``: the ``blip2`` command (also what ``torchrun -m blip2`` runs on each rank)."""

from .cli import main

raise SystemExit(main())

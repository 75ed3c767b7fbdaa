"""``python -m blip2``: the ``blip2`` command (also what ``torchrun -m blip2`` runs on each rank)."""

from blip2.apps.cli import main

raise SystemExit(main())

"""Evaluate the bundled demo model on 500 held-out generated images; see ``blip2.demo.evaluate``.

    python benchmarks/eval_demo.py --readme docs/BENCHMARKS.md
"""

from blip2.demo.evaluate import main

if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""`python scripts/benchmark.py ARGS` runs `jaxpart bench ARGS` (see `jaxpart bench --help`).

Issue 4's figures: python scripts/benchmark.py --preset small --devices 16 --chunk-tokens 32 \
  --repeats 7 --memory-seqs 256,512,1024,2048
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxpart.cli import main  # noqa: E402

if __name__ == "__main__":
  raise SystemExit(main(["bench", *sys.argv[1:]]))

#!/usr/bin/env python
"""Convert a checkpoint between placements, or to and from .npz: `jaxpart convert`, as a script.

  python scripts/convert_checkpoint.py SRC DST --to-strategy layerwise --devices 16
  python scripts/convert_checkpoint.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runnable from a clean clone

from jaxpart.cli import main  # noqa: E402

if __name__ == "__main__":
  raise SystemExit(main(["convert", *sys.argv[1:]]))

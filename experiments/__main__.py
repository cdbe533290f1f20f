"""`python -m experiments [...]` is `jaxpart experiments [...]`."""

import sys

from jaxpart.cli import main

raise SystemExit(main(["experiments", *sys.argv[1:]]))

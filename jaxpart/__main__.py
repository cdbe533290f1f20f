import sys

from jaxpart.errors import keep_interrupts

keep_interrupts()
try:
  from jaxpart.cli import main
except KeyboardInterrupt:        # Ctrl-C while JAX is still importing
  print("jaxpart: error: interrupted (Ctrl-C)", file=sys.stderr)
  raise SystemExit(130) from None

raise SystemExit(main())

# Sourced by scripts/main.sh and scripts/test.sh: create .venv once, install jaxpart pinned.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import jaxpart, jax, flax, optax, orbax.checkpoint, pytest" 2>/dev/null; then
  echo "setting up .venv (first run only)..." >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -e ".[test]" >&2
fi
export PATH="$PWD/.venv/bin:$PATH"

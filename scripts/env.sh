# Sourced by scripts/main.sh and scripts/test.sh: create .venv from requirements.lock (exact
# versions, checked by hash), then jaxpart itself editable; again whenever the lock changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
lock_sum="$(sha256sum requirements.lock | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.lock-sha256 2>/dev/null)" != "$lock_sum" ] \
    || ! .venv/bin/python -c "import jaxpart, jax, flax, optax, orbax.checkpoint, pytest, matplotlib" 2>/dev/null; then
  echo "setting up .venv from requirements.lock (first run only)..." >&2
  start=$SECONDS
  python3 -m venv .venv
  # torch is pinned to its CPU build (2.13.0+cpu), which PyPI lacks: pip finds it where pip's
  # own configuration points (a local wheel here), else on PyTorch's CPU index.
  if ! .venv/bin/python -m pip install -q --require-hashes -r requirements.lock >&2; then
    echo "retrying with PyTorch's CPU index for torch==2.13.0+cpu..." >&2
    .venv/bin/python -m pip install -q --require-hashes -r requirements.lock \
      --extra-index-url https://download.pytorch.org/whl/cpu >&2
  fi
  # setuptools comes from the lock, so the editable install needs no other download.
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . >&2
  echo "$lock_sum" > .venv/.lock-sha256
  echo ".venv ready in $((SECONDS - start)) s" >&2
fi
export PATH="$PWD/.venv/bin:$PATH"

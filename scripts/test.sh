#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite on 16 simulated CPU devices.
source "$(dirname "$0")/env.sh"
exec python -m pytest -q "$@"

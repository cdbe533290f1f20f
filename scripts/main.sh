#!/usr/bin/env bash
# Set up the environment if needed, then run the main job: baseline vs layer-wise on 16
# simulated CPU devices. Extra arguments go to `jaxpart compare`.
source "$(dirname "$0")/env.sh"
exec jaxpart compare "$@"

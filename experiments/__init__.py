"""One experiment per section of the seed, each writing results/<name>.md and .json.

Run them with `jaxpart experiments [--only NAME]` (or `python -m experiments`); the runner is
experiments.runner. Modelled figures come from jaxpart.cost.forward, measured ones from programs
compiled (and for small presets run) on simulated CPU devices via jaxpart.measure.compiled, .hlo
and .bench.
"""

#!/usr/bin/env python
"""Run numerically sensitive tests over many seeds (JAXPART_TEST_SEED) and print a table.

Tests draw fresh random inputs each run (tests/conftest.py's fresh_key), so a bound must hold
for every seed, not for the one CI happened to draw. This runs the chosen tests once per seed,
one pytest process per seed, and prints per test how many seeds passed and which failed.
Compiled programs are shared across seeds through JAX's persistent compilation cache (a
temporary directory), so later seeds cost little more than the arithmetic.

  python scripts/seed_sweep.py                         # the default list, seeds 0..19
  python scripts/seed_sweep.py --seeds 20 tests/test_train.py::test_adamw_on_mesh_matches_one_device

Exit status 1 if any test failed for any seed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SENSITIVE = [
    "tests/test_train.py::test_adamw_on_mesh_matches_one_device",
    "tests/test_oracle.py",
    "tests/test_engine.py::test_both_placements_on_16_devices",
    "tests/test_engine.py::test_ragged_chunks",
    "tests/test_engine.py::test_bf16_within_stated_tolerance",
    "tests/test_model.py::test_bf16_close_to_float32",
    "tests/test_model.py::test_randomize_norms_touches_only_the_norms",
    "tests/test_model.py::test_blocked_attention_equals_full",
    "tests/test_grad.py::test_f32_grads_match_reference_with_nan_bubbles",
    "tests/test_grad.py::test_bf16_grads_within_derived_tolerance",
    "tests/test_grad.py::test_float64_central_differences",
]
_OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR)\s+(\S+)")


def run_seed(seed: int, tests: list[str], cache: str, timeout: float) -> dict[str, str]:
  env = dict(os.environ, JAXPART_TEST_SEED=str(seed), PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *tests]
  try:
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {t: "TIMEOUT" for t in tests}
  out = {}
  for line in p.stdout.splitlines():
    m = _OUTCOME.match(line)
    if m:
      out[m.group(2)] = m.group(1)
  if not out:
    return {t: f"ERROR (pytest exit {p.returncode})" for t in tests}
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("tests", nargs="*", help="test node ids (default: the sensitive list)")
  ap.add_argument("--seeds", type=int, default=20, help="seeds 0 .. N-1 (default 20)")
  ap.add_argument("--first-seed", type=int, default=0)
  ap.add_argument("--timeout", type=float, default=900, help="seconds per seed")
  args = ap.parse_args(argv)
  tests = args.tests or SENSITIVE
  seeds = range(args.first_seed, args.first_seed + args.seeds)
  results: dict[str, dict[int, str]] = {}
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="jaxpart-seed-sweep-") as cache:
    for seed in seeds:
      t0 = time.monotonic()
      got = run_seed(seed, tests, cache, args.timeout)
      for node, outcome in got.items():
        results.setdefault(node, {})[seed] = outcome
      bad = sum(o != "PASSED" for o in got.values())
      print(f"seed {seed:3d}: {len(got) - bad}/{len(got)} passed  "
            f"({time.monotonic() - t0:.0f} s)", flush=True)
  print()
  width = max(len(n) for n in results) if results else 10
  print(f"{'test':{width}s}  passed  failing seeds")
  failed = False
  for node, by_seed in results.items():
    bad = [s for s, o in by_seed.items() if o != "PASSED"]
    failed |= bool(bad) or len(by_seed) < len(seeds)
    print(f"{node:{width}s}  {len(by_seed) - len(bad):2d}/{len(seeds)}   "
          f"{', '.join(map(str, bad)) or '-'}")
  print(f"\n{len(seeds)} seeds in {time.monotonic() - start:.0f} s")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

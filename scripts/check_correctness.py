#!/usr/bin/env python
"""Forward and backward of both seed placements against the single-device reference.

Runs `jaxpart gradcheck` (forward output, loss, gradient of every parameter leaf and of the
input, NaN in every pipeline bubble) for the baseline (tp = devices / 2 x pp 2: TP8 x PP2 on 16)
and for the layer-wise placement in five token chunks, the last one ragged. Prints each leaf's
error and bound and exits 1 if anything in either placement is off.

  .venv/bin/python scripts/check_correctness.py [--preset tiny] [--devices 16]
                                                [--dtype float32|bfloat16] [--set S.F=V ...]
On CPU it simulates the devices (XLA_FLAGS is set before JAX starts).
"""

from __future__ import annotations

import argparse
import sys

from jaxpart import cli


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--devices", type=int, default=16)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
  args = p.parse_args(argv)
  cli._ensure_cpu_devices(["--devices", str(args.devices)])  # before anything imports jax

  from jaxpart import config  # noqa: PLC0415
  seq = config.load_setup(args.preset, overrides=config.parse_overrides(args.set)).run.seq
  chunk = max(1, seq // 4 - 1)   # 5 chunks, the last one short: 100 -> 24, 24, 24, 24, 4
  common = ["gradcheck", "--preset", args.preset, "--devices", str(args.devices),
            "--dtype", args.dtype, *[f"--set={s}" for s in args.set]]
  placements = {
      "baseline": ["--strategy", "baseline", "--tp", str(args.devices // 2), "--pp", "2"],
      "layerwise": ["--strategy", "layerwise", "--chunk-tokens", str(chunk)],
  }
  results = {}
  for name, extra in placements.items():
    print(f"== {name} ==", flush=True)
    results[name] = cli.main(common + extra)
    print(flush=True)
  verdict = {n: "PASS" if rc == 0 else ("FAIL" if rc == 1 else "ERROR") for n, rc in results.items()}
  print("check_correctness: " + ", ".join(f"{n} {v}" for n, v in verdict.items()))
  return 0 if all(rc == 0 for rc in results.values()) else 1


if __name__ == "__main__":
  sys.exit(main())

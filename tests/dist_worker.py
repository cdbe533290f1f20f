"""One process of a multi-process check, started by tests/test_distributed.py through
scripts/launch_local.py: runs the layer-wise and the baseline forward in float32 from a seed,
optionally saves the layer-wise parameters as a checkpoint or restores one into the baseline
placement, and (process 0) writes every output to an npz. Same library calls as `jaxpart run`.
"""

from __future__ import annotations

import argparse
import sys

from jaxpart import cli


def main(argv: list[str]) -> int:
  cli._ensure_cpu_devices(argv)            # before JAX starts, as the jaxpart entry point does
  from jaxpart.runtime import distributed  # noqa: PLC0415
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--devices", type=int, default=16)
  p.add_argument("--save", default=None, help="checkpoint the layer-wise parameters here")
  p.add_argument("--restore", default=None, help="restore this checkpoint into the baseline")
  p.add_argument("--fail-process", type=int, default=None,
                 help="this process raises an uncaught error right after start-up")
  distributed.add_arguments(p)
  args = p.parse_args(argv)
  distributed.initialize(distributed.LaunchFlags.from_flags(vars(args)))

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from jaxpart import checkpoint, config  # noqa: PLC0415
  from jaxpart.runtime import runs  # noqa: PLC0415
  from jaxpart.placement import planner
  if args.fail_process == jax.process_index():
    raise RuntimeError(f"injected failure in process {args.fail_process}")
  setup = config.load_setup("tiny")
  plans = {"layerwise": planner.make_plan(setup, args.devices, "layerwise", chunk_tokens=32),
           "baseline": planner.make_plan(setup, args.devices, "baseline", tp=8, pp=2,
                                         microbatches=2)}
  params_h, x_h = runs.host_params(setup, args.seed), runs.host_input(setup, args.seed)
  out, placed = {}, {}
  for name, plan in plans.items():
    placed[name] = runs.place(setup, plan, params_h, x_h, dtype=jnp.float32)
    out[name] = runs.fetch(placed[name]())
  out["reference"] = runs.reference(setup, params_h, x_h, jnp.float32)
  if args.save:
    checkpoint.save(args.save, placed["layerwise"].params, setup.model, plans["layerwise"])
  if args.restore:
    base = plans["baseline"]
    restored = checkpoint.restore(args.restore, setup.model, base).params
    fwd = placed["baseline"].forward
    out["restored_baseline"] = runs.fetch(fwd(restored, placed["baseline"].x))
  if distributed.is_main():
    np.savez(args.out, processes=jax.process_count(), devices=jax.device_count(),
             local_devices=jax.local_device_count(), **out)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

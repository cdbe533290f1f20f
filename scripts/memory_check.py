"""Compiled per-device memory of the engine's forward against the planner's prediction.

Compiles (never runs) the forward of each preset and placement on simulated CPU devices and
prints, per device: arguments, output, temporaries and their total from memory_analysis(),
beside memory.program_bytes (predicted_hbm_bytes); then the layer-wise device sweep of the
paper preset, and the compiled matmul FLOPs of the engine against the model's causal FLOPs.

  python scripts/memory_check.py [--devices 4,8,16,32,64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=64").strip()

from jaxpart import config  # noqa: E402
from jaxpart.placement import planner  # noqa: E402
from jaxpart.cost import counts
from jaxpart.measure import compiled as measure
from jaxpart.placement import memory
from jaxpart.placement.plan import PlanError  # noqa: E402

GIB = 2**30


def plans_for(setup, n: int) -> dict:
  """The planner's own choices: layer-wise, and the baseline with 2 stages (the seed's pp)."""
  out = {}
  for name, kw in (("layerwise", {}), ("baseline", {"pp": 2})):
    try:
      out[name] = planner.make_plan(setup, n, name, fit_memory=False, **kw)
    except PlanError as e:
      print(f"  {setup.preset} {n} {name}: cannot plan: {e}", file=sys.stderr)
  return out


def memory_rows(presets, devices) -> list[dict]:
  rows = []
  for preset in presets:
    setup = config.load_setup(preset)
    for n in devices:
      for name, plan in plans_for(setup, n).items():
        st = measure.forward_memory(setup, plan)
        pred = memory.predicted_hbm_bytes(setup.model, setup.run, plan)
        rows.append({"preset": preset, "devices": n, "strategy": name,
                     "grid": f"{plan.stages}x{plan.tp}", "split": plan.split,
                     "argument_bytes": st["argument_bytes"], "output_bytes": st["output_bytes"],
                     "temp_bytes": st["temp_bytes"], "total_bytes": st["total_bytes"],
                     "predicted_hbm_bytes": pred, "ratio": st["total_bytes"] / pred,
                     "fits_h100": st["total_bytes"] <= 80e9})
        r = rows[-1]
        print(f"{preset:9s} {n:3d} {name:9s} {r['grid']:>5s} total {r['total_bytes'] / 1e9:8.2f} GB"
              f"  predicted {pred / 1e9:8.2f} GB  ratio {r['ratio']:.3f}", flush=True)
  return rows


def flop_rows(devices: int = 16) -> list[dict]:
  """Compiled matmul FLOPs (HLO, loop trips and cond weights applied, summed over devices)
  against the causal minimum on real tokens (memory.forward_flops_per_token)."""
  setup = config.load_setup("small")
  out = []
  for name, kw in (("layerwise", {}), ("baseline", {"tp": 8, "pp": 2})):
    plan = planner.make_plan(setup, devices, name, **kw)
    st = measure.forward_memory(setup, plan)
    compiled = st["flops"] * devices
    causal = memory.forward_flops_per_token(setup.model, setup.run.seq) * setup.run.tokens
    out.append({"strategy": name, "split": plan.split, "compiled_flops": compiled,
                "causal_flops": causal, "ratio": compiled / causal,
                "modelled_executed": counts.plan_flops(setup.model, plan)["executed"] * devices})
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", default="4,8,16,32,64")
  p.add_argument("--presets", default="paper,paper-30b,small")
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  devices = [int(d) for d in a.devices.split(",")]
  rows = memory_rows(a.presets.split(","), devices)
  print("\nper device, compiled on simulated CPU devices (memory_analysis(); nothing runs)")
  print(f"{'preset':9s} {'N':>3s} {'strategy':9s} {'grid':>5s} {'split':44s} {'args GB':>8s} "
        f"{'out GB':>7s} {'temp GB':>8s} {'total GB':>9s} {'pred GB':>8s} {'tot/pred':>8s}")
  for r in rows:
    print(f"{r['preset']:9s} {r['devices']:3d} {r['strategy']:9s} {r['grid']:>5s} "
          f"{r['split'][:44]:44s} {r['argument_bytes'] / 1e9:8.2f} {r['output_bytes'] / 1e9:7.2f} "
          f"{r['temp_bytes'] / 1e9:8.2f} {r['total_bytes'] / 1e9:9.2f} "
          f"{r['predicted_hbm_bytes'] / 1e9:8.2f} {r['ratio']:8.3f}")
  worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
  within = sum(abs(r["ratio"] - 1) <= 0.15 for r in rows)
  print(f"within 15% of the prediction: {within} of {len(rows)}; worst {worst['preset']} "
        f"{worst['devices']} {worst['strategy']}: {worst['ratio']:.3f}")
  sweep = [r for r in rows if r["preset"] == "paper" and r["strategy"] == "layerwise"]
  if sweep:
    print("\nlayer-wise paper, compiled total per device against devices (1/N would be x 1/N):")
    n0, t0 = sweep[0]["devices"], sweep[0]["total_bytes"]
    for r in sweep:
      print(f"  {r['devices']:3d} devices  {r['total_bytes'] / 1e9:8.2f} GB  "
            f"x{r['total_bytes'] / t0:.3f} (1/N: x{n0 / r['devices']:.3f})")
  flops = flop_rows()
  print("\nsmall, 16 devices: compiled matmul FLOPs of the engine / causal FLOPs of the model")
  for f in flops:
    print(f"  {f['strategy']:9s} {f['split']:40s} {f['compiled_flops']:.4g} / "
          f"{f['causal_flops']:.4g} = {f['ratio']:.3f}")
  if a.json:
    with open(a.json, "w") as fh:
      json.dump({"memory": rows, "flops": flops}, fh, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""TTFT and TPOT on simulated CPU devices: both placements and one device, in one process.

For the Llama family (llama-tiny shapes, random weights, prompts of different lengths) and the
seed's dense block (`small` preset: each decode step feeds back the last hidden vector), runs
prefill and decode with jaxpart.runtime.generate for the seed's baseline (TP8 x PP2), the layer-wise
placement (16 devices) and a one-device plan, prints time to first token (prefill of the batch),
time per output token (median decode cycle) and decode tokens/s beside the 1-minute load, and
the compiled per-device temp bytes of a decode cycle at 16 and at 256 new tokens.

  python scripts/generate_bench.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=16").strip()

import numpy as np  # noqa: E402

from jaxpart import config  # noqa: E402
from jaxpart.runtime import runs  # noqa: E402
from jaxpart.runtime import generate
from jaxpart.measure import load
from jaxpart.placement import planner

PLACEMENTS = {"baseline TP8xPP2 (16)": (16, "baseline", dict(tp=8, pp=2)),
              "layer-wise (16)": (16, "layerwise", {}),
              "one device": (1, "layerwise", {})}


def inputs(setup, seed: int = 0):
  params = runs.host_params(setup, seed)
  x = runs.host_input(setup, seed)
  if setup.model.arch == "llama":   # prompts of different lengths, right-padded
    lens = np.linspace(setup.run.seq // 2, setup.run.seq, setup.run.batch).astype(np.int32)
    x = np.where(np.arange(setup.run.seq) < lens[:, None], x, generate.PAD)
    x, lens = generate.split_prompts(x, setup.model.vocab)
  else:
    lens = np.full(setup.run.batch, setup.run.seq, np.int32)
  return params, x, lens


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--new-tokens", type=int, default=16)
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  rows = []
  for preset in ("llama-tiny", "small"):
    setup = config.load_setup(preset, hardware="cpu")
    if preset == "llama-tiny":
      setup = config.load_setup(preset, hardware="cpu", overrides={"run.batch": "4"})
    params, x, lens = inputs(setup)
    before = load.start(f"generate {preset}:")
    for name, (n, strategy, kw) in PLACEMENTS.items():
      plan = planner.make_plan(setup, n, strategy, **kw)
      g = generate.generate(setup, plan, params, x, lens, a.new_tokens)
      rows.append({"preset": preset, "placement": name, "plan": plan.split,
                   "decode_microbatches": g.schedule.microbatches, "ttft_s": g.ttft_s,
                   "tpot_s": g.tpot_s, "decode_tokens_per_s": g.decode_tokens_per_s})
      print(f"{preset:10s} {name:22s} TTFT {g.ttft_s * 1e3:8.2f} ms  TPOT {g.tpot_s * 1e3:7.2f} ms"
            f"  {g.decode_tokens_per_s:9.1f} tok/s", flush=True)
    machine = load.finish(before)
    for r in rows:
      r.setdefault("load", machine)
  temps = {}
  print("\nsmall, layer-wise, 16 devices: decode cycle per device (compiled), by new tokens K")
  for dtype in ("bfloat16", "float32"):
    setup = config.load_setup("small", overrides={"model.dtype": dtype})
    plan = planner.make_plan(setup, 16, "layerwise")
    params, x, lens = inputs(setup)
    for k in (16, 256):
      m = generate.generate(setup, plan, params, x, lens, k, memory=True).memory
      temps[f"{dtype} K={k}"] = m
      print(f"  {dtype:8s} K = {k:3d}: temp {m['decode_cycle']['temp_bytes']:,} B, arguments "
            f"{m['decode_cycle']['argument_bytes']:,} B (the preallocated cache grows with K)")
  print("  (the temp stays the same as K grows: the bf16 cache and output record are updated in "
        "place as bit patterns, which XLA:CPU would otherwise widen to float32 and copy)")
  print("\nmeasured on CPU with simulated devices sharing the host cores (wall time: total work, "
        "not parallel speed-up); one device = the same engine on a 1 x 1 plan")
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"rows": rows, "decode_memory": temps}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())

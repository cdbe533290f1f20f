"""Seed section 8.1: are the two placements' outputs bit-exact? Measured on the tiny preset."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxpart import config
from jaxpart.placement import planner
from jaxpart.runtime import runs
from experiments import common

NAME = "sec8_correctness"
TITLE = "Section 8.1: output agreement between placements (measured, CPU)"
SEED = 0


def _bf16_ulps_at_max(a, b) -> float:
  """max |a - b| in units of one bf16 ulp at the largest |b|: the scale at which bf16 rounds
  the output's big elements (an ulp count per element explodes near zero, where ulps are tiny)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  top = float(np.max(np.abs(b)))
  ulp = 2.0 ** (np.floor(np.log2(top)) - 7)   # bf16 keeps 8 significant bits
  return float(np.max(np.abs(a - b)) / ulp)


def run(ctx: common.Context) -> common.Result:
  res = common.Result(NAME, TITLE)
  if not ctx.measure:
    res.add(f"{common.CPU}: skipped (run without --no-measure).")
    return res
  setup = config.load_setup("tiny")
  plans = {"baseline": planner.make_plan(setup, 16, "baseline", tp=8, pp=2),
           "layerwise": planner.make_plan(setup, 16, "layerwise", chunk_tokens=16, chunk_rows=1)}
  params = runs.host_params(setup, SEED)
  bar = ctx.bar(6, "sec8 forwards (tiny)")
  out, data = {}, {"plans": {k: p.to_dict() for k, p in plans.items()}}
  for dt_name, dt in (("float32", jnp.float32), ("bfloat16", None)):
    x = runs.host_input(setup, SEED, dt)
    ref = runs.reference(setup, params, x, dt)
    bar.update(1)
    for name, plan in plans.items():
      placed = runs.place(setup, plan, params, x, dtype=dt)
      out[(dt_name, name)] = runs.fetch(placed())
      bar.update(1)
    out[(dt_name, "reference")] = ref
  bar.close()
  rows = []
  for dt_name in ("float32", "bfloat16"):
    ref = out[(dt_name, "reference")]
    b, lw = out[(dt_name, "baseline")], out[(dt_name, "layerwise")]
    e_b, e_l, e_bl = runs.errors(b, ref), runs.errors(lw, ref), runs.errors(lw, b)
    same = float(np.mean(np.asarray(lw) == np.asarray(b)))
    entry = {"baseline_vs_reference": e_b, "layerwise_vs_reference": e_l,
             "layerwise_vs_baseline": e_bl, "identical_elements": same}
    entry["bf16_ulps_at_max_layerwise_vs_baseline"] = _bf16_ulps_at_max(lw, b)
    data[dt_name] = entry
    rows.append([dt_name, f"{e_b['max_rel_err']:.2e}", f"{e_l['max_rel_err']:.2e}",
                 f"{e_bl['max_rel_err']:.2e}", e_bl["bit_exact"], f"{same:.1%}",
                 f"{entry['bf16_ulps_at_max_layerwise_vs_baseline']:.2f}"])
  res.add(f"Tiny preset ({setup.run.batch} x {setup.run.seq}, d_model {setup.model.d_model}) on "
          f"16 simulated devices: baseline {plans['baseline'].split} at tp 8 x pp 2; layer-wise "
          f"{plans['layerwise'].split} at 4 stages x tp 4. Relative error = max |a - b| / "
          f"max |b|.", "")
  res.add(*common.md_table(
      ["dtype", "baseline vs reference", "layer-wise vs reference", "layer-wise vs baseline",
       "bit-exact (layer-wise vs baseline)", "identical elements",
       "max difference in bf16 ulps of the largest output"], rows))
  res.add("The seed's 'bit-exact results compared to baseline' cannot hold in general: the two "
          "placements sum different partial products (tp 8 vs tp 4 all-reduces of float32 "
          "matmul partials cast to the model dtype) and split attention differently (whole "
          "sequence vs chunks with an online softmax), and floating-point addition is not "
          "associative. Both agree with the reference to rounding error: about 1e-6 relative in "
          "float32 (the two placements' own difference, in bf16 units, is far below one ulp), "
          "and in bf16 a few ulps of the output's scale apart, as two bf16 roundings of different "
          "summation orders are.")
  res.data = data
  return res

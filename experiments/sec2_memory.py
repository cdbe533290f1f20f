"""Seed section 2: model size, per-layer memory and the working set of one step."""

from __future__ import annotations

from jaxpart.cost import forward as costmodel
from jaxpart.placement import memory
from experiments import common, measured

NAME = "sec2_memory"
TITLE = "Section 2: memory analysis"


def paper_engine(ctx: common.Context, strategy: str) -> dict:
  """The paper preset's engine compiled on 16 simulated devices (shared with other sections)."""
  def build():
    setup = common.paper()
    return measured.compile_engine(setup, common.seed_plans(setup)[strategy])
  return ctx.once(f"paper-engine-{strategy}", build)


def run(ctx: common.Context) -> common.Result:
  setup = common.paper()
  cfg, run_shape, hw = setup.model, setup.run, setup.hardware
  plans = common.seed_plans(setup)
  res = common.Result(NAME, TITLE)
  claims = [c for c in memory.seed_claims(cfg, run_shape, hw, plans["layerwise"])
            if c["claim"] != "cache utilisation"]

  def show(c):
    return (f"{c['true'] / 1e9:,.3f} B weights" if c["kind"] == "count"
            else f"{c['true'] / 1e6:,.1f} MB ({c['true'] / 2**30:,.3f} GiB)")

  res.add("## 2.1 and 2.2: the seed's figures against the stated architecture", "",
          f"Architecture: {cfg.layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads x "
          f"{cfg.head_dim}, d_ff {cfg.d_ff}, {cfg.dtype}; input {run_shape.batch} x "
          f"{run_shape.seq}. The true figures are arithmetic on these numbers (no measurement "
          f"needed); the step terms are for the seed's own chunk, {run_shape.batch} rows x 64 "
          f"tokens, at the layer-wise tp {plans['layerwise'].tp}.", "")
  res.add(*common.md_table(
      ["figure", common.SEED, "true for the stated model", "verdict", "arithmetic"],
      [[c["claim"], c["seed"], show(c), c["verdict"], c["how"]] for c in claims]))

  rows, data = [], {"claims": claims, "placements": {}}
  measured_ok = ctx.measure
  for name, plan in plans.items():
    pred = costmodel.predict(setup, plan)
    mem = pred.device_memory_bytes
    entry = {"plan": plan.to_dict(), "modelled": mem, "working_set": pred.working_set_bytes}
    m = paper_engine(ctx, name) if measured_ok else None
    if m:
      share = run_shape.batch * run_shape.seq * cfg.d_model * cfg.dtype_bytes // plan.devices
      entry["measured"] = {k: m[k] for k in ("argument_bytes", "output_bytes", "temp_bytes",
                                             "total_bytes")}
      entry["measured"]["weights_from_arguments"] = m["argument_bytes"] - share
    data["placements"][name] = entry
    meas = entry.get("measured", {})
    g = lambda k: common.gb(meas[k]) if k in meas else common.NOT_MEASURABLE  # noqa: E731
    rows += [
        [name, "weights per device", common.mb(mem["weights"]), g("weights_from_arguments")],
        [name, "KV cache per device (one microbatch's rows)", common.mb(mem["kv_cache"]), "-"],
        [name, "input share (1/N of the input)", common.gb(mem["input_share"]), "in arguments"],
        [name, "output share (1/N of the output)", common.gb(mem["output_share"]),
         g("output_bytes")],
        [name, "output loop buffer + step and pipeline buffers",
         common.gb(mem["output_loop_buffer"] + mem["step_and_pipeline_buffers"]),
         g("temp_bytes") + " (all temporaries, KV cache included)"],
        [name, "whole program per device / fits 80 GB", f"{common.gb(mem['total'])} / "
         f"{pred.fits_device_memory}", g("total_bytes")],
    ]
  res.add("## Memory per device of each placement", "",
          f"Modelled: {common.MODEL} (memory.program_bytes). Measured: the engine for the paper "
          f"preset compiled on 16 simulated CPU devices with abstract arrays (nothing "
          f"allocated); CPU XLA's buffer assignment, which GPU XLA need not match.", "")
  res.add(*common.md_table(["placement", "what", common.MODEL, common.CPU + " (compiled)"], rows))
  res.add("The weights fit easily (about 403 MB per device in both placements, 6.4 GB in all, "
          "not the seed's 60 GB). The input and output are split over all 16 devices (2.6 GB "
          "each per device), so both placements fit an 80 GB H100 with room for the whole "
          "batch's KV cache (5.2 GB per device).")
  res.data = data
  return res

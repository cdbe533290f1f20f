"""Seed section 5: what crosses the links, modelled and read from compiled HLO."""

from __future__ import annotations

from jaxpart import config
from jaxpart.cost import forward as costmodel
from jaxpart.cost import counts
from jaxpart.placement import planner
from experiments import common, measured, sec2_memory

NAME = "sec5_communication"
TITLE = "Section 5: communication"
KINDS = ("all-reduce", "collective-permute")


def tiny_plans() -> tuple[config.Setup, dict]:
  """float32 so CPU XLA moves the dtype the model assumes (it promotes bf16 collectives)."""
  setup = config.load_setup("tiny", overrides={"model.dtype": "float32"})
  return setup, {"baseline": planner.make_plan(setup, 16, "baseline", tp=8, pp=2),
                 "layerwise": planner.make_plan(setup, 16, "layerwise", chunk_tokens=16,
                                                chunk_rows=1)}


def compare(setup, plan, m) -> dict:
  """Model vs compiled HLO for one plan: collective bytes (loop, executed and static), FLOPs."""
  eb = {k: m["collective_element_bytes"][k] or setup.model.dtype_bytes for k in KINDS}
  fl = counts.plan_flops(setup.model, plan)
  out = {"element_bytes": eb, "kinds": {}}
  for k in KINDS:
    model = counts.collective_bytes(setup.model, plan, element_bytes=eb[k])
    out["kinds"][k] = {
        "model_executed": model["executed"][k], "hlo_executed": m["collective_loop_executed"][k],
        "model_static": model["static"][k], "hlo_static": m["collective_loop_static"][k]}
  out["flops"] = {"model_executed": fl["executed"], "hlo_executed": m["flops_executed"],
                  "model_static": fl["static"], "hlo_static": m["flops_static"],
                  "xla_cost_analysis": m["xla_cost_flops"]}
  out["outside_loops_hlo"] = {k: v for k, v in m["collective_outside_loops"].items() if v}
  return out


def _ratio(a, b):
  return f"{a / b:.4f}" if b else ("1 (both 0)" if not a else "inf")


def comparison_rows(label, plan, c) -> list[list[str]]:
  rows = []
  for k, v in c["kinds"].items():
    rows.append([label, f"{k} bytes/device (executed)", f"{v['model_executed']:,.0f}",
                 f"{v['hlo_executed']:,.0f}", _ratio(v["model_executed"], v["hlo_executed"])])
  f = c["flops"]
  rows.append([label, "matmul FLOPs/device (executed)", f"{f['model_executed']:,.0f}",
               f"{f['hlo_executed']:,.0f}", _ratio(f["model_executed"], f["hlo_executed"])])
  rows.append([label, "matmul FLOPs/device (static: all ticks, all KV blocks)",
               f"{f['model_static']:,.0f}", f"{f['hlo_static']:,.0f}",
               _ratio(f["model_static"], f["hlo_static"])])
  return rows


def run(ctx: common.Context) -> common.Result:
  setup = common.paper()
  cfg = setup.model
  plans = common.seed_plans(setup)
  preds = {k: costmodel.predict(setup, p) for k, p in plans.items()}
  res = common.Result(NAME, TITLE)
  full_act = setup.run.tokens * cfg.d_model * cfg.dtype_bytes
  rows = []
  for name, plan in plans.items():
    cb = counts.collective_bytes(cfg, plan)
    p = preds[name]
    per_layer_ar = cb["executed"]["all-reduce"] / plan.layers_per_stage
    rows += [
        [name, "TP all-reduce buffers per layer, per device",
         "~39 GB per layer" if name == "baseline" else "-",
         f"{common.gb(per_layer_ar)} (2 all-reduces x the layer's whole activation, "
         f"{common.gb(full_act)})" if plan.tp > 1 else "0 (tp 1)"],
        [name, "bytes a device sends for them (ring, 2(t-1)/t)", "-",
         common.gb(cb["link"]["all-reduce"] / plan.layers_per_stage) + " per layer"],
        [name, "pipeline transfer per unit", "~12 MB per chunk" if name == "layerwise" else "-",
         f"{common.mb(counts.unit_bytes(cfg, plan))} ({plan.rows} x {plan.chunk_tokens} x "
         f"{cfg.d_model} x {cfg.dtype_bytes} B), {plan.ticks:,} ticks"],
        [name, "modelled time: all-reduce / pipeline / compute", "overlapped (async)",
         f"{p.tp_comm_s:.3f} s / {p.pipe_comm_s:.3f} s / {p.compute_s:.3f} s"],
    ]
  res.add("## Communication of the seed's two placements (paper preset)", "")
  res.add(*common.md_table(["placement", "what", common.SEED, common.MODEL], rows))
  res.add("The seed's 39 GB is one layer's whole activation (128 x 10000 x 16384 x 2 B = 39.06 "
          "GiB). Megatron's forward all-reduces it twice per layer (after attention and after "
          "the MLP), so the baseline's buffers are about 78 GiB per layer per device, and a ring "
          "all-reduce at tp 8 sends 2 x 7/8 of that over each device's link. The seed's 12 MB "
          "per chunk is not what its own 128 x 64 chunk weighs (256 MiB). The engine's transfer "
          "is not overlapped with compute: it is issued after each tick's step.", "")

  data = {"modelled": {k: {"collective_bytes": counts.collective_bytes(cfg, p),
                           "prediction": preds[k].to_dict()} for k, p in plans.items()}}
  if ctx.measure:
    bar = ctx.bar(2, "sec5 compile tiny")
    tsetup, tplans = tiny_plans()
    vrows, data["validation_tiny_f32"] = [], {}
    for name, plan in tplans.items():
      c = compare(tsetup, plan, ctx.once(f"tiny-{name}", lambda s=tsetup, p=plan:
                                         measured.compile_engine(s, p)))
      bar.update(1)
      data["validation_tiny_f32"][name] = {"plan": plan.to_dict(), **c}
      vrows += comparison_rows(f"tiny f32 {name}: {plan.split}", plan, c)
    bar.close()
    prows, data["paper_compiled"] = [], {}
    for name, plan in plans.items():
      c = compare(setup, plan, sec2_memory.paper_engine(ctx, name))
      data["paper_compiled"][name] = c
      prows += comparison_rows(f"paper {name}", plan, c)
    res.add("## Model against compiled HLO", "",
            "Measured: the engine compiled on 16 simulated CPU devices, every collective's "
            "operand bytes and every dot's FLOPs times the trip counts of the loops around it "
            "(jaxpart.measure.compiled). Conditionals weighted as executed: the tick's compute branch "
            "runs on units / ticks of the ticks, attention's per-block branch on the share of "
            "KV blocks a chunk needs (counts.hlo_cond_weights); the static rows count every "
            "branch as taken. Only ops inside the tick loop are compared: the gather of the "
            "output to all devices after the loop is laid out by XLA's partitioner and is not "
            "part of the model (listed below).", "")
    res.add(*common.md_table(["program", "figure", "model", "compiled HLO", "model / HLO"],
                             vrows + prows))
    eb = data["paper_compiled"]["layerwise"]["element_bytes"]
    lw_flops = data["paper_compiled"]["layerwise"]["flops"]
    sizes = ", ".join(f"{k} {v}" for k, v in eb.items())
    res.add(f"The paper preset is bf16, but CPU XLA promotes bf16 all-reduces to float32, while "
            f"the forward-only engine sends and gathers bit patterns of the model's width "
            f"(element bytes as compiled: {sizes}), so each row uses the model at its kind's "
            f"compiled size; on a GPU the same program moves 2-byte elements, as the first table "
            f"assumes. XLA's own cost_analysis() counts each loop body once "
            f"(paper layer-wise: {lw_flops['xla_cost_analysis']:.3g}"
            f" FLOPs against {lw_flops['hlo_executed']:.3g} "
            f"executed), which is why the HLO is counted here with trip counts. Elementwise "
            f"FLOPs are in neither column.", "")
    outside = {f"{k} ({n})": v for n, d in data["paper_compiled"].items()
               for k, v in d["outside_loops_hlo"].items()}
    res.add("Collectives outside the loop (the output's final gather), paper preset, bytes per "
            "device as compiled: " + (", ".join(f"{k}: {common.gb(v)}" for k, v in outside.items())
                                      or "none"), "")
  res.data = data
  return res

"""Time per token of one layer-wise stage step against chunk size, H100 and H200 (modelled).

The step is the paper's layer at tp 4 (one layer per stage, 1 row), attending to a fixed KV
prefix. Two thresholds matter: the chunk past which the step's resident working set no longer
fits the 50 MB L2, and the chunk past which its arithmetic intensity (FLOPs per HBM byte, about
the chunk's token count because the 403 MB weight shard is re-read every step) passes the
ridge point peak_flops / hbm_bw. If GPU measurements of the same step exist in
results/gpu-h200.json they are shown beside the model.
"""

from __future__ import annotations

import json

from jaxpart.cost import forward as costmodel
from jaxpart.placement import memory
from jaxpart.placement import planner
from experiments import common

NAME = "chunk_sweep"
TITLE = "Chunk-size sweep of the layer-wise step (modelled, H100 and H200)"
CHUNKS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192)
KV_PREFIX = 4096
GPU_FILE = "gpu-h200.json"


def sweep(hardware: str) -> list[dict]:
  setup = common.paper(hardware)
  out = []
  for c in CHUNKS:
    plan = planner.make_plan(setup, 16, "layerwise", chunk_tokens=c, chunk_rows=1)
    st = costmodel.layer_step(setup, plan, KV_PREFIX + c)
    math_s = max(st["compute_s"], st["hbm_s"], st["l2_s"])
    out.append({"chunk_tokens": c, "working_set_bytes": memory.working_set_bytes(
                    setup.model, memory.step_shape(plan)),
                "fits_l2": bool(st["working_set_fits"]), "intensity": st["intensity"],
                "ridge": setup.hardware.ridge_flop_per_byte,
                "past_ridge": st["intensity"] >= setup.hardware.ridge_flop_per_byte,
                "step_s": st["step_s"], "step_no_allreduce_s": math_s,
                "us_per_token": st["step_s"] / c * 1e6,
                "us_per_token_no_allreduce": math_s / c * 1e6, "bound": st["bound"],
                "tflops_no_allreduce": st["flops"] / math_s / 1e12})
  return out


def gpu_points(ctx: common.Context) -> tuple[list[dict], str]:
  """(chunk_tokens, seconds per step) from the GPU script's JSON, if it is there and readable."""
  path = ctx.results_dir / GPU_FILE
  if not path.exists():
    return [], (f"no {GPU_FILE} in {common.repo_path(ctx.results_dir)}: no GPU measurement "
                f"to show")
  doc = json.loads(path.read_text())
  found = []

  def walk(o):
    if isinstance(o, dict):
      c = o.get("chunk_tokens", o.get("chunk"))
      t = next((o[k] for k in ("step_s", "median_s", "time_s", "seconds") if k in o), None)
      if isinstance(c, (int, float)) and isinstance(t, (int, float)) and t > 0:
        found.append({"chunk_tokens": int(c), "step_s": float(t),
                      "rows": int(o.get("rows", 1)), "tflops": o.get("tflops")})
      for v in o.values():
        walk(v)
    elif isinstance(o, list):
      for v in o:
        walk(v)

  walk(doc)
  if not found:
    return [], (f"{GPU_FILE} is present but holds no records with chunk_tokens and a step "
                f"time (step_s, median_s, time_s or seconds): not shown")
  return sorted(found, key=lambda r: r["chunk_tokens"]), f"GPU points read from {GPU_FILE}"


def run(ctx: common.Context) -> common.Result:
  res = common.Result(NAME, TITLE)
  data = {"kv_prefix": KV_PREFIX, "sweeps": {}}
  gpu, gpu_note = gpu_points(ctx)
  data["gpu_h200"] = gpu
  gpu_by_chunk = {g["chunk_tokens"]: g for g in gpu}
  for hw in ("h100", "h200"):
    pts = sweep(hw)
    data["sweeps"][hw] = pts
    first_overflow = next((p["chunk_tokens"] for p in pts if not p["fits_l2"]), None)
    first_ridge = next((p["chunk_tokens"] for p in pts if p["past_ridge"]), None)
    data["sweeps"][hw + "_thresholds"] = {"first_chunk_overflowing_l2": first_overflow,
                                          "first_chunk_past_ridge": first_ridge,
                                          "ridge_flop_per_byte": pts[0]["ridge"]}
    res.add(f"## {hw.upper()}: ridge {pts[0]['ridge']:.0f} FLOP/B; working set overflows the "
            f"L2 from {first_overflow} tokens; intensity passes the ridge from "
            f"{first_ridge} tokens", "")
    rows = []
    for p in pts:
      mark = []
      if p["chunk_tokens"] == first_overflow:
        mark.append("<- stops fitting L2")
      if p["chunk_tokens"] == first_ridge:
        mark.append("<- passes the ridge")
      g = gpu_by_chunk.get(p["chunk_tokens"]) if hw == "h200" else None
      rows.append([p["chunk_tokens"], common.mb(p["working_set_bytes"]), p["fits_l2"],
                   f"{p['intensity']:.0f}", p["bound"], f"{p['us_per_token_no_allreduce']:.4f}",
                   f"{p['us_per_token']:.4f}", f"{p['tflops_no_allreduce']:.0f}",
                   f"{g['step_s'] / (g['rows'] * g['chunk_tokens']) * 1e6:.4f}" if g else "-",
                   " ".join(mark)])
    res.add(*common.md_table(
        ["chunk tokens (1 row)", "working set", "fits L2", "FLOP per HBM byte", "bound",
         "us/token, step", "us/token, step + tp-4 all-reduces", "TFLOP/s (step)",
         "measured H200 us/token" if hw == "h200" else "measured", "marks"], rows))
  res.add(f"KV prefix per step: {KV_PREFIX} positions plus the chunk. {gpu_note}.", "",
          "Reading: the chunks that fit the L2 are the ones below the ridge, so the step the "
          "seed's method asks for is bound by re-reading the weights from HBM; time per token "
          "falls until the intensity passes the ridge (a few hundred tokens), by which point "
          "the working set is several times the L2. The L2 fit and compute efficiency pull "
          "in opposite directions at this width.")

  def draw(fig):
    ax = fig.add_subplot(111)
    for hw in ("h100", "h200"):
      pts = data["sweeps"][hw]
      ax.plot([p["chunk_tokens"] for p in pts], [p["us_per_token_no_allreduce"] for p in pts],
              marker="o", label=f"{hw} model (step)")
      th = data["sweeps"][hw + "_thresholds"]
      if th["first_chunk_past_ridge"]:
        ax.axvline(th["first_chunk_past_ridge"], ls=":", alpha=0.6)
      if th["first_chunk_overflowing_l2"]:
        ax.axvline(th["first_chunk_overflowing_l2"], ls="--", color="grey", alpha=0.6)
    if gpu:
      ax.plot([g["chunk_tokens"] for g in gpu],
              [g["step_s"] / (g["rows"] * g["chunk_tokens"]) * 1e6 for g in gpu],
              marker="x", ls="", label="H200 measured")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("chunk tokens (1 row)")
    ax.set_ylabel("us per token, one layer step at tp 4")
    ax.set_title("dashed: working set leaves L2; dotted: intensity passes ridge")
    ax.legend()

  common.plot(ctx, res, "chunk_sweep.png", draw)
  res.data = data
  return res

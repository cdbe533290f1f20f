"""Seed section 4: throughput, time per token, latency and energy of the two placements."""

from __future__ import annotations

import json

from jaxpart import config
from jaxpart.cost import forward as costmodel
from jaxpart.cost import decode as decode_cost
from jaxpart.measure import load
from jaxpart.placement import planner
from experiments import common, measured

NAME = "sec4_throughput"
TITLE = "Section 4: throughput"

SEED_TPS = {"baseline": 12800, "layerwise": 15360}
SEED_TPOT_MS = {"baseline": 0.078, "layerwise": 0.065}
CPU_REPEATS = 3
# Decode TPOT is modelled after a prefill of the run's prompt (paper: 10,000 tokens, batch 128),
# for this many generated tokens; each step feeds one new position's hidden vector (no vocab).
DECODE_NEW_TOKENS = 256
NOT_MEASURED_YET = "not measured yet"


def small_plans() -> tuple[config.Setup, dict]:
  """The small preset planned for this CPU's 2 MB L2, so layer-wise really streams chunks.

  Besides the seed's two placements (A: TP8 x PP2 whole-sequence microbatches, D: layer-wise
  TP4 x PP4 in L2-sized chunks) it times B (TP4 x PP4, whole sequences) and C (TP8 x PP2 in
  L2-sized chunks), so the causes experiment can separate the tp change from the chunking.
  """
  setup = config.load_setup("small", "cpu")
  return setup, {"baseline": planner.make_plan(setup, 16, "baseline", tp=8, pp=2),
                 "layerwise": planner.make_plan(setup, 16, "layerwise"),
                 "tp4_whole_sequence": planner.make_plan(setup, 16, "baseline", tp=4, pp=4),
                 "tp8_chunks": planner.make_plan(setup, 16, "layerwise", tp=8)}


GENERATE_RESULTS = "generate-cpu.json"   # written by scripts/generate_bench.py --json
GENERATE_ROWS = {"baseline": "baseline TP8xPP2 (16)", "layerwise": "layer-wise (16)"}


def measured_decode(ctx: common.Context) -> dict[str, str]:
  """Measured decode TPOT of the small preset on this machine's simulated devices, from
  scripts/generate_bench.py's results file when it is there (with its load note)."""
  path = ctx.results_dir / GENERATE_RESULTS
  if not path.exists():
    return {}
  data = json.loads(path.read_text())
  out = {}
  for key, name in GENERATE_ROWS.items():
    row = next((r for r in data["rows"] if r["preset"] == "small" and r["placement"] == name),
               None)
    if row:
      note = (row.get("load") or {}).get("note")
      out[key] = (f"{row['tpot_s'] * 1e3:.2f} ms ({common.CPU}, small preset, 16 simulated "
                  f"devices{'; ' + note if note else ''})")
  return out


def measure_small(ctx: common.Context) -> dict:
  """Interleaved CPU timing of the small preset's placements (once per run: causes reads it)."""
  return ctx.once("small-cpu-timing", lambda: _measure_small(ctx))


def cpu_figures(ctx: common.Context) -> dict:
  """The timing this section measured: from this run if it ran, else from its JSON in the
  results directory (so causes.md and sec4_throughput.md show the same runs), else measured
  now."""
  if "small-cpu-timing" not in ctx.memo:
    saved = common.read_result(ctx.results_dir, NAME)
    if saved and saved.get("measured_cpu"):
      ctx.memo["small-cpu-timing"] = {**saved["measured_cpu"], "source": f"{NAME}.json"}
  return measure_small(ctx)


def _measure_small(ctx: common.Context) -> dict:
  setup, plans = small_plans()
  out = {"setup": "small preset, float32, planned for the cpu hardware preset (2 MB L2)",
         "plans": {k: p.to_dict() for k, p in plans.items()}, "repeats": CPU_REPEATS}
  before = load.start("experiments: CPU timing of the small preset")
  bar = ctx.bar(len(plans) * (CPU_REPEATS + 2), "CPU timing (small preset)")
  timing = measured.time_forward(setup, plans, CPU_REPEATS, progress=bar.update)
  bar.close()
  out["load"] = load.finish(before)
  tokens = setup.run.tokens
  out["runs"] = {k: {**v, "tokens_per_s": tokens / v["median_s"],
                     "total_flops_executed": v["flops_per_device_executed"] * plans[k].devices}
                 for k, v in timing.items()}
  b, lw = out["runs"]["baseline"], out["runs"]["layerwise"]
  out["ratio_layerwise_over_baseline_tps"] = b["median_s"] / lw["median_s"]
  # Rounds are interleaved, so round r of each placement ran back to back: its ratio spread
  # shows how much the shared machine's load moved the figure.
  per_round = [tb / tl for tb, tl in zip(b["runs"], lw["runs"])]
  out["ratio_per_round"] = per_round
  out["ratio_layerwise_over_baseline_total_flops"] = (lw["total_flops_executed"]
                                                      / b["total_flops_executed"])
  return out


def run(ctx: common.Context) -> common.Result:
  setup = common.paper()
  plans = common.seed_plans(setup)
  preds = {k: costmodel.predict(setup, p) for k, p in plans.items()}
  res = common.Result(NAME, TITLE)
  cpu = measure_small(ctx) if ctx.measure else None
  rows = []
  for name in ("baseline", "layerwise"):
    p = preds[name]  # the CPU runs hold two more placements, shown in causes.md
    c = cpu["runs"][name] if cpu else None
    rows.append([name, f"{SEED_TPS[name]:,}", f"{SEED_TPOT_MS[name]}",
                 f"{p.tokens_per_s:,.0f}", f"{p.seed_time_per_token_ms:.5f}",
                 f"{p.sequence_latency_s * 1e3:,.1f} ms", f"{p.total_s:.3f} s",
                 f"{c['median_s']:.3f} s ({c['tokens_per_s']:,.0f} tok/s)" if c
                 else common.NOT_MEASURABLE])
  res.add("## 4.1 Throughput", "",
          "TPOT as the seed defines it is 1000 / TPS in ms (the aggregate time per token), not "
          "a per-token latency; the real latency of one sequence is shown beside it.", "")
  res.add(*common.md_table(
      ["placement", "seed TPS", "seed TPOT ms", "modelled TPS (16 x H100)",
       "modelled 1/TPS ms", "modelled per-sequence latency", "modelled whole batch",
       f"{common.CPU}: small preset, median of {CPU_REPEATS}"], rows))
  decode = {k: decode_cost.predict_decode(setup, p, DECODE_NEW_TOKENS) for k, p in plans.items()}
  measured_tpot = measured_decode(ctx)
  res.add("", f"Time per output token as inference engineers mean it (modelled decode: the "
          f"batch of {setup.run.batch} after a {setup.run.seq:,}-token prefill, "
          f"{DECODE_NEW_TOKENS} new tokens, one new position's hidden vector per step; "
          f"M decode microbatches chase each other round the S stages, so a step takes S "
          f"ticks, each reading the stage's weights and one microbatch's KV cache from HBM):", "")
  res.add(*common.md_table(
      ["placement", "seed TPOT ms", "modelled 1/TPS ms", "modelled decode TPOT ms",
       "HBM-read bound ms", "TPOT / bound", "decode tokens/s", "M x rows",
       "measured decode TPOT"],
      [[k, f"{SEED_TPOT_MS[k]}", f"{preds[k].seed_time_per_token_ms:.5f}",
        f"{d.tpot_s * 1e3:.3f}", f"{d.hbm_bound_s * 1e3:.3f}", f"{d.bound_ratio:.2f}",
        f"{d.decode_tokens_per_s:,.0f}", f"{d.microbatches} x {d.rows}",
        measured_tpot.get(k, NOT_MEASURED_YET)]
       for k, d in decode.items()]))
  b, l = preds["baseline"], preds["layerwise"]
  gain = l.tokens_per_s / b.tokens_per_s - 1
  energy = l.energy_per_token_j / b.energy_per_token_j - 1
  peak = 16 * setup.hardware.peak_flops
  seed_util = 12800 * b.useful_flops_total / (setup.run.tokens * peak)
  rows2 = [
      ["throughput change, layer-wise vs baseline", "+20%", common.signed_pct(gain),
       f"{common.cpu_ratio_text(cpu)} (total executed FLOPs ratio "
       f"{cpu['ratio_layerwise_over_baseline_total_flops']:.2f})"
       if cpu else
       common.NOT_MEASURABLE],
      ["1/TPS change", "-16.67%",
       common.signed_pct(l.seed_time_per_token_ms / b.seed_time_per_token_ms - 1), "-"],
      ["per-sequence latency change", "(not stated)",
       common.signed_pct(l.sequence_latency_s / b.sequence_latency_s - 1), "-"],
      ["energy per token change", "-16.7%", common.signed_pct(energy), common.NOT_MEASURABLE],
      ["energy per token", "(not stated)",
       f"{b.energy_per_token_j * 1e3:.2f} -> {l.energy_per_token_j * 1e3:.2f} mJ", "-"],
      ["model FLOP utilisation", "12,800 tok/s on 16 H100",
       f"baseline {b.mfu:.1%}, layer-wise {l.mfu:.1%}; the seed's 12,800 tok/s would be "
       f"{seed_util:.2%} of 16 x 989 TFLOP/s", "-"],
  ]
  res.add("## 4.2 Detailed metrics", "")
  res.add(*common.md_table(["metric", common.SEED, common.MODEL, common.CPU], rows2))
  _, small = small_plans()
  visits = {k: common.attention_visits(small[k]) for k in ("baseline", "layerwise")}
  res.add(f"CPU column: {common.CPU_NOTE}. The small preset (d_model 512) is planned for this "
          "CPU's 2 MB L2, float32. Its time ratio reflects total work on the shared cores and "
          "XLA:CPU overheads, not 16-way parallel speed, and differs between machines; the "
          "FLOPs ratio says how much of it is arithmetic (attention skips the KV blocks after "
          "each query tile: the baseline computes "
          + ", layer-wise ".join(f"{v:,} of {n:,} (tile, block) pairs" for v, n in
                                 visits.values())
          + " per sequence)."
          + (f" CPU timings: {common.load_note(cpu)}." if cpu else ""), "",
          "Where the modelled times go (per device, summed over the run):", "")
  res.add(*common.md_table(
      ["placement", "compute", "HBM", "TP all-reduce", "pipeline", "waiting", "bound by",
       "arith. intensity"],
      [[k, f"{p.compute_s:.3f} s", f"{p.hbm_s:.3f} s", f"{p.tp_comm_s:.3f} s",
        f"{p.pipe_comm_s:.3f} s", f"{p.bubble_s:.3f} s", p.bound,
        f"{p.arithmetic_intensity:.0f} FLOP/B"] for k, p in preds.items()]))
  res.data = {"modelled": {k: p.to_dict() for k, p in preds.items()},
              "modelled_decode": {k: d.to_dict() for k, d in decode.items()},
              "seed": {"tps": SEED_TPS, "tpot_ms": SEED_TPOT_MS},
              "modelled_gain": gain, "modelled_energy_change": energy,
              "seed_12800_fraction_of_peak": seed_util, "measured_cpu": cpu}
  return res

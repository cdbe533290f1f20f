"""`jaxpart compare`: the main job. Baseline TPxPP vs layer-wise on the same devices, each
checked against the single-device reference, timed interleaved, shown like the seed's table 4.1."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpart import config, validate
from jaxpart.measure import bench
from jaxpart.runtime import distributed
from jaxpart.placement import planner
from jaxpart.runtime import runs
from jaxpart.runtime import sizeguard
from jaxpart.commands import _common

NAME = "compare"
HELP = "baseline (TP x PP) vs layer-wise placement: correctness and throughput, one table"
DISTRIBUTED = True


def add_arguments(p):
  _common.add_setup_args(p, default_preset="small")
  g = p.add_argument_group("placements")
  g.add_argument("--devices", type=int, default=16)
  g.add_argument("--tp", type=int, default=None, help="baseline tp (default devices / pp)")
  g.add_argument("--pp", type=int, default=None, help="baseline stages (default 2)")
  g.add_argument("--microbatches", type=int, default=None, help="baseline microbatches")
  g.add_argument("--chunk-tokens", type=int, default=32,
                 help="layer-wise chunk length (default 32: 32 chunks for the small preset)")
  g.add_argument("--cache-mb", type=float, default=None)
  p.add_argument("--repeats", type=int, default=5, help="timed runs each (median reported)")
  p.add_argument("--seed", type=int, default=0)
  _common.add_json_arg(p)


def _plans(args, setup):
  pp = args.pp or (2 if args.devices % 2 == 0 and setup.model.layers % 2 == 0 else 1)
  tp = args.tp or args.devices // pp
  cache = None if args.cache_mb is None else args.cache_mb * 1e6
  base = planner.make_plan(setup, args.devices, "baseline", tp=tp, pp=pp,
                           microbatches=args.microbatches, cache_bytes=cache)
  lw = planner.make_plan(setup, args.devices, "layerwise", chunk_tokens=args.chunk_tokens,
                         cache_bytes=cache)
  return {"baseline": base, "layerwise": lw}


def run(args) -> int:
  if args.repeats < 1:
    raise config.ConfigError(f"--repeats = {args.repeats}: must be at least 1")
  setup = _common.setup_from(args)
  plans = _plans(args, setup)
  sizeguard.check_fits(setup, plans.values(), "compare", 4)
  params_h, x_h = runs.host_params(setup, args.seed), runs.host_input(setup, args.seed)
  ref_bf = runs.reference(setup, params_h, x_h)
  ref_32 = runs.reference(setup, params_h, x_h, jnp.float32)
  validate.check_finite(f"output of the single-device reference ({setup.model.dtype})", ref_bf)
  validate.check_finite("output of the single-device reference (float32)", ref_32)
  tol_bf = runs.bf16_tolerance(setup, params_h, x_h)

  rows, ok = {}, True
  fns = {}
  for name, plan in plans.items():
    placed = runs.place(setup, plan, params_h, x_h)
    placed32 = runs.place(setup, plan, params_h, x_h, dtype=jnp.float32)
    y_bf, y_32 = runs.fetch(placed()), runs.fetch(placed32())
    validate.check_finite(f"output of the {name} placement ({setup.model.dtype})", y_bf)
    validate.check_finite(f"output of the {name} placement (float32)", y_32)
    e_bf = runs.errors(y_bf, ref_bf)
    e_32 = runs.errors(y_32, ref_32)
    good = (e_bf["finite"] and e_bf["max_abs_err"] <= tol_bf
            and e_32["max_rel_err"] <= runs.F32_REL_TOL)
    ok &= good
    rows[name] = {"plan": plan.to_dict(), "bf16": e_bf, "float32": e_32, "ok": good}
    fns[name] = placed

  dev0 = jax.local_devices()[0]
  p0, x0 = jax.device_put(params_h, dev0), jax.device_put(x_h, dev0)
  ref_fn = jax.jit(runs.reference_forward(setup.model))
  fns["reference"] = lambda: ref_fn(p0, x0)
  timing = bench.time_interleaved(fns, repeats=args.repeats, warmup=1)

  tokens = setup.run.tokens
  for name, t in timing.items():
    entry = rows.setdefault(name, {"devices": 1})
    entry.update(median_s=t["median_s"], runs_s=t["runs"], tokens_per_s=tokens / t["median_s"],
                 time_per_token_ms_seed_def=1e3 * t["median_s"] / tokens,
                 latency_per_sequence_ms=1e3 * t["median_s"])
  out = {"preset": setup.preset, "devices": args.devices, "processes": jax.process_count(),
         "platform": dev0.platform,
         "bf16_tolerance_abs": tol_bf, "float32_tolerance_rel": runs.F32_REL_TOL,
         "results": rows,
         "ratios": {"layerwise_over_baseline_throughput":
                    rows["layerwise"]["tokens_per_s"] / rows["baseline"]["tokens_per_s"],
                    "layerwise_over_reference_time":
                    rows["layerwise"]["median_s"] / rows["reference"]["median_s"],
                    "baseline_over_reference_time":
                    rows["baseline"]["median_s"] / rows["reference"]["median_s"]}}
  if not distributed.is_main():
    return 0 if ok else 1
  if args.json:
    _common.emit_json(out)
  else:
    _print(setup, out)
  return 0 if ok else 1


def _print(setup, out):
  res = out["results"]
  base_tps = res["baseline"]["tokens_per_s"]
  label = {"baseline": lambda p: f"Baseline (TP={p['tp']}, PP={p['stages']})",
           "layerwise": lambda p: f"Layer-wise ({p['stages']} stages x TP={p['tp']})"}
  table = []
  for name in ("baseline", "layerwise", "reference"):
    r = res[name]
    method = label[name](r["plan"]) if "plan" in r else "Single-device reference"
    devices = r["plan"]["devices"] if "plan" in r else 1
    err = (f"{r['bf16']['max_abs_err']:.2e} / {r['float32']['max_rel_err']:.1e}"
           if "plan" in r else "-")
    gain = "-" if name == "baseline" else f"{100 * (r['tokens_per_s'] / base_tps - 1):+.0f}%"
    table.append([f"{setup.model.family.display} {setup.model.layers}-layer", method, devices,
                  f"{r['tokens_per_s']:,.0f}", f"{r['time_per_token_ms_seed_def']:.4f}",
                  f"{r['latency_per_sequence_ms']:,.1f}", err, gain])
  print(f"preset {setup.preset}: d_model {setup.model.d_model}, batch {setup.run.batch} x seq "
        f"{setup.run.seq}")
  for name in ("baseline", "layerwise"):
    p = res[name]["plan"]
    print(f"  {name}: mesh {p['stages']} x {p['tp']}, {p['derived']['split']}, bubble "
          f"{p['derived']['bubble_fraction']:.1%}")
  print(_common.table(table, ["Model", "Method", "Devices", "TPS (tok/s)", "TPOT* (ms)",
                              "Seq latency (ms)", "max err bf16 abs / f32 rel", "vs baseline"]))
  sim = out["platform"] == "cpu"
  procs = f", {out['processes']} processes" if out["processes"] > 1 else ""
  print(f"All figures measured on this machine ({out['platform']}{procs}"
        f"{', simulated devices sharing the host cores: times measure total work and overhead, not parallel speed-up' if sim else ''}); "
        f"median of timed runs, interleaved.")
  print("* TPOT as the seed defines it: 1 / aggregate tokens per second (not time per output "
        "token). Seq latency: wall time of one forward of the whole batch.")
  print(f"Correctness: bf16 tolerance {out['bf16_tolerance_abs']:.2e} abs (twice the bf16 "
        f"reference's own distance from float32), float32 tolerance "
        f"{out['float32_tolerance_rel']:g} rel: " +
        ", ".join(f"{n} {'OK' if res[n]['ok'] else 'MISMATCH'}" for n in ("baseline", "layerwise")))

"""`jaxpart bench`: time a Plan against the single-device reference and plain GSPMD.

One process, one set of parameters and inputs, each program compiled once and then timed
interleaved (median of --repeats runs after --warmup). Figures the compiled program knows
(memory, FLOPs, collective bytes) do not depend on the machine; wall times do: on the CPU
simulation 16 devices share the host's cores, so a ratio measures total work and overhead,
not parallel speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from tqdm import tqdm

from jaxpart import config, jsonable, validate
from jaxpart.measure import bench
from jaxpart.runtime import distributed
from jaxpart.measure import hlo
from jaxpart.measure import compiled as measure
from jaxpart.placement import memory
from jaxpart.runtime import sizeguard
from jaxpart.measure import tracing
from jaxpart.commands import _common
from jaxpart.commands._common import fmt_bytes, table
from jaxpart.config import ConfigError
from jaxpart.placement.plan import PlanError

NAME = "bench"
HELP = ("benchmark a placement: tokens/s, compiled memory, FLOPs and collective bytes, against "
        "the single-device reference and plain GSPMD")
DISTRIBUTED = True

KIND_ABBREV = {"all-reduce": "all-reduce", "collective-permute": "permute",
               "all-gather": "all-gather", "reduce-scatter": "reduce-scatter",
               "all-to-all": "all-to-all"}


def _int_list(flag: str, text: str) -> list[int]:
  try:
    out = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    out = []
  if not out or any(v <= 0 for v in out):
    raise ConfigError(f"{flag} = {text!r}: must be a comma-separated list of positive integers, "
                      f"for example 256,512")
  return out


def add_arguments(p):
  _common.add_setup_args(p)
  _common.add_plan_args(p)
  g = p.add_argument_group("benchmark")
  g.add_argument("--repeats", type=int, default=5, help="timed runs per program (median)")
  g.add_argument("--warmup", type=int, default=1, help="untimed runs per program first")
  g.add_argument("--seed", type=int, default=0, help="parameter and input key")
  g.add_argument("--no-reference", action="store_true", help="skip the 1-device reference")
  g.add_argument("--no-gspmd", action="store_true", help="skip the plain-GSPMD comparison")
  g.add_argument("--no-own-steps", action="store_true",
                 help="skip own-steps: the engine's stage steps back to back on one device, "
                      "without collectives or the scan (engine/own-steps is the pipeline's cost)")
  g.add_argument("--memory-seqs", default=None, metavar="S1,S2,...",
                 help="also compile (not run) the forward and one chunk step at these seq "
                      "lengths and print per-device temp bytes beside the predicted working set")
  g.add_argument("--memory-only", action="store_true",
                 help="with --memory-seqs: compile and report memory only, time nothing")
  g.add_argument("--sweep", action="store_true",
                 help="instead of one point: every device count in --device-counts x chunk in "
                      "--chunks, each timed against the reference; one JSON line per point")
  g.add_argument("--device-counts", default="1,2,4,8,16", metavar="N1,N2,...")
  g.add_argument("--chunks", default="32,64,128", metavar="C1,C2,...",
                 help="layer-wise chunk tokens for --sweep")
  g.add_argument("--jsonl", default=None, metavar="OUT.jsonl", help="--sweep output file")
  g.add_argument("--trace", default=None, metavar="DIR",
                 help="write a jax.profiler trace of the compiled and timed runs under DIR "
                      "(Perfetto or XProf)")
  _common.add_json_arg(p, to_file=True)


def run(args) -> int:
  if args.repeats < 1 or args.warmup < 0:
    raise PlanError(f"--repeats = {args.repeats}, --warmup = {args.warmup}: need repeats >= 1 "
                    f"and warmup >= 0")
  seqs = _int_list("--memory-seqs", args.memory_seqs) if args.memory_seqs else None
  if args.memory_only and not seqs:
    raise PlanError("--memory-only needs --memory-seqs S1,S2,...")
  tracing.check_dir("--trace", args.trace)
  setup = _common.setup_from(args)
  if args.sweep:
    return _sweep(args, setup)
  plan = _common.plan_from(args, setup)
  if not args.memory_only:   # compiling on ShapeDtypeStructs allocates nothing on the host
    sizeguard.check_fits(setup, [plan], "bench")
  if args.memory_only:
    result = {"preset": setup.preset, "plan": plan.to_dict()}
  else:
    point = bench.bench_point(setup, plan, _options(args))
    _check_outputs(point.variants)
    result = point.record
  if seqs:
    result["memory_by_seq"] = memory_by_seq(setup, args, seqs)
  if not distributed.is_main():
    return 0
  if args.json:
    _common.emit_json(result, args.json)
    if args.json == "-":
      return 0
  if not args.memory_only:
    print_point(result)
  if seqs:
    print_memory(result["memory_by_seq"])
  return 0


def _check_outputs(variants) -> None:
  """A program whose output holds NaN or Inf fails the command, naming the program."""
  for v in variants:
    if v.out is not None:
      validate.check_finite(f"output of bench program {v.name!r}", v.out)


def _options(args, **changes) -> bench.BenchOptions:
  """The typed options measure.bench takes, from the flags."""
  return dataclasses.replace(bench.BenchOptions(
      repeats=args.repeats, warmup=args.warmup, seed=args.seed,
      reference=not args.no_reference, gspmd=not args.no_gspmd,
      own_steps=not args.no_own_steps, trace=args.trace), **changes)


def print_point(result: dict) -> None:
  plan = result["plan"]
  print(f"{result['preset']}: {plan['strategy']} on {plan['devices']} devices "
        f"({plan['stages']} stages x tp {plan['tp']}, {plan['derived']['split']}); "
        f"median of {result['repeats']} interleaved runs after {result['warmup']} warm-up")
  print(f"measured on {result['machine_note']}")
  if result["load"]["under_load"]:
    print(f"every time below was {result['load']['note']}")
  rows = []
  for r in result["variants"]:
    err = r["max_abs_err_vs_reference"]
    rows.append([r["name"], r["devices"], f"{r['median_s'] * 1e3:,.1f}",
                 f"{r['cpu_median_s'] * 1e3:,.1f}",
                 f"{r['tokens_per_s']:,.0f}", f"{r['time_per_token_s'] * 1e6:,.2f}",
                 f"{r['latency_s'] * 1e3:,.1f}", f"{r['achieved_flops_per_s'] / 1e9:,.2f}",
                 "-" if err is None else f"{err:.2e}"])
  print(table(rows, ["program", "devices", "median ms", "cpu ms", "tokens/s", "time/token us",
                     "latency ms", "GFLOP/s", "max |err|"]))
  print()
  rows = []
  for r in result["variants"]:
    rows.append([r["name"], fmt_bytes(r["argument_bytes"]), fmt_bytes(r["output_bytes"]),
                 fmt_bytes(r["temp_bytes"]), f"{r['compiled_flops_per_device'] / 1e6:,.2f}",
                 f"{r['xla_cost_flops'] / 1e6:,.2f}"]
                + [fmt_bytes(r["collective_bytes"][k]) for k in hlo.COLLECTIVE_KINDS])
  print(table(rows, ["per device", "argument", "output", "temp", "MFLOP (HLO)",
                     "MFLOP (xla)"] + [KIND_ABBREV[k] for k in hlo.COLLECTIVE_KINDS]))
  print("MFLOP (HLO): matmul FLOPs per device per call, loop trips applied; MFLOP (xla): "
        "cost_analysis(), which counts each loop body once. GFLOP/s: useful model FLOPs "
        f"({result['variants'][0]['model_flops'] / 1e9:,.3f} GFLOP per call) / median time. "
        "time/token: the seed's TPOT, 1 / tokens/s. latency: one call (the whole batch). "
        "cpu ms: process CPU time of a call, all threads (on a shared host, wall time favours "
        "the program with more threads: 16 simulated devices get more of a loaded CPU than 1).")
  print()
  m = result["megatron"]
  print(table([[KIND_ABBREV[k], fmt_bytes(m["measured_loop"][k]), fmt_bytes(m["formula"][k]),
                "-" if m["ratio"][k] is None else f"{m['ratio'][k]:.3f}",
                fmt_bytes(m["outside_loops"][k])]
               for k in hlo.COLLECTIVE_KINDS
               if m["formula"][k] or m["measured_loop"][k] or m["outside_loops"][k]],
              ["engine collectives", "in tick loop", "Megatron formula", "measured/formula",
               "outside loops"]))
  sizes = ", ".join(f"{KIND_ABBREV[k]} {m['element_bytes'][k]}" for k in hlo.COLLECTIVE_KINDS
                    if m["formula"][k] or m["measured_loop"][k])
  print(f"per device per forward, at the element bytes compiled ({sizes}: XLA on CPU promotes "
        "bf16 all-reduces to f32; the forward-only engine sends bit patterns). Formula: TP 2 "
        "all-reduces of a unit per layer per unit; pipeline one unit per tick (units + bubble "
        "ticks). Outside loops: the output's gather from the last stage.")
  print()
  print(table([[k, f"{v:.3f}"] for k, v in result["ratios"].items()], ["ratio of medians", "x"]))


def memory_by_seq(setup, args, seqs: list[int]) -> list[dict]:
  """Compiled per-device temp bytes of the forward and of one chunk step at each seq."""
  out = []
  for seq in tqdm(seqs, desc="memory by seq", file=sys.stderr, leave=False):
    s = dataclasses.replace(setup, run=config.RunShape(batch=setup.run.batch, seq=seq))
    plan = _common.plan_from(args, s)
    fwd = measure.forward_memory(s, plan)
    step = measure.stage_step_stats(s.model, plan)
    out.append({"seq": seq, "chunk_tokens": plan.chunk_tokens, "rows": plan.rows,
                "forward_temp_bytes": fwd["temp_bytes"],
                "forward_output_bytes": fwd["output_bytes"],
                "forward_argument_bytes": fwd["argument_bytes"],
                "forward_total_bytes": fwd["total_bytes"],
                "predicted_hbm_bytes": memory.predicted_hbm_bytes(s.model, s.run, plan),
                "step_temp_bytes": step["temp_bytes"],
                "step_kv_cache_bytes": step["alias_bytes"],
                "predicted_working_set_bytes": plan.predicted_working_set_bytes,
                "step_temp_over_predicted": step["temp_bytes"] / plan.predicted_working_set_bytes})
  return out


def print_memory(rows: list[dict]) -> None:
  print()
  print(table([[r["seq"], f"{r['rows']}x{r['chunk_tokens']}", fmt_bytes(r["forward_argument_bytes"]),
                fmt_bytes(r["forward_temp_bytes"]), fmt_bytes(r["forward_output_bytes"]),
                fmt_bytes(r["forward_total_bytes"]), fmt_bytes(r["predicted_hbm_bytes"]),
                f"{r['forward_total_bytes'] / r['predicted_hbm_bytes']:.3f}",
                fmt_bytes(r["step_temp_bytes"]), fmt_bytes(r["predicted_working_set_bytes"]),
                f"{r['step_temp_over_predicted']:.2f}"] for r in rows],
               ["seq", "chunk", "fwd args", "fwd temp", "fwd output", "fwd total",
                "predicted HBM", "total/pred", "step temp", "predicted WS", "step/pred"]))
  print("per device, from memory_analysis() of the compiled programs (compiled, not run). "
        "fwd: the whole forward (total = arguments + output + temp - aliased); predicted HBM: "
        "the planner's memory.program_bytes; step: one engine.stage_step on local shard shapes.")


def _sweep(args, setup) -> int:
  counts = _int_list("--device-counts", args.device_counts)
  chunks = _int_list("--chunks", args.chunks) if args.strategy == "layerwise" else [None]
  params_x = bench.inputs(setup, args.seed)
  options = _options(args, gspmd=False)
  main = distributed.is_main()  # every process measures; only process 0 writes
  sink = (open(args.jsonl, "w") if args.jsonl else sys.stdout) if main else open(os.devnull, "w")
  points = [(n, c) for n in counts for c in chunks]
  ok, reference = 0, None
  try:
    for n, c in tqdm(points, desc="sweep", file=sys.stderr):
      fixed = {}
      if args.strategy == "baseline":
        pp = min(args.pp or 2, n)
        fixed = {"pp": pp, "tp": n // pp}
      elif c is not None:
        fixed = {"chunk_tokens": c}
      try:
        plan = _common.plan_from(argparse_ns(args, devices=n), setup, **fixed)
      except PlanError as e:
        print(f"skip devices={n} chunk={c}: {e}", file=sys.stderr)
        continue
      point = bench.bench_point(setup, plan, options, params_x, reference)
      _check_outputs(point.variants)
      reference = reference or point.reference
      res = point.record
      eng = res["variants"][0]
      line = {"devices": n, "chunk_tokens": plan.chunk_tokens, "strategy": plan.strategy,
              "stages": plan.stages, "tp": plan.tp, "units": plan.units,
              "bubble_fraction": plan.bubble_fraction, **{k: v for k, v in eng.items()
                                                          if k != "runs_s"},
              "ratios": res["ratios"], "megatron": res["megatron"],
              "machine_note": res["machine_note"], "load": res["load"]}
      sink.write(jsonable.dumps(line) + "\n")
      sink.flush()
      ok += 1
  finally:
    if sink is not sys.stdout:
      sink.close()
    if main and args.jsonl:
      print(f"wrote {ok} points to {args.jsonl}", file=sys.stderr)
  return 0 if ok else 2


def argparse_ns(args, **changes):
  return argparse.Namespace(**{**vars(args), **changes})

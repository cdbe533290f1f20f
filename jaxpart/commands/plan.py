"""`jaxpart plan`: the Plan for a model on N devices, and the working set it predicts.

With `--strategy auto --measure`, the cost model's top candidates are also compiled and timed
here (jaxpart.measure.autotune), and the measured best is the plan shown.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from jaxpart.cost import forward as costmodel
from jaxpart.measure import autotune
from jaxpart.placement import kv_blocks
from jaxpart.placement import memory
from jaxpart.placement import planner
from jaxpart.commands import _common, _modeldir
from jaxpart.placement.plan import PlanError

NAME = "plan"
HELP = "partition a model over N devices (baseline TPxPP, layer-wise, or auto) and show the Plan"


def add_arguments(p):
  _common.add_setup_args(p, default_preset="paper")
  _modeldir.add_argument(p)
  _common.add_plan_args(p)
  p.add_argument("--top", type=int, default=None,
                 help=f"auto: how many ranked candidates to show (default 5), or with --measure "
                      f"to time (default {MEASURE_TOP})")
  g = p.add_argument_group("measured autotuning (auto only)")
  g.add_argument("--measure", action="store_true",
                 help="compile and time the top candidates on the devices present, interleaved "
                      "with the single-device reference; pick the measured best")
  g.add_argument("--repeats", type=int, default=None, help="--measure: timed runs (default 5)")
  g.add_argument("--warmup", type=int, default=None,
                 help="--measure: untimed runs first (default 1)")
  g.add_argument("--seed", type=int, default=None,
                 help="--measure: parameter and input key (default 0)")
  add_new_tokens_arg(p)
  _common.add_json_arg(p)


MEASURE_TOP = 8
MEASURE_ONLY = ("repeats", "warmup", "seed")


def _check_measure_flags(args) -> None:
  if args.measure and args.strategy != "auto":
    raise PlanError(f"--measure applies to --strategy auto only (got --strategy "
                    f"{args.strategy}); time one placement with jaxpart bench")
  given = [f"--{n}" for n in MEASURE_ONLY if getattr(args, n) is not None]
  if given and not args.measure:
    raise PlanError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply "
                    f"without --measure")


def _plan(args, setup):
  """The Plan, and for auto the ranked candidates and how they were ranked."""
  _check_measure_flags(args)
  if args.strategy != "auto":
    if args.top is not None:
      raise PlanError(f"--top applies to --strategy auto only (got --strategy {args.strategy})")
    return _common.plan_from(args, setup), [], ""
  planner.check_options("auto", microbatches=args.microbatches, chunk_tokens=args.chunk_tokens,
                        chunk_rows=args.chunk_rows, kv_block=args.kv_block)
  top = (MEASURE_TOP if args.measure else 5) if args.top is None else args.top
  if top < 1:
    raise PlanError(f"--top = {top}: must be at least 1")
  cache = None if args.cache_mb is None else args.cache_mb * 1e6
  if args.measure:
    ranked, how = autotune.top_candidates(setup, args.devices, top, cache, tp=args.tp,
                                          pp=args.pp)
    return ranked[0][1], ranked, how
  best, ranked, how = planner.plan_auto(setup, args.devices, cache, top, tp=args.tp, pp=args.pp,
                                         scorer=costmodel.SCORER)
  return best, ranked, how


def _measure(args, setup, ranked) -> dict:
  repeats = 5 if args.repeats is None else args.repeats
  warmup = 1 if args.warmup is None else args.warmup
  total = len(ranked) + 1 + (len(ranked) + 1) * (repeats + warmup)
  with tqdm(total=total, desc=f"plan --measure {len(ranked)} candidates", unit="step",
            file=sys.stderr, leave=False) as bar:
    return autotune.measure(setup, ranked, repeats=repeats, warmup=warmup,
                            seed=0 if args.seed is None else args.seed, progress=bar.update)


def add_new_tokens_arg(p) -> None:
  p.add_argument("--new-tokens", type=int, default=None, metavar="K",
                 help=f"tokens decoded after the prompt, for the whole batch's KV cache in "
                      f"decode memory (default {memory.DECODE_NEW_TOKENS})")


def new_tokens_from(args) -> int:
  k = memory.DECODE_NEW_TOKENS if args.new_tokens is None else args.new_tokens
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise PlanError(f"--new-tokens = {k!r}: must be a positive integer")
  return k


def breakdown(setup, plan, new_tokens: int = memory.DECODE_NEW_TOKENS) -> dict:
  """Everything the text and JSON show beside the Plan itself."""
  cfg = setup.model
  step = memory.step_shape(plan)
  ws = memory.step_working_set(cfg, step)
  return {
      "working_set_terms": ws,
      "working_set_phases": memory.step_phase_bytes(cfg, step),
      "working_set_total": sum(ws.values()),
      "streamed_per_run_per_layer": memory.run_streamed_bytes(
          cfg, plan.batch, plan.seq, plan.rows, plan.chunk_tokens, plan.tp),
      "per_device": memory.per_device(cfg, setup.run, plan, setup.hardware.hbm_bytes,
                                      new_tokens),
      "kv_pool": kv_blocks.serving_pool(cfg, setup.run, plan, setup.hardware.hbm_bytes,
                                        setup.run.seq),
  }


def pool_line(pool: dict) -> str:
  """The serving KV pool the planner leaves per device, as plan and memory print it."""
  return (f"serving KV pool (HBM left after weights and a {pool['step_tokens']}-token step's "
          f"buffers: {fmt(pool['bytes_left'])} per device): {pool['blocks']:,} blocks x "
          f"{pool['block_tokens']} = {pool['tokens']:,} tokens, {pool['context_sequences']:,} "
          f"sequences of the {pool['context']:,}-token context")


def run(args) -> int:
  setup = _common.setup_from(args)
  plan, ranked, how = _plan(args, setup)
  new_tokens = new_tokens_from(args)
  measured = _measure(args, setup, ranked) if args.measure else None
  if measured:
    plan = ranked[measured["best"]][1]
  info = breakdown(setup, plan, new_tokens)
  if args.json:
    out = {"preset": setup.preset, "hardware": setup.hardware.name, "plan": plan.to_dict(),
           **info}
    if measured:
      out.update(ranking=how, **measured)
    elif ranked:
      out["ranking"] = how
      out["candidates"] = [{"score": s, "plan": p.to_dict()} for s, p in ranked]
    _common.emit_json(out)
    return 0
  print(render(setup, plan, info))
  if measured:
    print()
    print(render_measured(measured, how))
  elif ranked:
    print(f"\nauto: top {len(ranked)} candidates, ranked by {how}")
    rows = [[i + 1, f"{s:.6g}", p.strategy, f"{p.stages}x{p.tp}", f"{p.rows}x{p.chunk_tokens}",
             p.units, f"{p.bubble_fraction:.2%}", fmt(p.predicted_working_set_bytes),
             f"{p.cache_utilisation:.0%}"] for i, (s, p) in enumerate(ranked)]
    print(_common.table(rows, ["#", "score", "strategy", "stages x tp", "chunk rows x tokens",
                               "units", "bubble", "working set", "of budget"]))
  return 0


def fmt(n: float) -> str:
  """Decimal units, as the seed, the hardware sheets and --cache-mb use (1 MB = 10^6 B)."""
  for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if abs(n) >= size:
      return f"{n / size:,.2f} {unit}"
  return f"{n:,.0f} B"


def render(setup, plan, info) -> str:
  f = fmt
  ws_total = info["working_set_total"]
  budget = plan.cache_budget_bytes
  fits = "fits" if ws_total <= budget else "DOES NOT FIT"
  lines = [
      f"plan: {plan.strategy} on {plan.devices} devices (preset {setup.preset}, hardware "
      f"{setup.hardware.name})",
      f"  mesh           {plan.axis_names[0]} x {plan.axis_names[1]} = {plan.stages} x {plan.tp}",
      "  layers         " + "; ".join(f"stage {s}: {list(g)}" for s, g in enumerate(plan.stage_layers)),
      f"  tp             {plan.tp}",
      f"  split          {plan.split}",
      f"  chunk          {plan.rows} row(s) x {plan.chunk_tokens} tokens, {plan.n_chunks} chunks per "
      f"sequence (last {plan.last_chunk_tokens}{', ragged' if plan.ragged else ''}), "
      f"kv block {plan.kv_block}",
      f"  schedule       {plan.units} units, {plan.ticks} ticks, bubble {plan.bubble_fraction:.2%}",
      f"  working set    {ws_total:,} B ({fmt(ws_total)}) predicted per device per step "
      f"vs budget {budget:,} B ({fmt(budget)}): {plan.cache_utilisation:,.1%}, {fits}",
      f"  reason         {plan.reason}",
      "",
  ]
  rows = [[k, f"{v:,}", f(v), f"{v / ws_total:.1%}", memory.STEP_TERMS[k][0]]
          for k, v in info["working_set_terms"].items()]
  rows.append(["total (whole step)", f"{ws_total:,}", f(ws_total), "100.0%", ""])
  for phase, v in info["working_set_phases"].items():
    rows.append([f"peak: {phase} phase alone", f"{v:,}", f(v), f"{v / ws_total:.1%}", ""])
  lines.append("working set of one chunk step of one layer, per device (resident, reusable):")
  lines.append(_common.table(rows, ["term", "bytes", "", "share", "phase"]))
  pd = info["per_device"]
  sr = info["streamed_per_run_per_layer"]
  lines += [
      "",
      "streamed, read once per step (never resident in L2):",
      f"  weight shard per layer        {f(pd['streamed_per_step_weights'])} per step; "
      f"{f(pd['layer_weights_per_device'])} for the stage's {plan.layers_per_stage} layer(s)"
      + (f" + {f(pd['weights_per_device'] - pd['layer_weights_per_device'])} of edges "
         f"(embedding, final norm, LM head; on every stage)"
         if pd['weights_per_device'] > pd['layer_weights_per_device'] else ""),
      f"  KV prefix per layer           up to {f(pd['streamed_per_step_kv_prefix_max'])} per step "
      f"(the last chunk)",
      f"  over the whole run, per layer weights {f(sr['weights'])}, KV prefix {f(sr['kv_prefix'])}",
      "per device, the whole forward program in HBM (predicted_hbm_bytes):",
  ]
  lines += [f"  {k.replace('_', ' '):<29} {f(v)}" for k, v in pd["program_bytes"].items()]
  hbm = setup.hardware.hbm_bytes
  lines += [
      f"  {'total':<29} {f(pd['predicted_hbm_bytes'])} of {f(hbm)} HBM: "
      f"{'fits' if pd['predicted_hbm_bytes'] <= hbm else 'DOES NOT FIT'}",
      f"  (KV cache: one microbatch, {plan.cache_len} positions; the whole batch's would be "
      f"{f(pd['kv_cache_per_device'])})",
      f"prefill + decode of {pd['decode_new_tokens']} new tokens (whole batch's KV cache, "
      f"{pd['decode_cache_len']} positions, {f(pd['decode_kv_cache_bytes'])}): "
      f"{f(pd['generation_hbm_bytes'])} per device: "
      f"{'fits' if pd['generation_hbm_bytes'] <= hbm else 'DOES NOT FIT'}",
      pool_line(info["kv_pool"]),
      "(1 MB = 10^6 bytes throughout)",
  ]
  return "\n".join(lines)


def render_measured(m: dict, how: str) -> str:
  """Predicted and measured time side by side, the rank correlation, and the verdict."""
  ms = lambda s: "-" if s is None else f"{s * 1e3:,.2f}"  # noqa: E731
  rows = [[c["rank_predicted"], c["plan"].strategy, f"{c['plan'].stages}x{c['plan'].tp}",
           f"{c['plan'].rows}x{c['plan'].chunk_tokens}", ms(c["predicted_s"]),
           ms(c["measured_s"]), ms(c["measured_cpu_s"]), f"{c['rank_measured']:g}",
           f"{c['measured_over_reference']:.3f}", f"{c['measured_cpu_over_reference']:.3f}"]
          for c in m["candidates"]]
  rho = lambda r: "undefined (all ties)" if r is None else f"{r:+.3f}"  # noqa: E731
  best = m["candidates"][m["best"]]
  lines = [f"auto --measure: the top {len(rows)} candidates by {how}, timed interleaved with the "
           f"single-device reference (median of {m['repeats']} runs after {m['warmup']} warm-up)"]
  if m["load"]["under_load"]:
    lines.append(f"every time below was {m['load']['note']}")
  lines += [
      _common.table(rows, ["#", "strategy", "stages x tp", "chunk", "predicted ms",
                           "measured ms", "cpu ms", "measured rank", "/ reference",
                           "/ reference (cpu)"]),
      f"reference (1 device): {ms(m['reference_s'])} ms, cpu {ms(m['reference_cpu_s'])} ms",
      f"Spearman rank correlation, predicted vs measured: {rho(m['spearman'])} (wall), "
      f"{rho(m['spearman_cpu'])} (cpu)",
      f"measured best: #{best['rank_predicted']} {best['plan'].strategy} "
      f"{best['plan'].stages}x{best['plan'].tp} {best['plan'].split}, "
      f"{best['measured_over_reference']:.3f}x the reference"]
  if m["model_agreed"]:
    lines.append("the cost model agreed: its pick (#1) measured fastest")
  else:
    lines.append(f"the cost model disagreed: its pick (#1) measured "
                 f"{m['model_pick_over_best']:.3f}x the measured best")
  return "\n".join(lines)

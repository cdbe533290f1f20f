"""`jaxpart plan`: the Plan for a model on N devices, and the working set it predicts."""

from __future__ import annotations

from jaxpart import memory, planner
from jaxpart.commands import _common
from jaxpart.plan import PlanError

NAME = "plan"
HELP = "partition a model over N devices (baseline TPxPP, layer-wise, or auto) and show the Plan"


def add_arguments(p):
  _common.add_setup_args(p, default_preset="paper")
  _common.add_plan_args(p)
  p.add_argument("--top", type=int, default=None,
                 help="auto: how many ranked candidates to show (default 5)")
  add_new_tokens_arg(p)
  _common.add_json_arg(p)


def _plan(args, setup):
  """The Plan, and for auto the ranked candidates and how they were ranked."""
  if args.strategy != "auto":
    if args.top is not None:
      raise PlanError(f"--top applies to --strategy auto only (got --strategy {args.strategy})")
    return _common.plan_from(args, setup), [], ""
  planner.check_options("auto", microbatches=args.microbatches, chunk_tokens=args.chunk_tokens,
                        chunk_rows=args.chunk_rows, kv_block=args.kv_block)
  top = 5 if args.top is None else args.top
  if top < 1:
    raise PlanError(f"--top = {top}: must be at least 1")
  cache = None if args.cache_mb is None else args.cache_mb * 1e6
  best, ranked, how = planner.plan_auto(setup, args.devices, cache, top, tp=args.tp, pp=args.pp)
  return best, ranked, how


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
  }


def run(args) -> int:
  setup = _common.setup_from(args)
  plan, ranked, how = _plan(args, setup)
  info = breakdown(setup, plan, new_tokens_from(args))
  if args.json:
    out = {"preset": setup.preset, "hardware": setup.hardware.name, "plan": plan.to_dict(),
           **info}
    if ranked:
      out["ranking"] = how
      out["candidates"] = [{"score": s, "plan": p.to_dict()} for s, p in ranked]
    _common.emit_json(out)
    return 0
  print(render(setup, plan, info))
  if ranked:
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
      "(1 MB = 10^6 bytes throughout)",
  ]
  return "\n".join(lines)

"""`jaxpart memory`: the seed's memory analysis (its section 2) beside the true figures."""

from __future__ import annotations

from jaxpart.placement import memory
from jaxpart.commands import _common, _modeldir
from jaxpart.commands.plan import add_new_tokens_arg, breakdown, fmt, new_tokens_from, pool_line

NAME = "memory"
HELP = ("footprint and working set: the seed's section 2 figures checked against the true ones, "
        "and what one chunk step touches per device for a plan")


def add_arguments(p):
  _common.add_setup_args(p, default_preset="paper")
  _modeldir.add_argument(p)
  _common.add_plan_args(p)
  add_new_tokens_arg(p)
  _common.add_json_arg(p)


def _true_text(c: dict) -> str:
  v = c["true"]
  if c["kind"] == "count":
    return f"{v:,} ({v / 1e9:.3g}B)"
  if c["kind"] == "ratio":
    return f"{v:,.1%}"
  binary = f"{v / memory.GIB:,.2f} GiB" if v >= memory.GIB else f"{v / memory.MIB:,.2f} MiB"
  return f"{fmt(v)} ({binary})"


def run(args) -> int:
  setup = _common.setup_from(args)
  cfg, run_shape, hw = setup.model, setup.run, setup.hardware
  plan = _common.plan_from(args, setup)
  claims = memory.seed_claims(cfg, run_shape, hw, plan)
  fp = memory.footprint(cfg, run_shape)
  info = breakdown(setup, plan, new_tokens_from(args))
  seed_ws = memory.seed_working_set(cfg, plan.rows, plan.chunk_tokens)
  if args.json:
    _common.emit_json({"preset": setup.preset, "hardware": hw.name, "seed_claims": claims,
                       "footprint": fp, "plan": plan.to_dict(),
                       "seed_working_set_for_plan_chunk": seed_ws, **info})
    return 0

  print(f"memory: preset {setup.preset}, hardware {hw.name} (L2 {fmt(hw.l2_bytes)}); "
        f"1 MB = 10^6 B, 1 MiB = 2^20 B")
  print(f"\nthe seed's section 2 and 3.2, checked (a claim holds within "
        f"{memory.CLAIM_RTOL:.0%}; buffers sized for the seed's {run_shape.batch} x "
        f"{min(64, run_shape.seq)} chunk at the plan's tp {plan.tp})")
  print(_common.table([[c["claim"], c["seed"], _true_text(c), c["verdict"]] for c in claims],
                      ["claim", "seed says", "true figure", "verdict"]))
  print("\nhow each true figure is computed:")
  for c in claims:
    print(f"  {c['claim']}: {c['how']}")

  print("\nfootprint (independent of placement):")
  rows = [
      ["projection weights per layer", f"{fp['projection_params_per_layer']:,}", ""],
      ["parameters per layer (with LayerNorm)", f"{fp['params_per_layer']:,}",
       fmt(fp["weight_bytes_per_layer"])],
      ["parameters in all", f"{fp['params_total']:,}", fmt(fp["weight_bytes_total"])],
      ["full activation of one layer (B x T x D)", "", fmt(fp["activation_bytes_full_layer"])],
      ["KV cache per token per layer", "", fmt(fp["kv_bytes_per_token_per_layer"])],
      ["KV cache per layer (whole batch)", "", fmt(fp["kv_cache_bytes_per_layer"])],
      ["forward FLOPs per token", f"{fp['forward_flops_per_token']:.4g}", ""],
  ]
  print(_common.table(rows, ["figure", "count", "bytes"]))

  pd = info["per_device"]
  print(f"\nper device for the plan: {plan.strategy}, {plan.stages} stages x tp {plan.tp}, "
        f"chunk {plan.rows} row(s) x {plan.chunk_tokens} tokens ({plan.split})")
  rows = [
      ["weights held (streamed once per step per layer)", fmt(pd["weights_per_device"])],
      ["  of which edges (embedding, final norm, LM head)",
       fmt(pd["weights_per_device"] - pd["layer_weights_per_device"])],
      ["weight shard read per layer per step", fmt(pd["streamed_per_step_weights"])],
      ["KV cache per layer (whole batch, unsharded)", fmt(pd["kv_cache_per_layer"])],
      ["KV cache per device (whole batch)", fmt(pd["kv_cache_per_device"])],
      ["KV cache per device (engine: one microbatch)", fmt(pd["kv_cache_engine_per_device"])],
      [f"KV cache per device for decoding (whole batch, {pd['decode_cache_len']} positions)",
       fmt(pd["decode_kv_cache_bytes"])],
      ["activation unit (rows x tokens x D)", fmt(pd["activation_unit"])],
      ["working set per step (whole step)", fmt(pd["working_set_per_step"])],
      ["working set, larger phase alone", fmt(pd["working_set_peak_phase"])],
      ["cache utilisation (working set / budget)", f"{pd['cache_utilisation']:,.1%}"],
  ]
  rows += [[f"program: {k.replace('_', ' ')}", fmt(v)] for k, v in pd["program_bytes"].items()]
  hbm = setup.hardware.hbm_bytes
  rows.append(["predicted HBM per device (whole forward)",
               f"{fmt(pd['predicted_hbm_bytes'])} of {fmt(hbm)}: "
               f"{'fits' if pd['predicted_hbm_bytes'] <= hbm else 'DOES NOT FIT'}"])
  rows.append([f"predicted HBM per device, prefill + decode of {pd['decode_new_tokens']} tokens",
               f"{fmt(pd['generation_hbm_bytes'])}: "
               f"{'fits' if pd['generation_hbm_bytes'] <= hbm else 'DOES NOT FIT'}"])
  print(_common.table(rows, ["figure", "bytes"]))
  print(pool_line(info["kv_pool"]))

  ws = info["working_set_terms"]
  operator = sum(ws[k] for k in ("kv_block", "scores_tile", "probs_tile", "softmax_state"))
  honest = {
      "weight_tiles": ("streamed weight shard, one layer", pd["streamed_per_step_weights"]),
      "activation_chunk": ("input_chunk", ws["input_chunk"]),
      "operator_buffers": ("kv_block + scores + probs + softmax state", operator),
      "intermediate_state": ("every other resident term",
                             info["working_set_total"] - ws["input_chunk"] - operator),
  }
  print(f"\nthe seed's components vs what one step touches, for the plan's chunk "
        f"({plan.rows} x {plan.chunk_tokens}):")
  rows = [[k, fmt(v), honest[k][0], fmt(honest[k][1])] for k, v in seed_ws.items()]
  rows.append(["total", fmt(sum(seed_ws.values())), "weights + resident",
               fmt(pd["streamed_per_step_weights"] + info["working_set_total"])])
  print(_common.table(rows, ["seed component", "seed's account", "jaxpart term", "true size"]))
  print("\nThe weight shard is read once per step and cannot stay in L2; the resident terms "
        "are what the planner fits to the budget (`jaxpart plan` lists every term).")
  return 0

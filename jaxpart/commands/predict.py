"""`jaxpart predict`: the cost model's figures for one Plan (nothing is compiled or run)."""

from jaxpart import validate
from jaxpart.cost import forward as costmodel
from jaxpart.cost import decode as decode_cost
from jaxpart.commands import _common, _modeldir, _predict_serving
from jaxpart.commands.plan import add_new_tokens_arg, new_tokens_from
from jaxpart.placement.plan import PlanError

NAME = "predict"
HELP = "predict time, throughput, traffic, L2 hit rate and energy of a Plan (analytic model)"


def add_arguments(p):
  _common.add_setup_args(p, default_preset="paper")
  _modeldir.add_argument(p)
  _common.add_plan_args(p)
  p.add_argument("--decode", action="store_true",
                 help="also model generation: prefill of the batch (TTFT) and each decode step "
                      "(TPOT) beside the bound of reading the weights and KV cache from HBM")
  add_new_tokens_arg(p)
  _predict_serving.add_arguments(p)
  _common.add_json_arg(p)


def run(args) -> int:
  setup = _common.setup_from(args)
  if args.serving:
    if args.decode:
      raise PlanError("--decode and --serving are two models: give one")
    return _predict_serving.run(args, setup)
  _predict_serving.check_unused(args)
  plan = _common.plan_from(args, setup)
  if args.decode:
    return _decode(args, setup, plan)
  if args.new_tokens is not None:
    raise PlanError("--new-tokens applies with --decode only")
  pred = costmodel.predict(setup, plan)
  if args.json:
    _common.emit_json({"preset": setup.preset, "plan": plan.to_dict(), "prediction": pred})
    return 0
  print(f"{setup.preset} on {plan.devices} x {setup.hardware.name}: {plan.strategy} "
        f"{plan.stages} stages x tp {plan.tp}, {plan.split}")
  print(f"  {plan.reason}")
  print(_common.table(rows(pred), ["modelled figure", "value"]))
  if not pred.fits_device_memory:
    print(f"NOTE: the forward would hold {_common.fmt_bytes(pred.device_memory_bytes['total'])} "
          f"per device (memory.program_bytes), more than the "
          f"{_common.fmt_bytes(setup.hardware.hbm_bytes)} of device memory")
  return 0


def rows(p: costmodel.Prediction) -> list[list[str]]:
  fb = _common.fmt_bytes
  e = p.energy_breakdown_j
  return [
      ["tokens/s", f"{p.tokens_per_s:,.0f}"],
      ["time per token, seed's definition (1/TPS)", f"{p.seed_time_per_token_ms:.6f} ms"],
      ["whole batch", f"{p.total_s:.4f} s"],
      ["per-sequence latency (first unit in, last out)", f"{p.sequence_latency_s:.4f} s"],
      ["busy tick (stage step + ppermute), mean", f"{p.step_s * 1e3:.4f} ms"],
      ["units / ticks / bubble", f"{p.units} / {p.ticks} / {p.bubble_fraction:.2%}"],
      ["compute time per device (sum of steps)", f"{p.compute_s:.4f} s"],
      ["HBM time per device", f"{p.hbm_s:.4f} s"],
      ["L2 time per device", f"{p.l2_s:.4f} s"],
      ["TP all-reduce time per device", f"{p.tp_comm_s:.4f} s"],
      ["pipeline transfer time per device", f"{p.pipe_comm_s:.4f} s"],
      ["embedding (stage 0) + LM head (last stage)", f"{p.edge_s:.4f} s"],
      ["waiting (bubble ticks, slower stages)", f"{p.bubble_s:.4f} s"],
      ["layer step bound by", p.bound],
      ["FLOPs per device (executed)", f"{p.flops_per_device:.4g}"],
      ["model FLOP utilisation (useful FLOPs / peak)", f"{p.mfu:.1%}"],
      ["arithmetic intensity (FLOP per HBM byte)", f"{p.arithmetic_intensity:.1f}"],
      ["HBM read / write per device", f"{fb(p.hbm_read_bytes_per_device)} / "
                                      f"{fb(p.hbm_write_bytes_per_device)}"],
      ["L2 read requests per device", fb(p.l2_read_bytes_per_device)],
      ["link bytes sent per device", fb(p.link_bytes_per_device)],
      ["collective buffers per device (all-reduce, permute)",
       f"{fb(p.collective_payload_bytes['all-reduce'])}, "
       f"{fb(p.collective_payload_bytes['collective-permute'])}"],
      ["L2 hit rate (modelled)", f"{p.l2_hit_rate:.1%}"],
      ["step working set / fits L2", f"{fb(p.working_set_bytes)} / {p.working_set_fits_l2}"],
      ["weights per device / resident in L2",
       f"{fb(p.weights_per_device_bytes)} / {p.weights_resident_in_l2}"],
      ["engine memory per device", fb(p.device_memory_bytes["total"])],
      ["energy per token", f"{p.energy_per_token_j * 1e3:.4f} mJ"],
      ["energy split (FLOPs, HBM, L2, links, static)",
       ", ".join(f"{e[k] / p.energy_j:.0%}" for k in ("flops", "hbm", "l2", "links", "static"))],
  ]


def _decode(args, setup, plan) -> int:
  new_tokens = new_tokens_from(args)
  validate.warn_past_positions(setup.model, setup.run.seq + new_tokens,
                               f"predict --decode of a {setup.run.seq:,}-token prompt and "
                               f"{new_tokens:,} new tokens")
  d = decode_cost.predict_decode(setup, plan, new_tokens)
  if args.json:
    _common.emit_json({"preset": setup.preset, "plan": plan.to_dict(), "decode": d})
    return 0
  print(f"{setup.preset} on {plan.devices} x {setup.hardware.name}: {plan.strategy} "
        f"{plan.stages} stages x tp {plan.tp}; batch {d.batch}, prompt {d.prompt} tokens, "
        f"{d.new_tokens} new tokens (modelled)")
  print(_common.table(decode_rows(d), ["modelled figure", "value"]))
  print(f"HBM bound: each decode tick a device reads its stage's weights and its microbatch's "
        f"KV cache once; a token passes {d.stages} stage(s), so TPOT >= {d.stages} x "
        f"(weight + KV bytes per device) / {setup.hardware.hbm_bw / 1e12:g} TB/s.")
  return 0


def decode_rows(d: decode_cost.DecodePrediction) -> list[list[str]]:
  fb = _common.fmt_bytes
  t = d.tick_parts_s
  mem = d.memory_per_device
  return [
      ["prefill of the batch = TTFT", f"{d.ttft_s * 1e3:,.2f} ms "
                                      f"({d.prefill_tokens_per_s:,.0f} prompt tokens/s)"],
      ["decode microbatches in flight / rows each", f"{d.microbatches} / {d.rows}"],
      ["ticks per decode step / bubble over the steps",
       f"{d.cycle_ticks} / {d.bubble_fraction:.1%}"],
      ["TPOT (mean over steps; first, last)", f"{d.tpot_s * 1e3:.3f} ms ({d.tpot_first_s * 1e3:.3f}, "
                                              f"{d.tpot_last_s * 1e3:.3f})"],
      ["HBM-read bound on TPOT / TPOT over bound", f"{d.hbm_bound_s * 1e3:.3f} ms / "
                                                   f"{d.bound_ratio:.2f}x"],
      ["floor with all devices tensor-parallel", f"{d.ideal_bound_s * 1e3:.3f} ms"],
      ["decode tokens/s (batch / TPOT)", f"{d.decode_tokens_per_s:,.0f}"],
      ["prefill + decode of all new tokens", f"{d.generation_s:.3f} s"],
      ["read per tick per device: weights, KV", f"{fb(d.bytes_read_per_tick['weights'])}, "
                                                f"{fb(d.bytes_read_per_tick['kv_cache'])}"],
      ["tick: HBM, compute, TP all-reduces, edges, sends (ms)",
       ", ".join(f"{t[k] * 1e3:.3f}" for k in ("hbm", "compute", "tensor_all_reduces", "edges",
                                                "pipeline_sends"))],
      ["decode KV cache per device (whole batch)", f"{fb(mem['decode_kv_cache_bytes'])} "
                                                   f"({mem['decode_cache_len']} positions)"],
      ["per device, prefill + decode", f"{fb(mem['generation_hbm_bytes'])}: "
                                       f"{'fits' if d.fits_device_memory else 'DOES NOT FIT'}"],
  ]

"""`jaxpart predict`: the cost model's figures for one Plan (nothing is compiled or run)."""

from jaxpart import costmodel
from jaxpart.commands import _common

NAME = "predict"
HELP = "predict time, throughput, traffic, L2 hit rate and energy of a Plan (analytic model)"


def add_arguments(p):
  _common.add_setup_args(p, default_preset="paper")
  _common.add_plan_args(p)
  _common.add_json_arg(p)


def run(args) -> int:
  setup = _common.setup_from(args)
  plan = _common.plan_from(args, setup)
  pred = costmodel.predict(setup, plan)
  if args.json:
    _common.emit_json({"preset": setup.preset, "plan": plan.to_dict(), "prediction": pred})
    return 0
  print(f"{setup.preset} on {plan.devices} x {setup.hardware.name}: {plan.strategy} "
        f"{plan.stages} stages x tp {plan.tp}, {plan.split}")
  print(f"  {plan.reason}")
  print(_common.table(rows(pred), ["modelled figure", "value"]))
  if not pred.fits_device_memory:
    print(f"NOTE: the engine would hold {_common.fmt_bytes(pred.device_memory_bytes['total'])} "
          f"per device (input and output streams kept whole on every device), more than the "
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

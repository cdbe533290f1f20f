"""`jaxpart run`: execute one Plan's forward, check it against the reference, time it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxpart import bench, config, distributed, runs, sizeguard, validate
from jaxpart.commands import _common

NAME = "run"
HELP = "run the forward of one placement on the devices present; check it and time it"
DISTRIBUTED = True


def add_arguments(p):
  _common.add_setup_args(p)
  _common.add_plan_args(p)
  p.add_argument("--check", action="store_true",
                 help="compare with the single-device reference (bf16 and float32)")
  p.add_argument("--f32", action="store_true", help="run in float32 instead of the model dtype")
  p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dump", default=None, metavar="OUT.npz",
                 help="write input, unsharded parameters (by path), the Plan and the output")
  _common.add_json_arg(p)


def run(args) -> int:
  if args.repeats < 1:
    raise config.ConfigError(f"--repeats = {args.repeats}: must be at least 1")
  setup = _common.setup_from(args)
  plan = _common.plan_from(args, setup)
  dtype = jnp.float32 if args.f32 else None
  sizeguard.check_fits(setup, [plan], "run", 4 if args.f32 else None)
  params_h, x_h = runs.host_params(setup, args.seed), runs.host_input(setup, args.seed)
  placed = runs.place(setup, plan, params_h, x_h, dtype=dtype)
  y = runs.fetch(placed())
  validate.check_finite(f"output of the {plan.strategy} placement", y)
  timing = bench.time_interleaved({"engine": placed}, repeats=args.repeats, warmup=1)
  seconds = timing["engine"]["median_s"]
  tokens = setup.run.tokens
  out = {"preset": setup.preset, "plan": plan.to_dict(), "dtype": "float32" if args.f32 else
         setup.model.dtype, "devices_present": len(jax.devices()),
         "processes": jax.process_count(),
         "platform": jax.devices()[0].platform, "median_s": seconds,
         "tokens_per_s": tokens / seconds, "time_per_token_ms_seed_def": 1e3 * seconds / tokens,
         "runs_s": timing["engine"]["runs"]}
  ok = True
  if args.check:
    ref = runs.reference(setup, params_h, x_h, dtype)
    out["check"] = runs.errors(y, ref)
    out["check"]["tolerance"] = tol = (1e-5 if args.f32 else
                                       runs.bf16_tolerance(setup, params_h, x_h))
    key = "max_rel_err" if args.f32 else "max_abs_err"
    ok = out["check"]["finite"] and out["check"][key] <= tol
    out["check"]["ok"] = ok
  if not distributed.is_main():
    return 0 if ok else 1
  if args.dump:
    _dump(args.dump, setup, plan, params_h, x_h, y)
    out["dump"] = args.dump
  if args.json:
    _common.emit_json(out)
  else:
    _print(out)
  return 0 if ok else 1


def _print(out):
  plan = out["plan"]
  d = plan["derived"]
  print(f"{plan['strategy']} on {plan['devices']} devices: mesh stage x tensor = "
        f"{d['mesh_shape'][0]} x {d['mesh_shape'][1]}, {d['split']}, layers by stage "
        f"{plan['stage_layers']}")
  procs = f" in {out['processes']} processes" if out["processes"] > 1 else ""
  print(f"measured on {out['platform']} ({out['devices_present']} devices present{procs}"
        f"{', simulated: wall time is total work, not parallel speed-up' if out['platform'] == 'cpu' else ''})")
  print(f"  median {out['median_s'] * 1e3:.1f} ms  {out['tokens_per_s']:,.0f} tokens/s  "
        f"time per token (seed's definition, 1/TPS) {out['time_per_token_ms_seed_def']:.4f} ms")
  if "check" in out:
    c = out["check"]
    kind = "max rel" if out["dtype"] == "float32" else "max abs"
    print(f"  vs single-device reference ({out['dtype']}): max abs err {c['max_abs_err']:.3e}, "
          f"max rel err {c['max_rel_err']:.3e}, bit-exact {c['bit_exact']}; "
          f"{kind} tolerance {c['tolerance']:.3e}: {'OK' if c['ok'] else 'MISMATCH'}")
  if "dump" in out:
    print(f"  wrote {out['dump']}")


def _dump(path, setup, plan, params_h, x_h, y):
  """Everything needed to re-run the forward elsewhere. bf16 arrays are stored as float32
  (an exact widening) because numpy has no bf16 of its own; `dtype` says what they were."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params_h)
  arrays = {"param/" + "/".join(k.key for k in path_): np.asarray(v, np.float32)
            for path_, v in flat}
  arrays["input"] = np.asarray(x_h, np.float32)
  arrays["output"] = np.asarray(y, np.float32)
  arrays["plan_json"] = np.array(plan.to_json())
  arrays["model_json"] = np.array(json.dumps(config.to_dict(setup.model)))
  arrays["dtype"] = np.array(str(np.asarray(y).dtype))
  np.savez(path, **arrays)

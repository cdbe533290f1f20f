"""`jaxpart run`: execute one Plan's forward, check it against the reference, time it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxpart import config, validate
from jaxpart.measure import bench
from jaxpart.runtime import distributed
from jaxpart.models import families
from jaxpart.measure import load
from jaxpart.runtime import runs
from jaxpart.runtime import sizeguard
from jaxpart.measure import tracing
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
  p.add_argument("--trace", default=None, metavar="DIR",
                 help="write a jax.profiler trace of the timed runs under DIR (Perfetto or XProf)")
  _common.add_json_arg(p)


def run(args) -> int:
  if args.repeats < 1:
    raise config.ConfigError(f"--repeats = {args.repeats}: must be at least 1")
  tracing.check_dir("--trace", args.trace)
  setup = _common.setup_from(args)
  plan = _common.plan_from(args, setup)
  if setup.model.dtype == "float64" and not args.f32:
    with jax.enable_x64(True):   # without it, "float64" arrays are silently float32
      return _run(args, setup, plan)
  return _run(args, setup, plan)


def _run(args, setup, plan) -> int:
  dtype = jnp.float32 if args.f32 else None
  sizeguard.check_fits(setup, [plan], "run", 4 if args.f32 else None)
  params_h, x_h = runs.host_params(setup, args.seed), runs.host_input(setup, args.seed)
  placed = runs.place(setup, plan, params_h, x_h, dtype=dtype)
  y = runs.fetch(placed())
  validate.check_finite(f"output of the {plan.strategy} placement", y)
  # The precision it computed in: the output's dtype, except logits, which are float32 always.
  ran = "float32" if args.f32 else setup.model.dtype
  got = str(y.dtype)
  if got != ("float32" if families.of(setup.model).tokens_in else ran):
    raise config.ConfigError(f"model.dtype = {setup.model.dtype}: the forward ran in {got}")
  before = load.start(f"run {plan.strategy} on {plan.devices} devices:")
  with tracing.maybe_trace(args.trace):
    timing = bench.time_interleaved({"engine": placed}, repeats=args.repeats, warmup=1)
  machine_load = load.finish(before)
  # The placed model is no longer needed: let its device buffers go before the reference puts a
  # whole copy on one device (at the paper's width, 6.4 GB each).
  del placed
  seconds = timing["engine"]["median_s"]
  tokens = setup.run.tokens
  out = {"preset": setup.preset, "plan": plan.to_dict(), "dtype": ran,
         "devices_present": len(jax.devices()),
         "processes": jax.process_count(),
         "platform": jax.devices()[0].platform, "median_s": seconds,
         "tokens_per_s": tokens / seconds, "time_per_token_ms_seed_def": 1e3 * seconds / tokens,
         "runs_s": timing["engine"]["runs"], "load": machine_load}
  ok = True
  if args.check:
    ref = runs.reference(setup, params_h, x_h, dtype)
    out["check"] = runs.errors(y, ref)
    # float32 and float64 against a reference in the same dtype: a relative bound. bf16: the
    # bf16 reference's own distance from float32 (which is 0 for any other dtype: no bound).
    relative = {"float32": runs.F32_REL_TOL, "float64": runs.F64_REL_TOL}
    out["check"]["tolerance"] = tol = (relative[ran] if ran in relative else
                                       runs.bf16_tolerance(setup, params_h, x_h))
    key = "max_rel_err" if ran in relative else "max_abs_err"
    ok = out["check"]["finite"] and out["check"][key] <= tol
    out["check"]["ok"] = ok
  if not distributed.is_main():
    return 0 if ok else 1
  if args.dump:
    _dump(args.dump, setup, plan, params_h, x_h, y)
    out["dump"] = args.dump
  if args.trace:
    out["trace"] = args.trace
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
  if out["load"]["under_load"]:
    print(f"  that time was {out['load']['note']}")
  if "check" in out:
    c = out["check"]
    kind = "max rel" if out["dtype"] in ("float32", "float64") else "max abs"
    print(f"  vs single-device reference ({out['dtype']}): max abs err {c['max_abs_err']:.3e}, "
          f"max rel err {c['max_rel_err']:.3e}, bit-exact {c['bit_exact']}; "
          f"{kind} tolerance {c['tolerance']:.3e}: {'OK' if c['ok'] else 'MISMATCH'}")
  if "dump" in out:
    print(f"  wrote {out['dump']}")
  if "trace" in out:
    print(f"  wrote a jax.profiler trace under {out['trace']}")


def _dump(path, setup, plan, params_h, x_h, y):
  """Everything needed to re-run the forward elsewhere. bf16 arrays are stored as float32
  (an exact widening) because numpy has no bf16 of its own, float64 as float64; `dtype` says
  what the output was."""
  store = np.float64 if np.asarray(y).dtype == np.float64 else np.float32
  flat, _ = jax.tree_util.tree_flatten_with_path(params_h)
  arrays = {"param/" + "/".join(k.key for k in path_): np.asarray(v, store)
            for path_, v in flat}
  arrays["input"] = np.asarray(x_h, store)
  arrays["output"] = np.asarray(y, store)
  arrays["plan_json"] = np.array(plan.to_json())
  arrays["model_json"] = np.array(json.dumps(config.to_dict(setup.model)))
  arrays["dtype"] = np.array(str(np.asarray(y).dtype))
  np.savez(path, **arrays)

"""`jaxpart gradcheck`: forward, loss and every gradient of a placement against the reference.

The placed run gets NaN in every bubble input and in the unwritten output buffer, so a pass also
proves that nothing from a bubble reaches the loss or a gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from tqdm import tqdm

from jaxpart.runtime import distributed
from jaxpart.runtime import engine
from jaxpart.models import families
from jaxpart.models import dense as model
from jaxpart.runtime import runs
from jaxpart.runtime import sharding
from jaxpart.runtime import sizeguard
from jaxpart.runtime import train
from jaxpart.commands import _common
from jaxpart.config import ConfigError

NAME = "gradcheck"
HELP = ("check the forward and jax.grad (params and input) of a placement against the "
        "single-device reference, leaf by leaf")
DISTRIBUTED = True

F32_FORWARD_TOL = 2e-6   # runs.F32_REL_TOL (not imported here: jax loads only when a command runs)
F32_GRAD_TOL = 1e-4      # this bound for float32 gradients


def add_arguments(p):
  _common.add_setup_args(p, default_preset="tiny")
  _common.add_plan_args(p)
  g = p.add_argument_group("check")
  g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="float32: tight check (rel < 1e-4 per gradient leaf); bfloat16: bound per "
                      "leaf from how far the bf16 reference is from the float32 one")
  g.add_argument("--remat", default="none", help="remat policy: none, stage or dots")
  g.add_argument("--seed", type=int, default=0, help="parameters, input and target")
  g.add_argument("--tol", type=float, default=None,
                 help=f"float32 gradient bound (default {F32_GRAD_TOL:g})")
  g.add_argument("--memory", action="store_true",
                 help="also compile the grad step under every remat policy and print its "
                      "per-device temp bytes (compile only)")
  _common.add_json_arg(p)


def _check_args(args) -> None:
  if args.remat not in engine.REMAT_POLICIES:
    raise ConfigError(f"--remat = {args.remat!r}: valid remat policies are "
                      f"{', '.join(engine.REMAT_POLICIES)}")
  if args.tol is not None and not (args.tol > 0 and math.isfinite(args.tol)):
    raise ConfigError(f"--tol = {args.tol!r}: must be a positive number")
  if args.tol is not None and args.dtype != "float32":
    raise ConfigError(f"--tol applies to --dtype float32; bfloat16 bounds are derived per leaf "
                      f"(got --dtype {args.dtype})")


def check(setup, plan, dtype: str, remat: str, seed: int, grad_tol: float) -> dict:
  """Run reference and placement; returns the leaf checks (forward, loss, input, params)."""

  cfg = setup.model
  fam = families.of(cfg)
  mesh = sharding.mesh_for(plan)
  k_param, k_x, k_target = jax.random.split(jax.random.key(seed), 3)
  params = runs.host_params(setup, int(jax.random.randint(k_param, (), 0, 2**30)))
  x_f32 = fam.random_input(cfg, plan.batch, plan.seq, k_x)   # token ids stay ids
  target = train.teacher_target(cfg, x_f32, k_target)

  def evaluate(forward, p, x, dt):
    x = x if fam.tokens_in else x.astype(dt)
    (loss, y), grads = train.value_and_grads(forward, not fam.tokens_in)(
        model.cast_params(p, dt), x, target)
    out = {"forward": y, "loss": loss, "grad": grads[0]}
    return out | ({} if fam.tokens_in else {"grad.x": grads[1]})

  ref = evaluate(runs.reference_forward(cfg), params, x_f32, jnp.float32)
  dt = jnp.dtype(dtype)
  placed_params = sharding.place_params(model.cast_params(params, dt), mesh, cfg)
  nan = float("nan")
  poisoned = train.engine_forward(plan, cfg, mesh, remat=remat, bubble_fill=nan, out_fill=nan)
  got = evaluate(poisoned, placed_params, x_f32, dt)

  if dt == jnp.float32:
    tol = {n: (F32_FORWARD_TOL if n == "forward" else grad_tol)
           for n in train.named_leaves(ref)}
    basis = f"float32: forward rel < {F32_FORWARD_TOL:g}, loss and gradients rel < {grad_tol:g}"
  else:
    ref_low = evaluate(runs.reference_forward(cfg), params, x_f32, dt)
    tol = train.bf16_tolerances(ref_low, ref)
    basis = ("bfloat16: per leaf, 4 x rel(bf16 reference vs float32 reference), at least 2^-8 "
             "(one bf16 rounding); compared against the float32 reference")
  # the engine's gradients of the padded vocabulary's rows, compared on the true ones
  checks = train.compare(got | {"grad": sharding.unpad_vocab(got["grad"], cfg)}, ref, tol)
  shard_ok = _shardings_match(got["grad"], placed_params)
  return {"plan": plan, "dtype": dtype, "remat": remat, "seed": seed, "tolerance": basis,
          "bubbles": "NaN in every bubble input and in the output buffer before writes",
          "checks": checks, "grad_shardings_match_params": shard_ok,
          "ok": all(c.ok for c in checks) and shard_ok}


def _shardings_match(grads, params) -> bool:
  pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(params))
  return all(g.sharding.is_equivalent_to(p.sharding, p.ndim) for g, p in pairs)


def memory(setup, plan, dtype: str) -> dict[str, dict[str, int]]:
  mesh = sharding.mesh_for(plan)
  params, x = train.abstract_inputs(setup.model, plan, mesh, jnp.dtype(dtype))
  out = {}
  for policy in tqdm(engine.REMAT_POLICIES, desc="compiling grad step per remat policy",
                     leave=False):
    forward = train.engine_forward(plan, setup.model, mesh, remat=policy)
    out[policy] = train.grad_memory(forward, params, x)
  return out


def run(args) -> int:
  _check_args(args)
  setup = _common.setup_from(args)
  plan = _common.plan_from(args, setup)
  sizeguard.check_fits(setup, [plan], "gradcheck", 4 if args.dtype == "float32" else None)
  result = check(setup, plan, args.dtype, args.remat, args.seed, args.tol or F32_GRAD_TOL)
  if args.memory:
    result["memory"] = memory(setup, plan, args.dtype)
  if not distributed.is_main():
    return 0 if result["ok"] else 1
  if args.json:
    _common.emit_json(result)
    return 0 if result["ok"] else 1
  print(f"{plan.strategy}: {plan.stages} stages x tp {plan.tp} on {plan.devices} devices, "
        f"{plan.split}; {args.dtype}, remat {args.remat}, seed {args.seed}")
  print(f"bubbles: {result['bubbles']}")
  print(f"tolerance: {result['tolerance']}")
  rows = [[c.name, f"{c.max_abs_diff:.3e}", f"{c.max_abs_ref:.3e}", f"{c.rel:.3e}",
           f"{c.tol:.1e}", "ok" if c.ok else ("NOT FINITE" if not c.finite else "MISMATCH")]
          for c in result["checks"]]
  print(_common.table(rows, ["leaf", "max|diff|", "max|ref|", "rel", "tol", "result"]))
  print(f"gradient shardings equal the params' shardings: "
        f"{'yes' if result['grad_shardings_match_params'] else 'NO'}")
  if "memory" in result:
    mem = result["memory"]
    print(_common.table([[k, _common.fmt_bytes(v["temp_bytes"]), f"{v['temp_bytes']:,}"]
                         for k, v in mem.items()],
                        ["remat", "temp per device", "bytes"]))
  bad = [c.name for c in result["checks"] if not c.ok]
  print("PASS" if result["ok"] else f"FAIL: {', '.join(bad) or 'gradient shardings'}")
  return 0 if result["ok"] else 1

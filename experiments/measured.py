"""Figures measured on this machine's simulated CPU devices: compiled programs and timings.

Compiling needs no memory for the arrays (shapes only), so even the paper preset's engine can
be compiled here and its HLO read; running is only done for the small preset.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxpart.measure import bench
from jaxpart.cost import counts
from jaxpart.runtime import engine
from jaxpart.measure import hlo
from jaxpart.measure import compiled as measure
from jaxpart.models import dense as model
from jaxpart.runtime import sharding
from jaxpart.config import Setup
from jaxpart.placement.plan import Plan


def require_devices(n: int) -> None:
  have = len(jax.devices())
  if have < n:
    raise RuntimeError(f"experiments need {n} devices, {have} present: run through `jaxpart "
                       f"experiments` (it asks XLA for 16 simulated CPU devices) or set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")


def abstract_args(setup: Setup, plan: Plan, mesh, dtype=None):
  """ShapeDtypeStructs of parameters (placed as the Plan says) and input: nothing allocated."""
  dt = jnp.dtype(dtype or setup.model.dtype)
  params = sharding.abstract_placed_params(setup.model, plan, mesh, dt)
  x = jax.ShapeDtypeStruct((setup.run.batch, setup.run.seq, setup.model.d_model), dt)
  return params, x


def compile_engine(setup: Setup, plan: Plan, dtype=None) -> dict[str, Any]:
  """Compile the engine's forward for `plan` and read what it would do, per device.

  collective bytes: ops inside the tick loop, the tick cond weighted by units/ticks
  (executed); flops: HLO dots x loop trips with both conds weighted (counts.hlo_cond_weights)
  and unweighted (static: every tick and KV block).
  """
  require_devices(plan.devices)
  mesh = sharding.mesh_for(plan)
  params, x = abstract_args(setup, plan, mesh, dtype)
  stats = measure.compile_stats(engine.jit_forward(plan, setup.model, mesh, differentiable=False), params, x)
  hlo_text = stats["hlo"]
  loop = measure.engine_loop_bytes(hlo_text, plan)
  static_loop = {k: 0.0 for k in hlo.COLLECTIVE_KINDS}
  for o in hlo.collective_ops(hlo_text):
    if o.loop_depth:
      static_loop[o.kind] += o.bytes * o.count
  out = measure.public(stats)
  out.update(
      collective_loop_executed=loop["loop"], collective_outside_loops=loop["outside_loops"],
      collective_loop_static=static_loop,
      flops_executed=hlo.hlo_flops(hlo_text, counts.hlo_cond_weights(plan)),
      flops_static=hlo.hlo_flops(hlo_text),
      # per kind, as compiled: 4 where CPU XLA promoted bf16 to f32; 0 if the loop holds none
      collective_element_bytes={k: int(v or 0) for k, v in loop["element_bytes"].items()})
  return out


def time_forward(setup: Setup, plans: dict[str, Plan], repeats: int, dtype=jnp.float32,
                 progress=None) -> dict[str, Any]:
  """Median wall time of each plan's forward, interleaved, on real arrays (small presets),
  with the executed matmul FLOPs per device of the very program timed (compiled once)."""
  fns, flops = {}, {}
  params_host = model.init_params(setup.model, jax.random.key(0))
  x = model.random_input(setup.model, setup.run.batch, setup.run.seq, jax.random.key(1), dtype)
  for name, plan in plans.items():
    require_devices(plan.devices)
    mesh = sharding.mesh_for(plan)
    placed = sharding.place_params(params_host, mesh)
    xr = jax.device_put(x, sharding.stream(mesh))
    compiled = engine.jit_forward(plan, setup.model, mesh, dtype=dtype,
                                  differentiable=False).lower(placed, xr).compile()
    flops[name] = hlo.hlo_flops(compiled.as_text(), counts.hlo_cond_weights(plan))
    fns[name] = (lambda c=compiled, p=placed, xx=xr: c(p, xx))
    if progress:
      progress(1)
  timing = bench.time_interleaved(fns, repeats=repeats, warmup=1, progress=progress)
  return {k: {**v, "flops_per_device_executed": flops[k]} for k, v in timing.items()}

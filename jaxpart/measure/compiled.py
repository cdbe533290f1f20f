"""Compile statistics: what XLA built for a program, per device, read without running it.

Memory comes from the compiled executable's memory analysis; FLOPs and collective bytes from its
HLO text (jaxpart.measure.hlo), so the figures hold on any backend. The engine's figures are compared
with the cost model's (counts.collective_bytes, counts.hlo_cond_weights), never
re-derived here.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxpart.cost import counts
from jaxpart.runtime import compat
from jaxpart.runtime import engine
from jaxpart.models import dense as model
from jaxpart.runtime import sharding
from jaxpart.measure.hlo import COLLECTIVE_KINDS, collective_bytes, collective_ops, element_bytes, hlo_flops


# --- compiled programs ---------------------------------------------------------------------

def _cost_dict(compiled) -> dict[str, float]:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):   # older JAX: one dict per device program
    ca = ca[0] if ca else {}
  return dict(ca or {})


def compile_stats(jitted_fn, *args, cond_weight: float | Sequence[float] = 1.0) -> dict[str, Any]:
  """Lower and compile `jitted_fn(*args)` (arrays or ShapeDtypeStructs; nothing runs).

  Memory is per device, from the compiled executable. `flops` are the HLO's matmul FLOPs per
  device with loop trips applied (see hlo_flops); `xla_cost_flops` is what cost_analysis()
  says, which counts each loop body once.
  """
  t0 = time.perf_counter()
  compiled = jitted_fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  hlo = compiled.as_text()
  cost = _cost_dict(compiled)
  return {
      **compat.compiled_memory(compiled).to_dict(),
      "flops": hlo_flops(hlo, cond_weight),
      "xla_cost_flops": float(cost.get("flops", 0.0)),
      "xla_cost_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "collective_bytes": collective_bytes(hlo, cond_weight),
      "compile_s": compile_s,
      "hlo": hlo,
      "compiled": compiled,
  }


def public(stats: Mapping[str, Any]) -> dict[str, Any]:
  """compile_stats without the HLO text and the executable, for printing and JSON."""
  return {k: v for k, v in stats.items() if k not in ("hlo", "compiled")}


# --- the engine's collectives against the cost model ---------------------------------------

def engine_loop_bytes(hlo_text: str, plan) -> dict[str, Any]:
  """Measured per-device collective bytes of a compiled engine forward, split into the
  pipeline loop (ops inside the tick loop, weighted by counts.hlo_cond_weights) and the rest
  (outside every loop: GSPMD's gather of the last stage's output to all devices), with the
  element size each kind of loop collective was compiled with (None: none, or mixed sizes).
  On XLA:CPU a bf16 all-reduce is promoted to float32 (4 bytes), while the forward-only
  engine's sends and gathers move bit patterns of the model's own width."""
  ops = collective_ops(hlo_text, counts.hlo_cond_weights(plan))
  loop = {k: 0.0 for k in COLLECTIVE_KINDS}
  rest = {k: 0.0 for k in COLLECTIVE_KINDS}
  sizes: dict[str, set] = {k: set() for k in COLLECTIVE_KINDS}
  for o in ops:
    (loop if o.loop_depth else rest)[o.kind] += o.bytes * o.count
    if o.loop_depth and o.element_type:
      sizes[o.kind].add(element_bytes(o.element_type))
  return {"loop": loop, "outside_loops": rest,
          "element_bytes": {k: (v.pop() if len(v) == 1 else None) for k, v in sizes.items()}}


def megatron_comparison(hlo_text: str, plan, cfg) -> dict[str, Any]:
  """engine_loop_bytes beside the cost model's executed bytes (Megatron's accounting: two
  all-reduces of the unit per layer per unit, one permute per tick) at each kind's compiled
  element size."""
  m = engine_loop_bytes(hlo_text, plan)
  eb = {k: int(v or cfg.dtype_bytes) for k, v in m["element_bytes"].items()}
  want = {k: counts.collective_bytes(cfg, plan, eb[k])["executed"].get(k, 0.0)
          for k in COLLECTIVE_KINDS}
  return {"element_bytes": eb, "measured_loop": m["loop"], "formula": want,
          "outside_loops": m["outside_loops"],
          "ratio": {k: (m["loop"][k] / want[k]) if want[k] else None for k in want}}


# --- one stage step ------------------------------------------------------------------------

def stage_step_args(cfg, plan, dtype=None) -> tuple:
  """ShapeDtypeStructs for engine.stage_step on one device: params, unit, K and V caches,
  q_start. dtype overrides the model's (float32 checks)."""
  dt = jnp.dtype(dtype or cfg.dtype)
  shapes = model.param_shapes(cfg)
  params = jax.tree.map(lambda s, local: jax.ShapeDtypeStruct(local, dt), shapes,
                        sharding.param_local_shapes(shapes, plan))
  x = jax.ShapeDtypeStruct((plan.rows, plan.chunk_tokens, cfg.d_model), dt)
  cache = jax.ShapeDtypeStruct((plan.layers_per_stage, plan.rows, plan.cache_len,
                                cfg.n_heads // plan.tp, cfg.head_dim), dt)
  return params, x, cache, cache, jax.ShapeDtypeStruct((), jnp.int32)


def jit_stage_step(cfg, plan, donate_caches: bool = True):
  """One engine stage step as the engine runs it inside a stage, without the tensor-axis psum
  (same local shapes); caches donated so their update is in place, as in the engine's scan."""
  step = functools.partial(engine.stage_step, cfg=cfg, plan=plan, tp_axis=None)
  return jax.jit(step, donate_argnums=(2, 3) if donate_caches else ())


def stage_step_stats(cfg, plan) -> dict[str, Any]:
  """Compiled per-device memory of one layer-wise chunk step, nothing allocated."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*[Dd]onat.*")
    return compile_stats(jit_stage_step(cfg, plan), *stage_step_args(cfg, plan))


def forward_memory(setup, plan) -> dict[str, Any]:
  """Compiled per-device memory of the engine's forward for `plan`, without allocating."""
  cfg, run = setup.model, setup.run
  mesh = sharding.mesh_for(plan)
  params = sharding.abstract_placed_params(cfg, plan, mesh)
  x = jax.ShapeDtypeStruct((run.batch, run.seq, cfg.d_model), jnp.dtype(cfg.dtype),
                           sharding=sharding.stream(mesh))
  return compile_stats(engine.jit_forward(plan, cfg, mesh, differentiable=False), params, x,
                       cond_weight=counts.hlo_cond_weights(plan))

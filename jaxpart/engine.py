"""One pipeline runtime for every Plan: shard_map over (stage, tensor), lax.scan over ticks.

At tick t, stage s works on unit u = t - s (units are rows x chunk_tokens slabs of the input,
microbatch-major, chunk-minor). Stage 0 reads the input stream, the others what the previous
stage sent with ppermute at the end of the previous tick. Each stage keeps the K/V of its layers
for the chunks of the current microbatch, so a chunk attends to every earlier token. Ticks where
a stage has no unit run the skip branch of a lax.cond: no FLOPs, no collectives, and whatever
sits in the bubble input (NaN in the tests) is never read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpart import attention, compat, sharding
from jaxpart.config import ModelConfig
from jaxpart.model import block_apply, cast_params
from jaxpart.plan import STAGE_AXIS, TENSOR_AXIS, Plan


def to_units(x_BxTxD, plan: Plan):
  """B x T x D -> U x R x C x D (U units of R rows x C chunk tokens); pads T up to whole chunks."""
  b, t, d = x_BxTxD.shape
  pad = plan.padded_seq - t
  x = jnp.pad(x_BxTxD, ((0, 0), (0, pad), (0, 0))) if pad else x_BxTxD
  m, r, n, c = plan.microbatches, plan.rows, plan.n_chunks, plan.chunk_tokens
  return x.reshape(m, r, n, c, d).transpose(0, 2, 1, 3, 4).reshape(m * n, r, c, d)


def from_units(y_UxRxCxD, plan: Plan):
  m, r, n, c = plan.microbatches, plan.rows, plan.n_chunks, plan.chunk_tokens
  d = y_UxRxCxD.shape[-1]
  y = y_UxRxCxD.reshape(m, n, r, c, d).transpose(0, 2, 1, 3, 4).reshape(m * r, n * c, d)
  return y[:, :plan.seq]


def stage_step(p_stage, x_RxCxD, kcache, vcache, q_start, *, cfg: ModelConfig, plan: Plan,
               tp_axis: str | None):
  """Apply this stage's layers to one unit; writes the unit's K/V into the caches.

  p_stage leaves have a leading local-layer axis; caches are Lps x R x cache_len x H x E. The
  caches stay whole in the scan's carry and are updated and read in place at (layer, ...):
  slicing one layer's cache out and stacking it back would copy it every step.
  """
  def one_layer(carry, layer):
    x, kc, vc = carry
    p, l = layer

    def attend(q, k, v, state):
      kc, vc = state
      at = (l, 0, q_start, 0, 0)
      kc = jax.lax.dynamic_update_slice(kc, k[None], at)
      vc = jax.lax.dynamic_update_slice(vc, v[None], at)
      o = attention.blocked_causal(q, kc, vc, q_start, plan.kv_block, layer=l)
      return o, (kc, vc)

    y, (kc, vc) = block_apply(p, x, cfg.head_dim, cfg.ln_eps, attend, (kc, vc), tp_axis)
    return (y, kc, vc), None

  layers = jnp.arange(plan.layers_per_stage)
  (y, kcache, vcache), _ = jax.lax.scan(one_layer, (x_RxCxD, kcache, vcache), (p_stage, layers))
  return y, kcache, vcache


REMAT_POLICIES = ("none", "stage", "dots")


def remat_step(step, remat: bool | str):
  """What the backward keeps per tick of a stage step: every intermediate ("none"), only the
  step's inputs, recomputing the rest ("stage"), or also the matmul outputs ("dots"), so only
  the cheap elementwise work is recomputed. True and False mean "stage" and "none"."""
  policy = ("stage" if remat else "none") if isinstance(remat, bool) else remat
  if policy == "none":
    return step
  if policy == "stage":
    return jax.checkpoint(step)
  if policy == "dots":
    return jax.checkpoint(step, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  raise ValueError(f"remat = {remat!r}: valid remat policies are {', '.join(REMAT_POLICIES)} "
                   f"(or True / False for stage / none)")


def _pipeline_body(p_stage, x_UxRxCxD, *, cfg: ModelConfig, plan: Plan, remat: bool | str,
                   bubble_fill: float, out_fill: float):
  """Per-device program inside shard_map."""
  S, U = plan.stages, plan.units
  tp_axis = TENSOR_AXIS if plan.tp > 1 else None
  stage = jax.lax.axis_index(STAGE_AXIS)
  is_last = stage == S - 1
  dt = x_UxRxCxD.dtype
  unit_shape = x_UxRxCxD.shape[1:]
  r = plan.rows
  heads_local = cfg.n_heads // plan.tp
  cache_shape = (plan.layers_per_stage, r, plan.cache_len, heads_local, cfg.head_dim)

  step = remat_step(functools.partial(stage_step, cfg=cfg, plan=plan, tp_axis=tp_axis), remat)

  def run(operands):
    inp, kc, vc, q_start = operands
    return step(p_stage, inp, kc, vc, q_start)

  def skip(operands):
    inp, kc, vc, _ = operands
    return jnp.zeros_like(inp), kc, vc

  perm = [(s, s + 1) for s in range(S - 1)]

  def tick(carry, t):
    recv, kc, vc, out = carry
    u = t - stage
    valid = (u >= 0) & (u < U)
    u_c = jnp.clip(u, 0, U - 1)
    q_start = (u_c % plan.n_chunks) * plan.chunk_tokens
    inp = jnp.where(stage == 0, x_UxRxCxD[u_c], recv)
    inp = jnp.where(valid, inp, jnp.asarray(bubble_fill, dt))
    y, kc, vc = jax.lax.cond(valid, run, skip, (inp, kc, vc, q_start))
    # Every tick writes one slot: its unit's on the last stage's valid ticks, else the spare
    # slot U. Selecting the slot, not the value, keeps the write an in-place update.
    slot = jnp.where(valid & is_last, u_c, U)
    out = jax.lax.dynamic_update_index_in_dim(out, y, slot, 0)
    recv = jax.lax.ppermute(y, STAGE_AXIS, perm) if S > 1 else y
    return (recv, kc, vc, out), None

  init = (jnp.zeros(unit_shape, dt), jnp.zeros(cache_shape, dt), jnp.zeros(cache_shape, dt),
          jnp.full((U + 1,) + unit_shape, out_fill, dt))
  (_, _, _, out), _ = jax.lax.scan(tick, init, jnp.arange(plan.ticks))
  return out[:U]


def make_forward(plan: Plan, cfg: ModelConfig, mesh, *, remat: bool | str = False,
                 bubble_fill: float = 0.0, out_fill: float = 0.0):
  """(params, x_BxTxD) -> y_BxTxD, executing `plan` on `mesh`. Not jitted: wrap as you need.

  remat is one of REMAT_POLICIES (see remat_step); it only changes what a backward saves.

  bubble_fill is what a stage sees as input on ticks it has no unit; out_fill what the output
  buffer holds before units are written. Tests set both to NaN to prove neither leaks.
  """
  remat_step(lambda: None, remat)  # reject an unknown policy here, not deep inside a trace
  body = functools.partial(_pipeline_body, cfg=cfg, plan=plan, remat=remat,
                           bubble_fill=bubble_fill, out_fill=out_fill)
  mapped = compat.shard_map(body, mesh, in_specs=(sharding.param_specs(), sharding.SPECS.replicated),
                            out_specs=sharding.SPECS.per_stage)

  def forward(params, x_BxTxD):
    if x_BxTxD.shape[:2] != (plan.batch, plan.seq):
      raise ValueError(f"input is batch x seq = {x_BxTxD.shape[:2]}, the plan was made for "
                       f"{(plan.batch, plan.seq)}")
    out_SUxRxCxD = mapped(params, to_units(x_BxTxD, plan))
    return from_units(out_SUxRxCxD[(plan.stages - 1) * plan.units:], plan)

  return forward


def jit_forward(plan: Plan, cfg: ModelConfig, mesh, dtype=None, **kw):
  """jit of make_forward, optionally casting params and input to `dtype` (float32 checks)."""
  fwd = make_forward(plan, cfg, mesh, **kw)
  if dtype is None:
    return jax.jit(fwd)
  return jax.jit(lambda p, x: fwd(cast_params(p, dtype), x.astype(dtype)))

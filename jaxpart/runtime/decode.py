"""Decoding on the placed pipeline: one new token per sequence per step through the stages.

The engine's decode schedule, built from the same pieces as its forward (engine.stage_step,
the family's embed, block and head): the batch is split into M decode microbatches of R rows
(decode_cost.decode_microbatches: M = S when S divides the batch). Microbatch m's step k enters
stage 0 at tick k*P + m, P = max(M, S) = S, and moves one stage a tick; the last stage turns it
into the next token (Llama: vocab-parallel logits gathered over the tensor group, then greedy
or temperature/top-k sampling from a key every device derives alike; dense: the output hidden
vector itself) and sends it back to stage 0, which feeds it in P ticks later. With M = S every
stage works on every tick once the ring is full: the bubble is the S - 1 ticks of filling and
draining, (S-1)/(K*S + S-1) over K steps. Each row writes its K/V at its own position (prompts of
different lengths), in place in the whole batch's cache that prefill (engine.make_prefill) left.

A cycle is P ticks: one new token for every sequence. Callers run it again and again, passing
the state on (nothing is recompiled, and memory does not grow with the number of tokens beyond
the cache prefill allocated); the median cycle time is the time per output token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from jaxpart.runtime import compat
from jaxpart.cost import decode as decode_cost
from jaxpart.runtime import engine
from jaxpart.models import families
from jaxpart.runtime import sharding
from jaxpart.config import ModelConfig
from jaxpart.placement.plan import STAGE_AXIS, TENSOR_AXIS, Plan, PlanError


@dataclass(frozen=True)
class Sampling:
  """Greedy (temperature 0) or temperature / top-k sampling from `seed`."""

  temperature: float = 0.0
  top_k: int = 0            # 0: the whole vocabulary
  seed: int = 0

  def __post_init__(self):
    if not (self.temperature >= 0 and self.temperature < float("inf")):
      raise PlanError(f"temperature = {self.temperature!r}: must be 0 (greedy) or a positive "
                      f"finite number")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise PlanError(f"top_k = {self.top_k!r}: must be 0 (no cut) or a positive integer")


@dataclass(frozen=True)
class Schedule:
  """Who works on what at each tick of decoding (pure: no devices)."""

  stages: int
  batch: int
  steps: int                # decode steps K: each feeds one token per sequence

  @property
  def microbatches(self) -> int:
    return decode_cost.decode_microbatches(self.batch, self.stages)

  @property
  def rows(self) -> int:
    return self.batch // self.microbatches

  @property
  def period(self) -> int:
    """Ticks between a microbatch's consecutive steps at stage 0: one cycle."""
    return max(self.microbatches, self.stages)

  @property
  def cycles(self) -> int:
    """Cycles that run every step through every stage (the last ones drain the ring)."""
    return self.steps + -(-(self.stages - 1) // self.period)

  def unit(self, t, stage):
    """(microbatch, step, valid) of the unit `stage` works on at tick t (arrays or ints)."""
    u = t - stage
    m, k = u % self.period, u // self.period
    return m, k, (u >= 0) & (m < self.microbatches) & (k < self.steps)


def sample(logits_RxV, sampling: Sampling, key):
  """Next token of each row: argmax, or a draw at `temperature` from the top_k logits."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_RxV, axis=-1).astype(jnp.int32)
  z = logits_RxV / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(z, sampling.top_k)[0][:, -1:]
    z = jnp.where(z >= kth, z, -jnp.inf)
  return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


def _body(params, kc, vc, recv, pending, out, logits_out, lens_B, t0, key, *, cfg: ModelConfig,
          plan: Plan, sched: Schedule, sampling: Sampling):
  """One cycle (P ticks) on one device. pending: stage 0's next input per microbatch (token
  ids M x R, or hidden vectors M x R x 1 x D); out: what the last stage produced per row and
  step (ids B x K, or hidden vectors B x K x D), held by the last stage (stage axis leading);
  logits_out: each step's logits (B x K x V) when kept (for checks), else a 1-wide stand-in."""
  fam = families.of(cfg)
  S, M, R, K = plan.stages, sched.microbatches, sched.rows, sched.steps
  tp_axis = TENSOR_AXIS if plan.tp > 1 else None
  stage = jax.lax.axis_index(STAGE_AXIS)
  is_last = stage == S - 1
  p_stage, p_edges = fam.split(params)
  out, logits_out = out[0], logits_out[0]
  keep_logits = fam.tokens_in and logits_out.shape[-1] == cfg.vocab
  step = functools.partial(engine.stage_step, cfg=cfg, plan=plan, tp_axis=tp_axis)

  def run(ops):
    x, kc, vc, pos_R, row0 = ops
    with jax.named_scope("decode_step"):
      return step(p_stage, x, kc, vc, pos_R, row0=row0)

  def skip(ops):
    x, kc, vc, _, _ = ops
    return jnp.zeros_like(x), kc, vc

  def last(ops):
    """The finished unit -> (what goes back to stage 0, what is recorded)."""
    y, m, k = ops
    if not fam.tokens_in:
      return y, y[:, 0], jnp.zeros(lrec_shape, jnp.float32)
    logits = engine.mask_padding(fam.head(p_edges, y, cfg, tp_axis)[:, 0], cfg, plan, tp_axis)
    if tp_axis:
      logits = jax.lax.all_gather(logits, TENSOR_AXIS, axis=1, tiled=True)
    ids = sample(logits, sampling, jax.random.fold_in(jax.random.fold_in(key, k), m))  # k < 2^31
    return ids, ids, (logits[:, :cfg.vocab] if keep_logits else jnp.zeros(lrec_shape,
                                                                          jnp.float32))

  fb_shape, rec_shape = pending.shape[1:], (R,) + out.shape[2:]
  rec_dt = out.dtype if fam.tokens_in else recv.dtype     # values; `out` may hold their bits
  lrec_shape = (R, logits_out.shape[-1])

  def record(buf, rec, row0, k, keep):
    """buf[row0:row0+R, k] = rec where keep, in place."""
    at = (row0, k) + (0,) * (buf.ndim - 2)
    old = jax.lax.dynamic_slice(buf, at, (R, 1) + buf.shape[2:])
    return jax.lax.dynamic_update_slice(buf, jnp.where(keep, engine.like(rec[:, None], buf), old),
                                        at)

  def tick(carry, t):
    recv, pending, kc, vc, out, logits_out = carry
    m, k, valid = sched.unit(t, stage)
    m, k = jnp.clip(m, 0, M - 1), jnp.clip(k, 0, K - 1)
    row0 = m * R
    pos_R = jax.lax.dynamic_slice_in_dim(lens_B, row0, R) + k
    fed = pending[m]
    x0 = fam.embed(p_edges, fed[:, None], cfg, tp_axis) if fam.tokens_in else fed
    x = jnp.where(stage == 0, x0.astype(recv.dtype), recv)
    y, kc, vc = jax.lax.cond(valid, run, skip, (x, kc, vc, pos_R, row0))
    fb, rec, lrec = jax.lax.cond(
        is_last & valid, last,
        lambda _: (jnp.zeros(fb_shape, pending.dtype), jnp.zeros(rec_shape, rec_dt),
                   jnp.zeros(lrec_shape, jnp.float32)),
        (y, m, k))
    out = record(out, rec, row0, k, is_last & valid)
    if keep_logits:
      logits_out = record(logits_out, lrec, row0, k, is_last & valid)
    # Back to stage 0, where the unit finished now is fed in again P ticks after it entered.
    with jax.named_scope("feedback"):
      fb = jax.lax.ppermute(fb, STAGE_AXIS, [(S - 1, 0)]) if S > 1 else fb
    m_a, k_a, done = sched.unit(t, S - 1)
    arrived = (stage == 0) & done & (k_a < K - 1)
    m_a = jnp.clip(m_a, 0, M - 1)
    pending = jnp.where(arrived, pending.at[m_a].set(fb.astype(pending.dtype)), pending)
    with jax.named_scope("pipeline_send"):
      recv = jax.lax.ppermute(y, STAGE_AXIS, [(s, s + 1) for s in range(S - 1)]) if S > 1 else y
    return (recv, pending, kc, vc, out, logits_out), None

  ticks = t0 + jnp.arange(sched.period)
  (recv, pending, kc, vc, out, logits_out), _ = jax.lax.scan(
      tick, (recv, pending, kc, vc, out, logits_out), ticks)
  return kc, vc, recv, pending, out[None], logits_out[None]


def make_cycle(plan: Plan, cfg: ModelConfig, mesh, sched: Schedule, sampling: Sampling):
  """jit of (params, state, t0, key) -> state for one cycle; the caches and buffers are donated
  (updated in place). state = (kcache, vcache, recv, pending, out, lens) as init_state makes."""
  if sched.stages != plan.stages:
    raise PlanError(f"schedule for {sched.stages} stages, plan has {plan.stages}")
  body = functools.partial(_body, cfg=cfg, plan=plan, sched=sched, sampling=sampling)
  cache = sharding.SPECS.kv_cache
  per_stage = P(STAGE_AXIS)
  rep = sharding.SPECS.replicated
  mapped = compat.shard_map(
      body, mesh,
      in_specs=(sharding.param_specs(cfg, plan.tp), cache, cache, rep, rep, per_stage,
                per_stage, rep, rep, rep),
      out_specs=(cache, cache, rep, rep, per_stage, per_stage))

  def cycle(params, state, t0, key):
    kc, vc, recv, pending, out, logits, lens = state
    kc, vc, recv, pending, out, logits = mapped(params, kc, vc, recv, pending, out, logits,
                                                lens, t0, key)
    return kc, vc, recv, pending, out, logits, lens

  return jax.jit(cycle, donate_argnums=(1,))


def init_state(plan: Plan, cfg: ModelConfig, mesh, sched: Schedule, kcache, vcache, first,
               lens_B, dtype, keep_logits: bool = False) -> tuple[Any, ...]:
  """The state before the first cycle: prefill's caches (bf16 ones as their bit patterns, as
  make_prefill returns them), each row's first new token (ids B, or hidden vectors B x 1 x D)
  waiting at stage 0, empty output buffers (bf16 vectors as bit patterns too: XLA:CPU would
  widen and copy a bf16 buffer for each in-place update)."""
  fam = families.of(cfg)
  M, R, K, S, B = sched.microbatches, sched.rows, sched.steps, plan.stages, sched.batch
  rep = sharding.replicated(mesh)
  per_stage = jax.sharding.NamedSharding(mesh, P(STAGE_AXIS))
  first = jnp.asarray(first)
  pending = first.reshape((M, R) + tuple(first.shape[1:]))
  out = (jnp.zeros((S, B, K), jnp.int32) if fam.tokens_in     # bf16 vectors kept as bits
         else engine.narrow_as_bits(jnp.zeros((S, B, K, cfg.d_model), dtype)))
  logits = jnp.zeros((S, B, K, cfg.vocab if keep_logits and fam.tokens_in else 1), jnp.float32)
  return (kcache, vcache, jax.device_put(jnp.zeros((R, 1, cfg.d_model), dtype), rep),
          jax.device_put(pending, rep), jax.device_put(out, per_stage),
          jax.device_put(logits, per_stage), jax.device_put(jnp.asarray(lens_B, jnp.int32), rep))

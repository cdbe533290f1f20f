"""Decoding on the placed pipeline: one new token per sequence per step through the stages.

The engine's decode schedule, built from the same pieces as its forward (engine.stage_step,
the family's embed, block and head): the batch is split into M decode microbatches of R rows
(plan.decode_microbatches: M = S when S divides the batch). Microbatch m's step k enters
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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from jaxpart.runtime import compat
from jaxpart.runtime import engine
from jaxpart.runtime import heads
from jaxpart.runtime import streams
from jaxpart.models import families
from jaxpart.runtime import sharding
from jaxpart.config import ModelConfig
from jaxpart.placement.plan import STAGE_AXIS, TENSOR_AXIS, Plan, PlanError, decode_microbatches


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
    return decode_microbatches(self.batch, self.stages)

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


class DecodeState(NamedTuple):
  """What one decode cycle hands the next (placed as state_specs says)."""

  kcache: jax.Array    # the whole batch's K that prefill left: layers x B x positions x G x E
  vcache: jax.Array
  recv: jax.Array      # R x 1 x D: what the previous stage sent on the last tick
  pending: jax.Array   # stage 0's next input per microbatch: ids M x R, or vectors M x R x 1 x D
  out: jax.Array       # S x B x K: the last stage's ids per row and step (vectors: x D, as bits)
  logits: jax.Array    # S x B x K x V: each step's logits when kept (checks), else 1 wide
  lens: jax.Array      # B: each row's prompt length


def state_specs() -> DecodeState:
  cache, rep, per_stage = sharding.SPECS.kv_cache, sharding.SPECS.replicated, P(STAGE_AXIS)
  return DecodeState(cache, cache, rep, rep, per_stage, per_stage, rep)


@dataclass(frozen=True)
class _Decoder:
  """One device's view of a cycle, made once per trace inside shard_map."""

  cfg: ModelConfig
  plan: Plan
  sched: Schedule
  sampling: Sampling
  tp_axis: str | None
  p_stage: Any
  p_edges: Any
  key: Any

  @property
  def fam(self) -> families.Family:
    return families.of(self.cfg)


def _work(dec: _Decoder, x, kc, vc, valid, pos_R, row0):
  """The stage's layers on its microbatch's token (each row at its own position), or nothing."""
  step = functools.partial(engine.stage_step, cfg=dec.cfg, plan=dec.plan, tp_axis=dec.tp_axis)

  def run(ops):
    x, kc, vc = ops
    with jax.named_scope("decode_step"):
      return step(dec.p_stage, x, kc, vc, pos_R, row0=row0)

  def skip(ops):
    x, kc, vc = ops
    return jnp.zeros_like(x), kc, vc

  return jax.lax.cond(valid, run, skip, (x, kc, vc))


def _finish(dec: _Decoder, y, m, k, lrec_shape):
  """The finished unit -> (what goes back to stage 0, what is recorded, its logits)."""
  cfg, tp_axis = dec.cfg, dec.tp_axis
  if not dec.fam.tokens_in:
    return y, y[:, 0], jnp.zeros(lrec_shape, jnp.float32)
  logits = heads.mask_padding(dec.fam.head(dec.p_edges, y, cfg, tp_axis)[:, 0], cfg, dec.plan,
                              tp_axis)
  if tp_axis:
    logits = jax.lax.all_gather(logits, TENSOR_AXIS, axis=1, tiled=True)
  key = jax.random.fold_in(jax.random.fold_in(dec.key, k), m)    # k < 2^31
  ids = sample(logits, dec.sampling, key)
  kept = logits[:, :cfg.vocab] if lrec_shape[-1] == cfg.vocab else jnp.zeros(lrec_shape,
                                                                               jnp.float32)
  return ids, ids, kept


def _record(buf, rec, row0, k, keep):
  """buf[row0:row0+R, k] = rec where keep, in place."""
  at = (row0, k) + (0,) * (buf.ndim - 2)
  old = jax.lax.dynamic_slice(buf, at, (rec.shape[0], 1) + buf.shape[2:])
  return jax.lax.dynamic_update_slice(buf, jnp.where(keep, streams.like(rec[:, None], buf), old),
                                      at)


def _feed_back(dec: _Decoder, pending, fb, t):
  """Back to stage 0, where the unit finished now is fed in again P ticks after it entered."""
  S, M, K = dec.plan.stages, dec.sched.microbatches, dec.sched.steps
  with jax.named_scope("feedback"):
    fb = jax.lax.ppermute(fb, STAGE_AXIS, [(S - 1, 0)]) if S > 1 else fb
  m_a, k_a, done = dec.sched.unit(t, S - 1)
  arrived = (jax.lax.axis_index(STAGE_AXIS) == 0) & done & (k_a < K - 1)
  m_a = jnp.clip(m_a, 0, M - 1)
  return jnp.where(arrived, pending.at[m_a].set(fb.astype(pending.dtype)), pending)


def _tick(dec: _Decoder, st: DecodeState, t) -> tuple[DecodeState, None]:
  """Tick t of a cycle on one device (st.out and st.logits without their stage axis)."""
  S, M, R, K = dec.plan.stages, dec.sched.microbatches, dec.sched.rows, dec.sched.steps
  stage = jax.lax.axis_index(STAGE_AXIS)
  m, k, valid = dec.sched.unit(t, stage)
  m, k = jnp.clip(m, 0, M - 1), jnp.clip(k, 0, K - 1)
  row0 = m * R
  pos_R = jax.lax.dynamic_slice_in_dim(st.lens, row0, R) + k
  fed = st.pending[m]
  x0 = dec.fam.embed(dec.p_edges, fed[:, None], dec.cfg, dec.tp_axis) if dec.fam.tokens_in \
      else fed
  x = jnp.where(stage == 0, x0.astype(st.recv.dtype), st.recv)
  y, kc, vc = _work(dec, x, st.kcache, st.vcache, valid, pos_R, row0)
  done = (stage == S - 1) & valid
  rec_dt = st.out.dtype if dec.fam.tokens_in else st.recv.dtype  # values; `out` may hold bits
  lrec_shape = (R, st.logits.shape[-1])
  fb, rec, lrec = jax.lax.cond(
      done, lambda ops: _finish(dec, *ops, lrec_shape),
      lambda _: (jnp.zeros(st.pending.shape[1:], st.pending.dtype),
                 jnp.zeros((R,) + st.out.shape[2:], rec_dt), jnp.zeros(lrec_shape, jnp.float32)),
      (y, m, k))
  out = _record(st.out, rec, row0, k, done)
  keep_logits = dec.fam.tokens_in and lrec_shape[-1] == dec.cfg.vocab
  logits = _record(st.logits, lrec, row0, k, done) if keep_logits else st.logits
  pending = _feed_back(dec, st.pending, fb, t)
  with jax.named_scope("pipeline_send"):
    recv = jax.lax.ppermute(y, STAGE_AXIS, [(s, s + 1) for s in range(S - 1)]) if S > 1 else y
  return DecodeState(kc, vc, recv, pending, out, logits, st.lens), None


def _body(params, state: DecodeState, t0, key, *, cfg: ModelConfig, plan: Plan,
          sched: Schedule, sampling: Sampling) -> DecodeState:
  """One cycle (P ticks) on one device. out and logits are held by the last stage (their
  stage axis leading, 1 locally)."""
  p_stage, p_edges = families.of(cfg).split(params)
  dec = _Decoder(cfg, plan, sched, sampling, TENSOR_AXIS if plan.tp > 1 else None, p_stage,
                 p_edges, key)
  local = state._replace(out=state.out[0], logits=state.logits[0])
  final, _ = jax.lax.scan(functools.partial(_tick, dec), local, t0 + jnp.arange(sched.period))
  return final._replace(out=final.out[None], logits=final.logits[None])


def make_cycle(plan: Plan, cfg: ModelConfig, mesh, sched: Schedule, sampling: Sampling):
  """jit of (params, state, t0, key) -> state for one cycle; the state (a DecodeState, as
  init_state makes it) is donated: its caches and buffers are updated in place."""
  if sched.stages != plan.stages:
    raise PlanError(f"schedule for {sched.stages} stages, plan has {plan.stages}")
  body = functools.partial(_body, cfg=cfg, plan=plan, sched=sched, sampling=sampling)
  rep = sharding.SPECS.replicated
  mapped = compat.shard_map(
      body, mesh, in_specs=(sharding.param_specs(cfg, plan.tp), state_specs(), rep, rep),
      out_specs=state_specs())
  return jax.jit(mapped, donate_argnums=(1,))


def init_state(plan: Plan, cfg: ModelConfig, mesh, sched: Schedule, kcache, vcache, first,
               lens_B, dtype, keep_logits: bool = False) -> DecodeState:
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
         else streams.narrow_as_bits(jnp.zeros((S, B, K, cfg.d_model), dtype)))
  logits = jnp.zeros((S, B, K, cfg.vocab if keep_logits and fam.tokens_in else 1), jnp.float32)
  return DecodeState(kcache, vcache, jax.device_put(jnp.zeros((R, 1, cfg.d_model), dtype), rep),
                     jax.device_put(pending, rep), jax.device_put(out, per_stage),
                     jax.device_put(logits, per_stage),
                     jax.device_put(jnp.asarray(lens_B, jnp.int32), rep))

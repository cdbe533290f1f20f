"""Generation on a Plan: prefill that keeps the KV cache, then decode cycles; TTFT and TPOT.

Prompts of different lengths sit in one batch right-padded (per-row lengths, not left
padding): each row's real tokens are at positions 0 .. len-1, causal attention never shows a
row its padding, and decode writes row r's k-th new token at position len_r + k, over the
padding. Every row therefore computes what it would alone, which is what the tests compare
with transformers' generate on each prompt.

TTFT is the prefill of the whole batch (and choosing the first new token); TPOT the median
time of a decode cycle, which gives every sequence one more token.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpart.runtime import compat
from jaxpart.runtime import decode
from jaxpart.runtime import engine
from jaxpart.runtime import heads
from jaxpart.models import families
from jaxpart.models import dense as model
from jaxpart.runtime import runs
from jaxpart.runtime import sharding
from jaxpart.runtime import streams
from jaxpart.config import Setup
from jaxpart.runtime.decode import Sampling, Schedule
from jaxpart.placement.plan import Plan, PlanError

PAD = -1   # marks padding after a row's prompt in a batch of token ids


@dataclass
class Generation:
  tokens: np.ndarray                 # B x N new token ids (dense: B x N x D hidden vectors)
  ttft_s: float
  tpot_s: float                      # median decode cycle: one token for every sequence
  cycle_s: list[float]
  schedule: Schedule
  cache_len: int
  logits: np.ndarray | None = None   # B x (N-1) x V: each decode step's logits, when kept
  memory: dict[str, Any] = field(default_factory=dict)

  @property
  def decode_tokens_per_s(self) -> float:
    return self.schedule.batch / self.tpot_s


def split_prompts(ids_BxT: np.ndarray, vocab: int | None) -> tuple[np.ndarray, np.ndarray]:
  """(ids with padding set to 0, per-row lengths) from ids right-padded with PAD."""
  ids = np.asarray(ids_BxT)
  real = ids != PAD
  lens = real.sum(axis=1)
  if not (real == (np.arange(ids.shape[1]) < lens[:, None])).all():
    raise PlanError(f"input ids: padding ({PAD}) must only follow a row's prompt (right padding)")
  if (lens == 0).any():
    raise PlanError(f"input ids: row {int(np.argmin(lens))} has no tokens")
  if vocab is not None and (ids[real].min() < 0 or ids[real].max() >= vocab):
    raise PlanError(f"input ids in {ids[real].min()} .. {ids[real].max()}: the vocabulary is "
                    f"0 .. {vocab - 1} (and {PAD} for padding)")
  return np.where(real, ids, 0).astype(np.int32), lens.astype(np.int32)


class Generator:
  """Prefill and the decode cycle compiled once for one padded shape (the Plan's batch x seq,
  new_tokens): run() serves any number of batches of that shape without recompiling (what a
  static-batch server does; generate() is one run)."""

  def __init__(self, setup: Setup, plan: Plan, params_host, new_tokens: int,
               sampling: Sampling = Sampling(), *, dtype=None, keep_logits: bool = False,
               in_shape: tuple[int, ...] | None = None):
    cfg = setup.model
    if new_tokens < 1:
      raise PlanError(f"new_tokens = {new_tokens}: must be at least 1")
    heads.check_placeable(plan, cfg)    # a one-line PlanError, before placing or tracing
    self.cfg, self.plan, self.fam = cfg, plan, families.of(cfg)
    self.mesh = mesh = sharding.mesh_for(plan)
    self.dt = dt = jnp.dtype(dtype or cfg.dtype)
    self.sampling, self.keep_logits = sampling, keep_logits
    params = runs.global_params(params_host, mesh, cfg)
    self.params = jax.jit(lambda p: model.cast_params(p, dt))(params)
    self.cache_len = plan.decode_cache_len(new_tokens)
    shape = in_shape or (plan.batch, plan.seq) + (() if self.fam.tokens_in else (cfg.d_model,))
    x = jax.ShapeDtypeStruct(shape, jnp.int32 if self.fam.tokens_in else dt,
                             sharding=sharding.input_sharding(mesh, cfg))
    lens = jax.ShapeDtypeStruct((plan.batch,), jnp.int32, sharding=sharding.replicated(mesh))
    self.prefill = jax.jit(engine.make_prefill(plan, cfg, mesh, self.cache_len)).lower(
        self.params, x, lens).compile()
    self.sched = Schedule(plan.stages, plan.batch, new_tokens - 1)
    self.cycle = decode.make_cycle(plan, cfg, mesh, self.sched, sampling)

  def _cycles(self, steps: int | None) -> int:
    sched = self.sched
    if steps is not None and steps < sched.steps:
      return Schedule(sched.stages, sched.batch, steps).cycles if steps > 0 else 0
    return sched.cycles if sched.steps else 0

  def run(self, inp, lens_B, *, memory: bool = False, steps: int | None = None) -> Generation:
    """One batch: prefill `inp` (B x T ids, or B x T x D vectors for dense), then decode.
    steps < new_tokens - 1 stops after the cycles that complete that many decode steps (the
    later tokens are not computed); cycle_s holds every cycle's time."""
    cfg, fam, dt, sched = self.cfg, self.fam, self.dt, self.sched
    x = runs.global_array(inp if fam.tokens_in else np.asarray(inp, dt),
                          sharding.input_sharding(self.mesh, cfg))
    lens = runs.global_array(np.asarray(lens_B, np.int32), sharding.replicated(self.mesh))
    key = jax.random.PRNGKey(self.sampling.seed)
    t0 = time.perf_counter()
    last, kc, vc = self.prefill(self.params, x, lens)   # each row's last prompt position
    last = runs.fetch(last)
    first = (np.asarray(decode.sample(jnp.asarray(last), self.sampling,
                                      jax.random.fold_in(key, 2**31)))
             if fam.tokens_in else last[:, None, :].astype(dt))
    ttft = time.perf_counter() - t0
    state = decode.init_state(self.plan, cfg, self.mesh, sched, kc, vc, first, lens_B, dt,
                              self.keep_logits)
    mem = {}
    if memory:
      mem = {"prefill": compat.compiled_memory(self.prefill).to_dict(),
             "decode_cycle": compat.compiled_memory(
                 self.cycle.lower(self.params, state, jnp.int32(0), key).compile()).to_dict()}
    times = []
    for c in range(self._cycles(steps)):
      t = time.perf_counter()
      state = self.cycle(self.params, state, jnp.int32(c * sched.period), key)
      jax.block_until_ready(state.out)
      times.append(time.perf_counter() - t)
    # the last stage's record (bf16 vectors kept as their bit patterns)
    gen = runs.fetch(streams.from_bits(state.out, jnp.int32 if fam.tokens_in else dt))[-1]
    tokens = np.concatenate([first[:, None] if fam.tokens_in else first, gen], axis=1)
    logits = runs.fetch(state.logits)[-1] if self.keep_logits and fam.tokens_in else None
    return Generation(tokens=tokens, ttft_s=ttft, tpot_s=statistics.median(times) if times else
                      float("nan"), cycle_s=times, schedule=sched, cache_len=self.cache_len,
                      logits=logits, memory=mem)


def generate(setup: Setup, plan: Plan, params_host, inp, lens_B, new_tokens: int,
             sampling: Sampling = Sampling(), *, dtype=None, keep_logits: bool = False,
             memory: bool = False) -> Generation:
  """Prefill `inp` (token ids B x T, or hidden vectors B x T x D for dense) and generate
  new_tokens more per row. Compiles ahead of the timed calls; times are wall times."""
  gen = Generator(setup, plan, params_host, new_tokens, sampling, dtype=dtype,
                  keep_logits=keep_logits, in_shape=np.shape(inp))
  return gen.run(inp, lens_B, memory=memory)

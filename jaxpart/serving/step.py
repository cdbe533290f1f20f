"""The persistent serving step on a placed pipeline: a StepBatch's tokens through every stage.

The same pieces as the forward engine and decode (the family's embed, block and head, the
Plan's mesh and specs, Megatron psums inside the block, ppermute between stages), but a
different program: the unit is one flat list of T tokens from many sequences (prompt chunks
and decode tokens), attention reads and writes the paged pool through block tables
(models/paged_attention.py, passed to the family's block as its `attend`), and the last stage
computes logits only at the step's S logit rows and samples every row with its request's
settings (serving/sampling.py). Beside each row's token it reports the token's raw
log-probability and the top TOP_LOGPROBS (ids, log-probabilities), from the same S x V logits:
S x (1 + 2 K) more outputs, no T x V. Shapes depend only on (T, S, M), so a stream of requests
compiles once per StepBatch shape.

One step at a time goes round the stages: stage s works at tick s and the others wait (a
bubble of S - 1 of S stage-ticks). Several steps in flight round the pipeline, as decode's
microbatches chase each other, is later work.

The pool is L x N x P x G x E per K and V (layers, blocks, tokens a block, local K/V heads,
head dim), placed as the decode cache is (sharding.SPECS.kv_cache: a stage's layers on its
devices, K/V heads split over tp). Inside a stage its layers' pools are one flat array of
Lps * N blocks, and layer l's slots and table entries are offset by l * N blocks, so the
paged kernels write and read in place without slicing a layer out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpart.errors import UserError, check_positive_ints
from jaxpart.models import dense as model
from jaxpart.models import families
from jaxpart.models.paged_attention import paged_step
from jaxpart.models.spec import kv_heads_local
from jaxpart.placement.plan import STAGE_AXIS, TENSOR_AXIS, Plan
from jaxpart.runtime import compat, runs, sharding, streams
from jaxpart.serving.sampling import (TOP_LOGPROBS, RowSettings, StepOut, row_logprobs,
                                      sample_rows)
from jaxpart.serving.scheduler import StepBatch


class StepError(UserError):
  """The model or pool cannot be served by the step (wrong family, bad pool sizes)."""


def _stage_layers(p_stage, x_1xTxD, kpool, vpool, batch, *, cfg, tp_axis):
  """This stage's layers on the step's tokens, each attending through the paged pool."""
  pos_T, slot_T, write_T, tables_SxM = batch
  lps, n, p = kpool.shape[:3]
  blocks = (lps * n,) + kpool.shape[2:]
  # Carried flat (1-D): on XLA:CPU a carried 4-D pool with a size-1 axis (one local K/V head)
  # takes a non-default layout inside the loops and copies to convert it (measured: temp 2.5x
  # the pool, 1x carried flat; 0 once paged_attention also gathers and scatters on flat views).
  kflat, vflat = kpool.reshape(-1), vpool.reshape(-1)
  block = families.of(cfg).block

  def one_layer(carry, layer):
    x, kf, vf = carry
    p_layer, l = layer

    def attend(q_1xTxHxE, k_1xTxGxE, v_1xTxGxE, state):
      kf, vf = state
      w_T = jnp.where(write_T >= 0, write_T + l * n * p, -1)
      tab_SxM = jnp.where(tables_SxM >= 0, tables_SxM + l * n, -1)
      o_TxHxE, kf, vf = paged_step(q_1xTxHxE[0], k_1xTxGxE[0], v_1xTxGxE[0],
                                   kf.reshape(blocks), vf.reshape(blocks), pos_T, slot_T, w_T,
                                   tab_SxM)
      return o_TxHxE[None], (kf.reshape(-1), vf.reshape(-1))

    y, (kf, vf) = block(p_layer, x, pos_T, cfg, attend, (kf, vf), tp_axis)
    return (y, kf, vf), None

  (y, kflat, vflat), _ = jax.lax.scan(one_layer, (x_1xTxD, kflat, vflat),
                                      (p_stage, jnp.arange(lps)))
  return y, kflat.reshape(kpool.shape), vflat.reshape(vpool.shape)


def _head_and_sample(p_edges, y_1xTxD, logit_S, settings, *, cfg, tp_axis):
  """Logits at the S logit rows only (S x V, never T x V), then each row's token and its
  log-probabilities over the true vocabulary (the mesh's padding columns cut off first)."""
  rows_1xSxD = jnp.take(y_1xTxD, jnp.maximum(logit_S, 0), axis=1)
  logits_SxVl = families.of(cfg).head(p_edges, rows_1xSxD, cfg, tp_axis)[0]
  if tp_axis:
    logits_SxVl = jax.lax.all_gather(logits_SxVl, TENSOR_AXIS, axis=1, tiled=True)
  logits_SxV = logits_SxVl[:, :cfg.vocab]
  ids_S = jnp.where(logit_S >= 0, sample_rows(logits_SxV, *settings), -1)
  return (ids_S,) + row_logprobs(logits_SxV, ids_S)


def _no_head(logit_S, cfg):
  """What a stage other than the last contributes to the psum: zeros of the head's shapes."""
  s, k = logit_S.shape[0], min(TOP_LOGPROBS, cfg.vocab)
  return (jnp.zeros((s,), jnp.int32), jnp.zeros((s,), jnp.float32),
          jnp.zeros((s, k), jnp.int32), jnp.zeros((s, k), jnp.float32))


def _body(params, kpool, vpool, ids_T, pos_T, slot_T, write_T, tables_SxM, logit_S, *settings,
          cfg, plan: Plan):
  """One step on one device; returns its pools and the head's outputs (the same everywhere):
  sampled ids, their log-probabilities, the top ids and theirs."""
  fam = families.of(cfg)
  n_stages = plan.stages
  tp_axis = TENSOR_AXIS if plan.tp > 1 else None
  stage = jax.lax.axis_index(STAGE_AXIS)
  p_stage, p_edges = fam.split(params)
  dt = jax.tree.leaves(p_stage)[0].dtype
  with jax.named_scope("embed"):
    x0 = fam.embed(p_edges, ids_T[None], cfg, tp_axis).astype(dt)
  layers = functools.partial(_stage_layers, p_stage, batch=(pos_T, slot_T, write_T, tables_SxM),
                             cfg=cfg, tp_axis=tp_axis)
  perm = [(s, s + 1) for s in range(n_stages - 1)]

  def tick(carry, t):
    x, kp, vp, _ = carry
    with jax.named_scope("stage_step"):
      y, kp, vp = jax.lax.cond(stage == t, lambda o: layers(*o), lambda o: o, (x, kp, vp))
    with jax.named_scope("pipeline_send"):
      x = jax.lax.ppermute(y, STAGE_AXIS, perm) if n_stages > 1 else y
    return (x, kp, vp, y), None

  (_, kpool, vpool, y), _ = jax.lax.scan(tick, (x0, kpool, vpool, x0), jnp.arange(n_stages))
  is_last = stage == n_stages - 1
  with jax.named_scope("head"):
    out = jax.lax.cond(is_last, functools.partial(_head_and_sample, cfg=cfg, tp_axis=tp_axis),
                       lambda *_: _no_head(logit_S, cfg), p_edges, y, logit_S, settings)
  if n_stages > 1:   # x + 0 is exact, so the float outputs cross the stages unchanged
    out = jax.lax.psum(tuple(jnp.where(is_last, o, 0) for o in out), STAGE_AXIS)
  return (kpool, vpool) + tuple(out)


class Stepper:
  """A Plan's compiled serving step with its placed parameters and paged KV pool.

  `traced` lists the token count T of every trace of the step (jit caches the rest, so a
  trace is a compilation): the tests hold it to one per StepBatch shape.
  """

  def __init__(self, setup, plan: Plan, params_host, num_blocks: int, block_tokens: int,
               dtype=None):
    cfg = setup.model
    if not families.of(cfg).tokens_in:
      raise StepError(f"model arch {cfg.arch!r}: serving needs a token model (arch 'llama')")
    self.cfg, self.plan, self.traced = cfg, plan, []
    self.num_blocks, self.block_tokens = num_blocks, block_tokens
    self.mesh = sharding.mesh_for(plan)
    self.dtype = jnp.dtype(dtype or cfg.dtype)
    params = runs.global_params(params_host, self.mesh, cfg)   # vocabulary padded for the mesh
    self.params = jax.jit(lambda p: model.cast_params(p, self.dtype))(params)
    self.kpool, self.vpool = self._empty_pool(num_blocks, block_tokens)
    self._fn = self._compile()

  def _empty_pool(self, num_blocks: int, block_tokens: int):
    check_positive_ints("Stepper", StepError, num_blocks=num_blocks, block_tokens=block_tokens)
    cfg, plan = self.cfg, self.plan
    g = kv_heads_local(cfg, plan.tp) * plan.tp
    shape = (plan.layers, num_blocks, block_tokens, g, cfg.head_dim)
    shard = jax.sharding.NamedSharding(self.mesh, sharding.SPECS.kv_cache)
    make = jax.jit(lambda: streams.narrow_as_bits(jnp.zeros(shape, self.dtype)),
                   out_shardings=shard)   # bf16 kept as bit patterns: updated in place on CPU
    return make(), make()

  def _compile(self):
    body = functools.partial(_body, cfg=self.cfg, plan=self.plan)
    rep, cache = sharding.SPECS.replicated, sharding.SPECS.kv_cache
    mapped = compat.shard_map(
        body, self.mesh,
        in_specs=(sharding.param_specs(self.cfg, self.plan.tp), cache, cache) + (rep,) * 11,
        out_specs=(cache, cache) + (rep,) * 4)

    def step(params, kpool, vpool, *arrays):
      self.traced.append(arrays[0].shape[0])   # Python side effect: runs once per trace
      return mapped(params, kpool, vpool, *arrays)

    return jax.jit(step, donate_argnums=(1, 2))

  @property
  def traces(self) -> int:
    return len(self.traced)

  def step(self, batch: StepBatch, settings: RowSettings) -> StepOut:
    """Run one step: writes its tokens' K/V into the pool; returns each slot's sampled id (-1
    where the slot chose nothing) with its log-probabilities (serving/sampling.StepOut)."""
    arrays = (batch.token_ids, batch.positions, batch.token_slot, batch.write_slots,
              batch.block_tables, batch.logit_index) + settings.arrays()
    self.kpool, self.vpool, *out = self._fn(self.params, self.kpool, self.vpool, *arrays)
    return StepOut(*(np.asarray(o) for o in out))

  def __call__(self, batch: StepBatch, settings: RowSettings) -> np.ndarray:
    """The sampled id per slot only (what the offline loop and the scheduler need)."""
    return self.step(batch, settings).ids_S

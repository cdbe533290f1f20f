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
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxpart.models.spec import kv_heads_local
from jaxpart.config import ModelConfig
from jaxpart.models import attention
from jaxpart.models import families
from jaxpart.models.dense import cast_params
from jaxpart.placement.plan import STAGE_AXIS, TENSOR_AXIS, Plan, PlanError
from jaxpart.runtime import compat
from jaxpart.runtime import sharding
from jaxpart.runtime.heads import (check_placeable, check_stream_width, mask_padding, out_width,
                                   tensor_slice, unpad_output)
from jaxpart.runtime.streams import (as_bits, from_bits, gather_unit, like, narrow_as_bits,
                                     read_piece, scatter_unit, unit_origin, write_piece)


def stage_step(p_stage, x_RxCxD, kcache, vcache, q_start, *, cfg: ModelConfig, plan: Plan,
               tp_axis: str | None, row0=0):
  """Apply this stage's layers to one unit; writes the unit's K/V into the caches.

  p_stage leaves have a leading local-layer axis; caches are Lps x rows x cache_len x G x E (G
  the local K/V heads; rows the unit's, or the whole batch's while generating, the unit's from
  row0). The caches stay whole in the scan's carry and are updated and read in place at
  (layer, ...): slicing one layer's cache out and stacking it back would copy it every step.
  Positions are absolute (q_start + i), so RoPE and the cache agree for every chunk; q_start is
  one position for the unit, or one per row (R,) for a decode step of sequences of different
  lengths. The caches hold values, or the bit patterns of 16-bit floats (narrow_as_bits) in
  the forward-only engine and while decoding: XLA:CPU would rewrite a whole bf16 cache for
  every update.
  """
  block = families.of(cfg).block
  r, c = x_RxCxD.shape[:2]
  per_row = jnp.ndim(q_start) == 1
  pos = (q_start[:, None] if per_row else q_start) + jnp.arange(c)
  rows_R = row0 + jnp.arange(r)

  def one_layer(carry, layer):
    x, kc, vc = carry
    p, l = layer

    def attend(q, k, v, state):
      kc, vc = state
      k, v = like(k, kc), like(v, vc)   # a cache of bit patterns stores them as such
      if per_row:   # each row's token at its own position (c == 1 while decoding)
        kc = kc.at[l, rows_R[:, None], pos].set(k)
        vc = vc.at[l, rows_R[:, None], pos].set(v)
      else:
        at = (l, row0, q_start, 0, 0)
        kc = jax.lax.dynamic_update_slice(kc, k[None], at)
        vc = jax.lax.dynamic_update_slice(vc, v[None], at)
      o = attention.blocked_causal(q, kc, vc, q_start, plan.kv_block, layer=l, row0=row0)
      return o, (kc, vc)

    y, (kc, vc) = block(p, x, pos, cfg, attend, (kc, vc), tp_axis)
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


OUTPUTS = ("logits", "last", "hidden")


class Tick(NamedTuple):
  """The tick loop's carry on one device."""

  recv: jax.Array      # the unit the previous stage sent last tick (as Device.store keeps it)
  kcache: jax.Array    # this stage's K: local layers x rows x positions x local heads x E
  vcache: jax.Array
  out: jax.Array       # this device's share of the output, (B + rows) x positions x W/N


@dataclass(frozen=True)
class Device:
  """What one device's program reads at every tick, made once per trace inside shard_map.

  output: what the last stage writes of each finished unit: "logits" (the head's, every
  position), "last" (the head's at each row's last real position only: what generation needs)
  or "hidden" (the final hidden vectors; forward_logits applies the head chunk by chunk).
  keep: prefill for generation, which keeps the whole batch's K/V.
  """

  cfg: ModelConfig
  plan: Plan
  output: str
  keep: bool
  tp_axis: str | None
  p_stage: Any
  p_edges: Any
  dt: Any               # activations: the weights' dtype
  differentiable: bool  # False: units and outputs kept as bit patterns (make_forward)
  step: Callable        # stage_step under the remat policy

  def store(self, a):
    """How units and outputs are kept between ticks: values, or their bit patterns."""
    return a if self.differentiable else as_bits(a)

  def store_cache(self, a):
    """How the K/V caches are kept: values, or the bits of 16-bit floats (narrow_as_bits)."""
    return a if self.differentiable else narrow_as_bits(a)

  @property
  def fam(self) -> families.Family:
    return families.of(self.cfg)

  @property
  def out_dt(self):
    hidden = self.output == "hidden" or not self.fam.tokens_in
    return self.dt if hidden else self.fam.out_dtype(self.cfg)

  @property
  def out_local(self) -> tuple[int, int, int]:
    """One finished unit's output on one tensor shard."""
    width = self.cfg.d_model if self.output == "hidden" else out_width(self.cfg, self.plan)
    tokens = 1 if self.output == "last" else self.plan.chunk_tokens
    return self.plan.rows, tokens, width // self.plan.tp


def _device(params, *, cfg: ModelConfig, plan: Plan, output: str, keep: bool,
            remat: bool | str, differentiable: bool) -> Device:
  fam = families.of(cfg)
  p_stage, p_edges = fam.split(params)
  tp_axis = TENSOR_AXIS if plan.tp > 1 else None
  step = remat_step(functools.partial(stage_step, cfg=cfg, plan=plan, tp_axis=tp_axis), remat)
  return Device(cfg, plan, output, keep, tp_axis, p_stage, p_edges,
                jax.tree.leaves(p_stage)[0].dtype, differentiable, step)


def _stage_input(dev: Device, inp, in_dt, t):
  """Unit t as stage 0 takes it (every device joins; on bubble ticks past the last unit it
  re-reads the last one, which the stage's cond never uses)."""
  plan = dev.plan
  origin = unit_origin(jnp.minimum(t, plan.units - 1), plan)
  if dev.fam.tokens_in:
    ids_RxC = read_piece(inp, *origin, plan.rows, plan.chunk_tokens)
    with jax.named_scope("embed"):
      return dev.store(dev.fam.embed(dev.p_edges, ids_RxC, dev.cfg, dev.tp_axis))
  unit = gather_unit(inp, *origin, plan)
  return unit if in_dt == dev.dt else dev.store(from_bits(unit, in_dt).astype(dev.dt))


def _work(dev: Device, x, kc, vc, valid, row0, q_start, bubble):
  """The stage's layers on its unit, or (a bubble tick) nothing: what it sends on and the
  caches. Units travel as `store` keeps them; only a stage with a unit makes values of it."""
  def run(ops):
    x, kc, vc = ops
    with jax.named_scope("stage_step"):
      y, kc, vc = dev.step(dev.p_stage, from_bits(x, dev.dt), kc, vc, q_start,
                           row0=row0 if dev.keep else 0)
      return dev.store(y), kc, vc

  def skip(ops):
    x, kc, vc = ops
    return jnp.full_like(x, bubble), kc, vc   # what a bubble tick sends on

  return jax.lax.cond(valid, run, skip, (x, kc, vc))


def _last_positions(lens_B, row0, tok0, plan: Plan):
  """Each of the unit's rows' last real position, relative to the unit's first token, and
  whether it falls inside the unit."""
  rel_R = jax.lax.dynamic_slice_in_dim(lens_B, row0, plan.rows) - 1 - tok0
  return jnp.clip(rel_R, 0, plan.chunk_tokens - 1), (rel_R >= 0) & (rel_R < plan.chunk_tokens)


def _head(dev: Device, y, row0, tok0, lens_B):
  """A finished unit as this tensor shard's slice of the output: the head's logits at every
  position or at each row's last one, or the hidden vectors themselves."""
  y = from_bits(y, dev.dt)
  if dev.output == "hidden":
    return dev.store(tensor_slice(y, dev.tp_axis))
  if dev.output == "last":
    idx_R, _ = _last_positions(lens_B, row0, tok0, dev.plan)
    y = jnp.take_along_axis(y, idx_R[:, None, None], axis=1)
  with jax.named_scope("head"):
    out = dev.fam.head(dev.p_edges, y, dev.cfg, dev.tp_axis)
    return dev.store(mask_padding(out, dev.cfg, dev.plan, dev.tp_axis).astype(dev.out_dt))


def _write_out(dev: Device, out, y_out, u, lens_B):
  """Store this device's block of finished unit u (when it is one) in the output buffer."""
  plan = dev.plan
  valid = (u >= 0) & (u < plan.units)
  row0, tok0 = unit_origin(jnp.clip(u, 0, plan.units - 1), plan)
  piece = scatter_unit(y_out, plan)
  if dev.output != "last":
    return write_piece(out, piece, row0, tok0, valid)
  _, inside_R = _last_positions(lens_B, row0, tok0, plan)   # rows whose last token was here
  at = (jnp.where(valid, row0, out.shape[0] - plan.rows), 0, 0)
  old = jax.lax.dynamic_slice(out, at, piece.shape)
  return jax.lax.dynamic_update_slice(out, jnp.where(inside_R[:, None, None], piece, old), at)


def _tick(dev: Device, inp, in_dt, lens_B, bubble, carry: Tick, t) -> tuple[Tick, None]:
  """Tick t: stage s works on unit t - s; the last stage's output is stored; units move on."""
  S, U = dev.plan.stages, dev.plan.units
  stage = jax.lax.axis_index(STAGE_AXIS)
  u = t - stage
  valid = (u >= 0) & (u < U)
  row0, q_start = unit_origin(jnp.clip(u, 0, U - 1), dev.plan)
  x = jnp.where(stage == 0, _stage_input(dev, inp, in_dt, t), carry.recv)
  y, kc, vc = _work(dev, x, carry.kcache, carry.vcache, valid, row0, q_start, bubble)
  # The last stage finished unit t - (S-1): the head gives each tensor shard its slice of the
  # output, and every device stores its block of that.
  y_out = jax.lax.cond((stage == S - 1) & valid,
                       lambda y: _head(dev, y, row0, q_start, lens_B),
                       lambda _: dev.store(jnp.zeros(dev.out_local, dev.out_dt)), y)
  out = _write_out(dev, carry.out, y_out, t - (S - 1), lens_B)
  with jax.named_scope("pipeline_send"):
    recv = jax.lax.ppermute(y, STAGE_AXIS, [(s, s + 1) for s in range(S - 1)]) if S > 1 else y
  return Tick(recv, kc, vc, out), None


def _first_tick(dev: Device, cache_len: int | None, out_fill: float) -> Tick:
  """The carry before tick 0. Prefill for generation keeps the whole batch's K/V (cache_len
  positions, room for the new tokens); a plain forward one microbatch's, overwritten by the
  next. The output buffer has a spare unit of rows (where bubbles write) and runs to the
  padded sequence."""
  plan, cfg = dev.plan, dev.cfg
  cache_shape = (plan.layers_per_stage, plan.batch if dev.keep else plan.rows,
                 cache_len if dev.keep else plan.cache_len,
                 kv_heads_local(cfg, plan.tp), cfg.head_dim)
  cache = dev.store_cache(jnp.zeros(cache_shape, dev.dt))
  fill = dev.store(jnp.asarray(out_fill, dev.out_dt))
  positions = 1 if dev.output == "last" else plan.padded_seq
  out = jnp.full((plan.batch + plan.rows, positions, dev.out_local[2] // plan.stages), fill,
                 fill.dtype)
  unit = dev.store(jnp.zeros((plan.rows, plan.chunk_tokens, cfg.d_model), dev.dt))
  return Tick(unit, cache, cache, out)


def _pipeline_body(params, inp, lens_B=None, *, cfg: ModelConfig, plan: Plan, output: str,
                   remat: bool | str, bubble_fill: float, out_fill: float,
                   differentiable: bool, keep_cache_len: int | None = None):
  """Per-device program inside shard_map. inp is this device's share of the input stream
  (B x T x D/N hidden vectors), or the token ids (B x T, replicated); lens_B each row's real
  tokens (output "last"; None: every row is whole). The result is this device's share of the
  output stream (B x T x W/N; B x 1 x W/N for "last"), and the caches when kept."""
  dev = _device(params, cfg=cfg, plan=plan, output=output, keep=keep_cache_len is not None,
                remat=remat, differentiable=differentiable)
  in_dt = inp.dtype
  inp = inp if dev.fam.tokens_in else dev.store(inp)
  if lens_B is None:
    lens_B = jnp.full((plan.batch,), plan.seq, jnp.int32)
  bubble = dev.store(jnp.asarray(bubble_fill, dev.dt))
  tick = functools.partial(_tick, dev, inp, in_dt, lens_B, bubble)
  last, _ = jax.lax.scan(tick, _first_tick(dev, keep_cache_len, out_fill),
                         jnp.arange(plan.ticks))
  out = from_bits(last.out[:plan.batch, :plan.seq], dev.out_dt)
  return (out, last.kcache, last.vcache) if dev.keep else out


def _mapped(plan: Plan, cfg: ModelConfig, mesh, output: str, keep_cache_len=None, **body_kw):
  """The device program under shard_map: (params, inp[, lens_B]) -> out[, kcache, vcache]."""
  if output not in OUTPUTS:
    raise ValueError(f"output = {output!r}: valid outputs are {', '.join(OUTPUTS)}")
  check_placeable(plan, cfg)
  if output == "hidden":
    check_stream_width(cfg.d_model, plan)
  body = functools.partial(_pipeline_body, cfg=cfg, plan=plan, output=output,
                           keep_cache_len=keep_cache_len, **body_kw)
  ins = (sharding.param_specs(cfg, plan.tp), sharding.input_spec(cfg))
  cache = sharding.SPECS.kv_cache
  if keep_cache_len is not None:
    return compat.shard_map(body, mesh, in_specs=ins + (sharding.SPECS.replicated,),
                            out_specs=(sharding.SPECS.stream, cache, cache))
  return compat.shard_map(body, mesh, in_specs=ins, out_specs=sharding.SPECS.stream)


def make_forward(plan: Plan, cfg: ModelConfig, mesh, *, remat: bool | str = False,
                 bubble_fill: float = 0.0, out_fill: float = 0.0, differentiable: bool = True,
                 output: str = "logits"):
  """(params, inp) -> out, executing `plan` on `mesh` for the config's model family. Not
  jitted: wrap as you need.

  dense: inp and out are B x T x D hidden vectors, both sharded over every device along D
  (sharding.SPECS.stream): no device ever holds more than 1/N of either. Llama: inp is B x T
  token ids (int32, replicated: 4 bytes a token) and out the float32 logits B x T x V, split
  over every device along V. output "last" gives only each row's last position (B x W),
  "hidden" the final hidden vectors B x T x D (heads.make_logits_chunk turns slices of them into
  logits). remat is one of REMAT_POLICIES (see remat_step); it only changes what a backward
  saves.

  differentiable=False keeps the stream shares as unsigned integers of the same bytes while
  they are sliced and updated (bit for bit the same values). XLA on CPU widens bf16 data
  movement to float32 and hoists that conversion onto the whole share, one or two extra copies
  of it per device; integers are left alone. Integers carry no gradient, so that forward
  refuses jax.grad; leave it True to differentiate.

  bubble_fill is what a stage sends on ticks it has no unit (so what the next stage receives
  then); out_fill what the output buffer holds before units are written. Tests set both to
  NaN to prove neither leaks.
  """
  remat_step(lambda: None, remat)  # reject an unknown policy here, not deep inside a trace
  mapped = _mapped(plan, cfg, mesh, output, remat=remat, bubble_fill=bubble_fill,
                   out_fill=out_fill, differentiable=differentiable)
  if not differentiable:
    mapped = _without_gradient(mapped)

  def forward(params, inp):
    if inp.shape[:2] != (plan.batch, plan.seq):
      raise ValueError(f"input is batch x seq = {inp.shape[:2]}, the plan was made for "
                       f"{(plan.batch, plan.seq)}")
    out = mapped(params, inp)
    out = out if output == "hidden" else unpad_output(out, cfg)
    return out[:, 0] if output == "last" else out

  return forward


def make_prefill(plan: Plan, cfg: ModelConfig, mesh, cache_len: int, **kw):
  """(params, inp, lens_B) -> (last_BxW, kcache, vcache): the forward of make_forward that
  gives only each row's output at its last real position (lens_B - 1: the logits generation
  samples from; no B x T x V tensor anywhere) and keeps every layer's K/V for the whole batch,
  cache_len positions (the prompt and the tokens to come), placed as the Plan places its
  layers: a stage's layers on its devices, K/V heads split over tp (sharding.SPECS.kv_cache).
  Forward only (integer stream buffers); a bf16 cache comes back as its bit patterns (uint16,
  as decoding keeps it: from_bits(kc, dtype) gives the values)."""
  check_placeable(plan, cfg)
  if cache_len % plan.kv_block or cache_len < plan.padded_seq:
    raise PlanError(f"cache_len = {cache_len}: must be a multiple of kv_block = {plan.kv_block} "
                    f"and at least the padded prompt, {plan.padded_seq}")
  mapped = _mapped(plan, cfg, mesh, "last", keep_cache_len=cache_len, remat=False,
                   differentiable=False, bubble_fill=kw.pop("bubble_fill", 0.0),
                   out_fill=kw.pop("out_fill", 0.0))
  if kw:
    raise TypeError(f"make_prefill: unknown options {sorted(kw)}")

  def prefill(params, inp, lens_B):
    out, kc, vc = mapped(params, inp, lens_B)
    return unpad_output(out, cfg)[:, 0], kc, vc

  return prefill


def _without_gradient(f):
  """f, with a backward that says why there is none instead of returning zeros."""
  @jax.custom_vjp
  def g(params, x):
    return f(params, x)

  def bwd(_, ct):
    raise TypeError("this engine forward was built with differentiable=False (integer stream "
                    "buffers): build it with differentiable=True to take gradients")

  g.defvjp(lambda params, x: (f(params, x), None), bwd)
  return g


def jit_forward(plan: Plan, cfg: ModelConfig, mesh, dtype=None, **kw):
  """jit of make_forward, optionally casting params and (hidden-vector) input to `dtype`."""
  fwd = make_forward(plan, cfg, mesh, **kw)
  if dtype is None:
    return jax.jit(fwd)
  cast_in = (lambda x: x) if families.of(cfg).tokens_in else (lambda x: x.astype(dtype))
  return jax.jit(lambda p, x: fwd(cast_params(p, dtype), cast_in(x)))

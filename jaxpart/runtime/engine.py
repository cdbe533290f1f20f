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

from jaxpart.models import attention
from jaxpart.runtime import compat
from jaxpart.models import families
from jaxpart.runtime import sharding
from jaxpart.config import ModelConfig
from jaxpart.models.dense import cast_params
from jaxpart.placement.plan import STAGE_AXIS, TENSOR_AXIS, Plan, PlanError
from jaxpart.placement.shards import padded_vocab


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


def _unit_origin(u, plan: Plan):
  """First batch row and first token of unit u (microbatch-major, chunk-minor)."""
  return (u // plan.n_chunks) * plan.rows, (u % plan.n_chunks) * plan.chunk_tokens


def like(a, cache):
  """a as the cache stores it: values of its dtype, or their bit patterns (forward-only)."""
  if a.dtype == cache.dtype:
    return a
  if jnp.issubdtype(cache.dtype, jnp.unsignedinteger):
    return jax.lax.bitcast_convert_type(a, cache.dtype)
  return a.astype(cache.dtype)


def narrow_as_bits(a):
  """as_bits for a 16-bit float array (which XLA:CPU widens to float32 to update), else a: a
  float32 cache is updated in place as it is, and a bitcast at the boundary of a loop would
  cost it a copy."""
  return as_bits(a) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize < 4 else a


def as_bits(a):
  """The same bytes as unsigned integers (see make_forward's `differentiable`)."""
  return jax.lax.bitcast_convert_type(a, jnp.dtype(f"uint{8 * a.dtype.itemsize}"))


def from_bits(a, dtype):
  return a if a.dtype == dtype else jax.lax.bitcast_convert_type(a, dtype)


def _read_piece(x_BxTxW, row0, tok0, rows: int, tokens: int):
  """This device's slice of one unit of a stream: `rows` rows from row0, `tokens` tokens from
  tok0. Past the end of the sequence (a ragged last chunk) it repeats the last token: those
  positions come after every real token, so causal attention never shows them to a real one,
  their cache slots are masked, and their outputs are never written."""
  x_RxTxW = jax.lax.dynamic_slice_in_dim(x_BxTxW, row0, rows, axis=0)
  idx_C = jnp.minimum(tok0 + jnp.arange(tokens), x_BxTxW.shape[1] - 1)
  return jnp.take(x_RxTxW, idx_C, axis=1)


def _write_piece(out_BpxTpxW, piece_RxCxW, row0, tok0, valid):
  """Write one unit's slice into this device's output buffer, in place. The buffer has a
  spare block of rows past the batch, where invalid units land, and runs to the padded
  sequence, so a ragged last chunk fits whole; both margins are cut off at the end."""
  spare = out_BpxTpxW.shape[0] - piece_RxCxW.shape[0]
  return jax.lax.dynamic_update_slice(out_BpxTpxW, piece_RxCxW,
                                      (jnp.where(valid, row0, spare), tok0, 0))


def _gather_unit(x_BxTxWn, row0, tok0, plan: Plan):
  """The whole width of one input unit at stage 0, from the stream sharded over every device
  (in the stream's own element type: values, or their bit patterns).

  Device (s, t) holds width block t*S + s (sharding.SPECS.stream). Each stage s > 0 sends its
  block of the unit to stage 0 (S - 1 one-pair ppermutes: nothing goes anywhere else), stage 0
  lays the S blocks of its tensor slice side by side, and one all-gather over the tensor group
  completes the width. Other stages run the same all-gather on their own blocks and discard it.
  """
  S = plan.stages
  piece = _read_piece(x_BxTxWn, row0, tok0, plan.rows, plan.chunk_tokens)
  with jax.named_scope("input_gather"):
    pieces = [piece] + [jax.lax.ppermute(piece, STAGE_AXIS, [(k, 0)]) for k in range(1, S)]
    slab = jnp.concatenate(pieces, axis=-1) if S > 1 else piece
    if plan.tp > 1:
      slab = jax.lax.all_gather(slab, TENSOR_AXIS, axis=slab.ndim - 1, tiled=True)
  return slab


def _scatter_unit(y_RxCxWt, plan: Plan):
  """The inverse at the last stage: device (S-1, t) holds its tensor slice of the output (the
  family's head gives it), keeps width block t*S + S-1 of it and sends block t*S + k to stage
  k. Returns the block this device stores."""
  S = plan.stages
  if S == 1:
    return y_RxCxWt
  blocks = jnp.split(y_RxCxWt, S, axis=-1)
  with jax.named_scope("output_scatter"):
    recv = [jax.lax.ppermute(blocks[k], STAGE_AXIS, [(S - 1, k)]) for k in range(S - 1)]
  return jnp.stack(recv + [blocks[S - 1]])[jax.lax.axis_index(STAGE_AXIS)]


def _pipeline_body(params, inp, *, cfg: ModelConfig, plan: Plan, remat: bool | str,
                   bubble_fill: float, out_fill: float, differentiable: bool,
                   keep_cache_len: int | None = None):
  """Per-device program inside shard_map. inp is this device's share of the input stream
  (B x T x D/N hidden vectors), or the token ids (B x T, replicated); the result is its share
  of the output stream (B x T x W/N: hidden vectors or logits)."""
  fam = families.of(cfg)
  S, U = plan.stages, plan.units
  tp_axis = TENSOR_AXIS if plan.tp > 1 else None
  stage = jax.lax.axis_index(STAGE_AXIS)
  is_last = stage == S - 1
  p_stage, p_edges = fam.split(params)
  dt = jax.tree.leaves(p_stage)[0].dtype              # activations: the weights' dtype
  out_dt = fam.out_dtype(cfg) if fam.tokens_in else dt
  store = (lambda a: a) if differentiable else as_bits
  in_dt = inp.dtype
  inp = inp if fam.tokens_in else store(inp)
  unit_shape = (plan.rows, plan.chunk_tokens, cfg.d_model)
  # Prefill for generation keeps the whole batch's K/V (keep_cache_len positions, room for the
  # new tokens); a plain forward keeps one microbatch's, overwritten by the next.
  keep = keep_cache_len is not None
  cache_shape = (plan.layers_per_stage, plan.batch if keep else plan.rows,
                 keep_cache_len if keep else plan.cache_len,
                 families.kv_heads_local(cfg, plan.tp), cfg.head_dim)
  out_local = (plan.rows, plan.chunk_tokens, out_width(cfg, plan) // plan.tp)

  step = remat_step(functools.partial(stage_step, cfg=cfg, plan=plan, tp_axis=tp_axis), remat)

  # Units move between ticks, stages and devices as `store` keeps them (bit patterns in the
  # forward-only engine): every device selects, sends and receives a unit every tick, bubble or
  # not, and on XLA:CPU a bf16 select or send is widened to float32 and back. Only a stage that
  # has a unit turns it into values, inside its cond.
  bubble = store(jnp.asarray(bubble_fill, dt))

  def run(operands):
    x, kc, vc, q_start, row0 = operands
    with jax.named_scope("stage_step"):
      y, kc, vc = step(p_stage, from_bits(x, dt), kc, vc, q_start, row0=row0 if keep else 0)
      return store(y), kc, vc

  def skip(operands):
    x, kc, vc, _, _ = operands
    return jnp.full_like(x, bubble), kc, vc   # what a bubble tick sends on

  def first_unit(t):
    """Unit t as stage 0 takes it (every device joins; on bubble ticks past the last unit it
    re-reads the last one, which the stage's cond never uses)."""
    origin = _unit_origin(jnp.minimum(t, U - 1), plan)
    if fam.tokens_in:
      ids_RxC = _read_piece(inp, *origin, plan.rows, plan.chunk_tokens)
      with jax.named_scope("embed"):
        return store(fam.embed(p_edges, ids_RxC, cfg, tp_axis))
    unit = _gather_unit(inp, *origin, plan)
    return unit if in_dt == dt else store(from_bits(unit, in_dt).astype(dt))

  def head(y):
    with jax.named_scope("head"):
      out = fam.head(p_edges, from_bits(y, dt), cfg, tp_axis)
      return store(mask_padding(out, cfg, plan, tp_axis).astype(out_dt))

  perm = [(s, s + 1) for s in range(S - 1)]

  def tick(carry, t):
    recv, kc, vc, out = carry
    u = t - stage
    valid = (u >= 0) & (u < U)
    row0, q_start = _unit_origin(jnp.clip(u, 0, U - 1), plan)
    x = jnp.where(stage == 0, first_unit(t), recv)
    y, kc, vc = jax.lax.cond(valid, run, skip, (x, kc, vc, q_start, row0))
    # The last stage finished unit t - (S-1): its head gives each tensor shard its slice of
    # the output, and every device stores its block of that.
    y_out = jax.lax.cond(is_last & valid, head,
                         lambda _: store(jnp.zeros(out_local, out_dt)), y)
    u_out = t - (S - 1)
    out = _write_piece(out, _scatter_unit(y_out, plan),
                       *_unit_origin(jnp.clip(u_out, 0, U - 1), plan), (u_out >= 0) & (u_out < U))
    with jax.named_scope("pipeline_send"):
      recv = jax.lax.ppermute(y, STAGE_AXIS, perm) if S > 1 else y
    return (recv, kc, vc, out), None

  fill = store(jnp.asarray(out_fill, out_dt))
  cache_store = (lambda a: a) if differentiable else narrow_as_bits
  init = (store(jnp.zeros(unit_shape, dt)), cache_store(jnp.zeros(cache_shape, dt)),
          cache_store(jnp.zeros(cache_shape, dt)),
          jnp.full((plan.batch + plan.rows, plan.padded_seq, out_local[2] // S), fill,
                   fill.dtype))
  (_, kc, vc, out), _ = jax.lax.scan(tick, init, jnp.arange(plan.ticks))
  out = from_bits(out[:plan.batch, :plan.seq], out_dt)
  return (out, kc, vc) if keep else out


def out_width(cfg: ModelConfig, plan: Plan) -> int:
  """Width of the output stream as placed: the family's, the vocabulary padded to a multiple
  of the devices (shards.padded_vocab) when the output is logits."""
  w = families.of(cfg).out_width(cfg)
  return padded_vocab(w, plan.devices) if families.of(cfg).tokens_in else w


def mask_padding(out_RxCxWl, cfg: ModelConfig, plan: Plan, tp_axis: str | None):
  """A tensor shard's slice of the head's output with the padded vocabulary's logits at -inf,
  so that no sampler can pick them (unchanged when nothing is padded)."""
  if out_width(cfg, plan) == families.of(cfg).out_width(cfg):
    return out_RxCxWl
  wl = out_RxCxWl.shape[-1]
  first = jax.lax.axis_index(tp_axis) * wl if tp_axis else 0
  return jnp.where(first + jnp.arange(wl) < cfg.vocab, out_RxCxWl, -jnp.inf)


def unpad_output(out_BxTxW, cfg: ModelConfig):
  """The output without the padded vocabulary's columns: what every caller sees."""
  w = families.of(cfg).out_width(cfg)
  return out_BxTxW if out_BxTxW.shape[-1] == w else out_BxTxW[..., :w]


def check_stream_width(width: int, plan: Plan, what: str = "d_model") -> None:
  """The input and output streams are split over all devices along their last axis."""
  if width % plan.devices:
    raise PlanError(f"{what} = {width} is not divisible by devices = {plan.devices}: the "
                    f"engine splits the input and output over every device along it; use a "
                    f"device count dividing {width}")


def check_placeable(plan: Plan, cfg: ModelConfig) -> None:
  """Every array the engine places for this Plan splits evenly over its mesh: the streams and
  every parameter leaf (the vocabulary as padded). A PlanError naming the first that does
  not, before anything is traced (JAX would raise from deep inside the trace)."""
  fam = families.of(cfg)
  if not fam.tokens_in:
    check_stream_width(cfg.d_model, plan)
  check_stream_width(out_width(cfg, plan), plan, "vocab" if fam.tokens_in else "d_model")
  sharding.param_local_shapes(sharding.pad_vocab(fam.param_shapes(cfg), cfg, plan.devices),
                              plan, cfg)


def make_forward(plan: Plan, cfg: ModelConfig, mesh, *, remat: bool | str = False,
                 bubble_fill: float = 0.0, out_fill: float = 0.0, differentiable: bool = True):
  """(params, inp) -> out, executing `plan` on `mesh` for the config's model family. Not
  jitted: wrap as you need.

  dense: inp and out are B x T x D hidden vectors, both sharded over every device along D
  (sharding.SPECS.stream): no device ever holds more than 1/N of either. Llama: inp is B x T
  token ids (int32, replicated: 4 bytes a token) and out the float32 logits B x T x V, split
  over every device along V. remat is one of REMAT_POLICIES (see remat_step); it only changes
  what a backward saves.

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
  check_placeable(plan, cfg)
  body = functools.partial(_pipeline_body, cfg=cfg, plan=plan, remat=remat,
                           bubble_fill=bubble_fill, out_fill=out_fill,
                           differentiable=differentiable)
  mapped = compat.shard_map(body, mesh,
                            in_specs=(sharding.param_specs(cfg, plan.tp), sharding.input_spec(cfg)),
                            out_specs=sharding.SPECS.stream)
  if not differentiable:
    mapped = _without_gradient(mapped)

  def forward(params, inp):
    if inp.shape[:2] != (plan.batch, plan.seq):
      raise ValueError(f"input is batch x seq = {inp.shape[:2]}, the plan was made for "
                       f"{(plan.batch, plan.seq)}")
    return unpad_output(mapped(params, inp), cfg)

  return forward


def make_prefill(plan: Plan, cfg: ModelConfig, mesh, cache_len: int, **kw):
  """(params, inp) -> (out, kcache, vcache): the forward of make_forward that also keeps every
  layer's K/V for the whole batch, cache_len positions (the prompt and the tokens to come),
  placed as the Plan places its layers: a stage's layers on its devices, K/V heads split over
  tp (sharding.SPECS.kv_cache). Forward only (integer stream buffers); a bf16 cache comes back
  as its bit patterns (uint16, as decoding keeps it: from_bits(kc, dtype) gives the values)."""
  check_placeable(plan, cfg)
  if cache_len % plan.kv_block or cache_len < plan.padded_seq:
    raise PlanError(f"cache_len = {cache_len}: must be a multiple of kv_block = {plan.kv_block} "
                    f"and at least the padded prompt, {plan.padded_seq}")
  body = functools.partial(_pipeline_body, cfg=cfg, plan=plan, remat=False,
                           differentiable=False, keep_cache_len=cache_len,
                           bubble_fill=kw.pop("bubble_fill", 0.0), out_fill=kw.pop("out_fill", 0.0))
  if kw:
    raise TypeError(f"make_prefill: unknown options {sorted(kw)}")
  cache = sharding.SPECS.kv_cache
  mapped = compat.shard_map(body, mesh,
                            in_specs=(sharding.param_specs(cfg, plan.tp),
                                      sharding.input_spec(cfg)),
                            out_specs=(sharding.SPECS.stream, cache, cache))

  def prefill(params, inp):
    out, kc, vc = mapped(params, inp)
    return unpad_output(out, cfg), kc, vc

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

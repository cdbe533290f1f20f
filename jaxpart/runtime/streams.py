"""The engine's streams between devices and ticks: units read from and written into the
sharded input and output streams, gathered to stage 0 and scattered from the last stage, and
kept as the bit patterns of their values where XLA:CPU would widen a 16-bit float to move it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpart.placement.plan import STAGE_AXIS, TENSOR_AXIS, Plan


def unit_origin(u, plan: Plan):
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


def read_piece(x_BxTxW, row0, tok0, rows: int, tokens: int):
  """This device's slice of one unit of a stream: `rows` rows from row0, `tokens` tokens from
  tok0. Past the end of the sequence (a ragged last chunk) it repeats the last token: those
  positions come after every real token, so causal attention never shows them to a real one,
  their cache slots are masked, and their outputs are never written."""
  x_RxTxW = jax.lax.dynamic_slice_in_dim(x_BxTxW, row0, rows, axis=0)
  idx_C = jnp.minimum(tok0 + jnp.arange(tokens), x_BxTxW.shape[1] - 1)
  return jnp.take(x_RxTxW, idx_C, axis=1)


def write_piece(out_BpxTpxW, piece_RxCxW, row0, tok0, valid):
  """Write one unit's slice into this device's output buffer, in place. The buffer has a
  spare block of rows past the batch, where invalid units land, and runs to the padded
  sequence, so a ragged last chunk fits whole; both margins are cut off at the end."""
  spare = out_BpxTpxW.shape[0] - piece_RxCxW.shape[0]
  return jax.lax.dynamic_update_slice(out_BpxTpxW, piece_RxCxW,
                                      (jnp.where(valid, row0, spare), tok0, 0))


def gather_unit(x_BxTxWn, row0, tok0, plan: Plan):
  """The whole width of one input unit at stage 0, from the stream sharded over every device
  (in the stream's own element type: values, or their bit patterns).

  Device (s, t) holds width block t*S + s (sharding.SPECS.stream). Each stage s > 0 sends its
  block of the unit to stage 0 (S - 1 one-pair ppermutes: nothing goes anywhere else), stage 0
  lays the S blocks of its tensor slice side by side, and one all-gather over the tensor group
  completes the width. Other stages run the same all-gather on their own blocks and discard it.
  """
  S = plan.stages
  piece = read_piece(x_BxTxWn, row0, tok0, plan.rows, plan.chunk_tokens)
  with jax.named_scope("input_gather"):
    pieces = [piece] + [jax.lax.ppermute(piece, STAGE_AXIS, [(k, 0)]) for k in range(1, S)]
    slab = jnp.concatenate(pieces, axis=-1) if S > 1 else piece
    if plan.tp > 1:
      slab = jax.lax.all_gather(slab, TENSOR_AXIS, axis=slab.ndim - 1, tiled=True)
  return slab


def scatter_unit(y_RxCxWt, plan: Plan):
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

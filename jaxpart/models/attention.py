"""Causal attention: the full reference and a blocked online-softmax form for chunk steps.

Shapes: B batch, Q query tokens, K key tokens, H query heads and G K/V heads (local to a tensor
shard), E head_dim.
Scores and softmax statistics are float32 for bf16 and float32 inputs, float64 for float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite "minus infinity": a fully masked row never produces NaN


def acc_dtype(dtype):
  """Accumulate in float32, or wider if the inputs are (float64 gradient checks need it)."""
  return jnp.promote_types(dtype, jnp.float32)


def full_causal(q_BxQxHxE, k_BxKxHxE, v_BxKxHxE):
  """Reference: builds the whole Q x K score matrix; Q == K, token i sees tokens <= i."""
  scale = q_BxQxHxE.shape[-1] ** -0.5
  acc = acc_dtype(q_BxQxHxE.dtype)
  s_BxHxQxK = jnp.einsum("bqhe,bkhe->bhqk", q_BxQxHxE, k_BxKxHxE,
                         preferred_element_type=acc) * scale
  n_q, n_k = q_BxQxHxE.shape[1], k_BxKxHxE.shape[1]
  mask_QxK = jnp.arange(n_q)[:, None] >= jnp.arange(n_k)[None, :]
  s_BxHxQxK = jnp.where(mask_QxK, s_BxHxQxK, _NEG)
  p_BxHxQxK = jax.nn.softmax(s_BxHxQxK, axis=-1)
  out = jnp.einsum("bhqk,bkhe->bqhe", p_BxHxQxK.astype(v_BxKxHxE.dtype), v_BxKxHxE,
                   preferred_element_type=acc)
  return out.astype(q_BxQxHxE.dtype)


def blocked_causal(q_BxQxHxE, kcache_BxCxGxE, vcache_BxCxGxE, q_start, kv_block: int,
                   layer=None, q_block: int | None = None, row0=0):
  """Queries at absolute positions q_start .. q_start+Q-1 against a KV cache of C positions.

  q_start is one position for every row, or one per row (B,): decoding sequences of different
  lengths. The caches may hold more rows than q (the whole batch while decoding); rows
  row0 .. row0+B-1 are read. With `layer` given, the caches carry a leading layer axis
  (L x B x C x G x E) and blocks are read from that layer in place, without copying its cache
  out first. G is the number of K/V
  heads: H query heads share them in groups of H / G (grouped-query attention; G == H is plain
  multi-head attention).

  Queries are cut into tiles of q_block (default kv_block) and keys into blocks of kv_block.
  Each query tile visits, with a running max and sum (flash-style), only the KV blocks that
  start at or before its own last query; the others are skipped by lax.cond. So a whole
  sequence costs the causal triangle plus half a tile per diagonal block, not the full square
  (cost/counts.tile_visits counts the blocks each tile visits),
  and a step never holds more than a q_block x kv_block score tile. The last tile is padded
  with zero queries and its padded rows are dropped. Keys after the chunk's last real query are
  masked and their values zeroed, so stale or padded cache slots (even NaN) never reach an
  output or a gradient. The caches may hold bit patterns (see `values`).
  """
  b, n_q, h, e = q_BxQxHxE.shape
  n_cache, g = kcache_BxCxGxE.shape[-3], kcache_BxCxGxE.shape[-2]
  if n_cache % kv_block:
    raise ValueError(f"cache length {n_cache} must be a multiple of kv_block {kv_block}")
  if h % g:
    raise ValueError(f"{h} query heads cannot share {g} K/V heads: {g} must divide {h}")
  q_block = min(q_block or kv_block, n_q)
  n_blocks = n_cache // kv_block
  n_tiles = -(-n_q // q_block)
  scale = e ** -0.5
  acc = acc_dtype(q_BxQxHxE.dtype)
  q_start_B = jnp.broadcast_to(jnp.asarray(q_start, jnp.int32), (b,))
  last_real_B = q_start_B + n_q - 1
  pad = n_tiles * q_block - n_q
  q = jnp.pad(q_BxQxHxE, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else q_BxQxHxE
  # tiles x B x q_block x G x H/G x E: the query heads of one K/V head sit together.
  q_NxBxQxGxRxE = jnp.moveaxis(q.reshape(b, n_tiles, q_block, g, h // g, e), 1, 0)

  def tile(i, q_BxQxGxRxE):
    first_B = q_start_B + i * q_block
    last_q = jnp.max(jnp.minimum(first_B + q_block - 1, last_real_B))
    q_pos_BxQ = first_B[:, None] + jnp.arange(q_block)

    def visit(carry, j):
      m_BxGxRxQ, l_BxGxRxQ, acc_BxQxGxRxE = carry
      k_BxKxGxE, v_BxKxGxE = (values(_block(c, j * kv_block, kv_block, layer, row0, b),
                                     q_BxQxHxE.dtype)
                              for c in (kcache_BxCxGxE, vcache_BxCxGxE))
      k_pos_K = j * kv_block + jnp.arange(kv_block)
      real_BxK = k_pos_K[None, :] <= last_real_B[:, None]
      v_BxKxGxE = jnp.where(real_BxK[:, :, None, None], v_BxKxGxE, 0)
      s = jnp.einsum("bqgre,bkge->bgrqk", q_BxQxGxRxE, k_BxKxGxE,
                     preferred_element_type=acc) * scale
      seen_BxQxK = (q_pos_BxQ[:, :, None] >= k_pos_K[None, None, :]) & real_BxK[:, None, :]
      s = jnp.where(seen_BxQxK[:, None, None], s, _NEG)
      m_new = jnp.maximum(m_BxGxRxQ, s.max(axis=-1))
      p = jnp.exp(s - m_new[..., None])
      # Masked entries give exp(_NEG - m) == 0 once any real key has been seen; before that
      # (m == _NEG) they give 1 and are wiped out by `correction` at the first real key.
      correction = jnp.exp(m_BxGxRxQ - m_new)
      l_new = l_BxGxRxQ * correction + p.sum(axis=-1)
      pv = jnp.einsum("bgrqk,bkge->bqgre", p.astype(v_BxKxGxE.dtype), v_BxKxGxE,
                      preferred_element_type=acc)
      acc_new = acc_BxQxGxRxE * jnp.moveaxis(correction, 3, 1)[..., None] + pv
      return m_new, l_new, acc_new

    def step(carry, j):
      return jax.lax.cond(j * kv_block <= last_q, visit, lambda c, _: c, carry, j), None

    init = (jnp.full((b, g, h // g, q_block), _NEG, acc), jnp.zeros((b, g, h // g, q_block), acc),
            jnp.zeros((b, q_block, g, h // g, e), acc))
    (_, l, o), _ = jax.lax.scan(step, init, jnp.arange(n_blocks))
    return (o / jnp.moveaxis(l, 3, 1)[..., None]).astype(q_BxQxHxE.dtype)

  if n_tiles == 1:
    o_NxBxQxGxRxE = tile(0, q_NxBxQxGxRxE[0])[None]
  else:
    _, o_NxBxQxGxRxE = jax.lax.scan(lambda c, a: (c, tile(*a)), None,
                                    (jnp.arange(n_tiles), q_NxBxQxGxRxE))
  o = jnp.moveaxis(o_NxBxQxGxRxE, 0, 1).reshape(b, n_tiles * q_block, h, e)
  return o[:, :n_q] if pad else o


def values(a, dtype):
  """A cache block as values of `dtype`: a cache may hold their bit patterns (unsigned
  integers of the same width), which XLA:CPU updates in place where it would widen a bf16
  cache to float32 and rewrite all of it for every chunk's K/V."""
  if a.dtype == dtype or not jnp.issubdtype(a.dtype, jnp.unsignedinteger):
    return a
  return jax.lax.bitcast_convert_type(a, dtype)


def _block(cache, start, size: int, layer, row0=0, rows: int | None = None):
  """cache[layer][row0:row0+rows, start:start+size] (no layer axis: cache[row0:..., start:...])."""
  if layer is None:
    bc, _, g, e = cache.shape
    return jax.lax.dynamic_slice(cache, (row0, start, 0, 0), (rows or bc, size, g, e))
  _, bc, _, g, e = cache.shape
  return jax.lax.dynamic_slice(cache, (layer, row0, start, 0, 0),
                               (1, rows or bc, size, g, e))[0]

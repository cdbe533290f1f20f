"""Causal attention: the full reference and a blocked online-softmax form for chunk steps.

Shapes: B batch, Q query tokens, K key tokens, H heads (local to a tensor shard), E head_dim.
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


def blocked_causal(q_BxQxHxE, kcache_BxCxHxE, vcache_BxCxHxE, q_start, kv_block: int,
                   layer=None):
  """Queries at absolute positions q_start .. q_start+Q-1 against a KV cache of C positions.

  With `layer` given, the caches carry a leading layer axis (L x B x C x H x E) and blocks are
  read from that layer in place, without copying its cache out first.

  Visits the cache in blocks of kv_block keys with a running max and sum (flash-style), and
  skips, with lax.cond, every block that starts after the last query: a step never holds more
  than a Q x kv_block score tile and its cost grows with the prefix, not with C. Cache entries
  after a query's position are masked, so stale or padded entries there are never read.
  """
  b, n_q, h, e = q_BxQxHxE.shape
  n_cache = kcache_BxCxHxE.shape[-3]
  if n_cache % kv_block:
    raise ValueError(f"cache length {n_cache} must be a multiple of kv_block {kv_block}")
  n_blocks = n_cache // kv_block
  scale = e ** -0.5
  acc = acc_dtype(q_BxQxHxE.dtype)
  q_pos_Q = q_start + jnp.arange(n_q)
  last_q = q_start + n_q - 1

  def visit(carry, j):
    m_BxHxQ, l_BxHxQ, acc_BxQxHxE = carry
    k_BxKxHxE, v_BxKxHxE = (_block(c, j * kv_block, kv_block, layer)
                            for c in (kcache_BxCxHxE, vcache_BxCxHxE))
    s = jnp.einsum("bqhe,bkhe->bhqk", q_BxQxHxE, k_BxKxHxE,
                   preferred_element_type=acc) * scale
    k_pos_K = j * kv_block + jnp.arange(kv_block)
    # Keys after the last query are masked in s; zero their values too, so that whatever a
    # stale or padded cache slot holds (even NaN) cannot reach the output through 0 * v.
    v_BxKxHxE = jnp.where((k_pos_K <= last_q)[None, :, None, None], v_BxKxHxE, 0)
    s = jnp.where(q_pos_Q[:, None] >= k_pos_K[None, :], s, _NEG)
    m_new = jnp.maximum(m_BxHxQ, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    # Masked entries give exp(_NEG - m) == 0 once any real key has been seen; before that
    # (m == _NEG) they give 1 and are wiped out by `correction` at the first real key.
    correction = jnp.exp(m_BxHxQ - m_new)
    l_new = l_BxHxQ * correction + p.sum(axis=-1)
    pv = jnp.einsum("bhqk,bkhe->bqhe", p.astype(v_BxKxHxE.dtype), v_BxKxHxE,
                    preferred_element_type=acc)
    acc_new = acc_BxQxHxE * jnp.moveaxis(correction, 1, 2)[..., None] + pv
    return m_new, l_new, acc_new

  def step(carry, j):
    needed = j * kv_block <= last_q
    return jax.lax.cond(needed, visit, lambda c, _: c, carry, j), None

  init = (jnp.full((b, h, n_q), _NEG, acc), jnp.zeros((b, h, n_q), acc),
          jnp.zeros((b, n_q, h, e), acc))
  (_, l_BxHxQ, acc_BxQxHxE), _ = jax.lax.scan(step, init, jnp.arange(n_blocks))
  out = acc_BxQxHxE / jnp.moveaxis(l_BxHxQ, 1, 2)[..., None]
  return out.astype(q_BxQxHxE.dtype)


def _block(cache, start, size: int, layer):
  """cache[layer][:, start:start+size] (or cache[:, start:start+size] with no layer axis)."""
  if layer is None:
    return jax.lax.dynamic_slice_in_dim(cache, start, size, axis=1)
  _, b, _, h, e = cache.shape
  return jax.lax.dynamic_slice(cache, (layer, 0, start, 0, 0), (1, b, size, h, e))[0]

"""Attention of one serving step's tokens against a paged KV cache.

A step is a flat list of T tokens from several sequences (prompt chunks and decode tokens
mixed, padded; serving/scheduler.py's StepBatch). The cache is a pool of N blocks of P token
slots (N x P x G x E); each sequence owns blocks through its row of the block table, so its
K/V need not be contiguous and memory is taken as it grows. Each token's K/V is first written
to its slot, then each token attends to the positions <= its own of its sequence, read block by
block through the table with a running max and sum (flash-style, as attention.blocked_causal):
no step holds more than T x P scores per head, and shapes never depend on the request mix.

Shapes: T step tokens, S sequence slots, M blocks per sequence (the table's width), N pool
blocks, P tokens per block, H query heads, G K/V heads (H / G queries share one; GQA), E head
dim. Scores and softmax statistics accumulate as attention.acc_dtype says.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpart.models.attention import _NEG, acc_dtype, values


def write_kv(kcache_NxPxGxE, vcache_NxPxGxE, k_TxGxE, v_TxGxE, write_T):
  """The caches with each token's K/V in its flat slot write_T (block x P + offset); tokens
  with a negative slot (padding) write nothing. A cache of unsigned integers holds the bit
  patterns of the values (attention.values): K/V are bitcast into it."""
  n, p, g, e = kcache_NxPxGxE.shape
  slots_T = jnp.where(write_T < 0, n * p, write_T)   # out of range: dropped

  def put(cache, x):
    if jnp.issubdtype(cache.dtype, jnp.unsignedinteger) and cache.dtype != x.dtype:
      x = jax.lax.bitcast_convert_type(x, cache.dtype)
    # Scatter element-wise into a 1-D view: a row scatter on the 4-D pool copies the whole pool
    # on XLA:CPU (temp ~1x pool); this one updates in place (temp ~ the step's K/V).
    idx = (slots_T[:, None] * (g * e) + jnp.arange(g * e)).reshape(-1)
    flat = cache.reshape(n * p * g * e).at[idx].set(x.astype(cache.dtype).reshape(-1),
                                                     mode="drop")
    return flat.reshape(n, p, g, e)

  return put(kcache_NxPxGxE, k_TxGxE), put(vcache_NxPxGxE, v_TxGxE)


def paged_attention(q_TxHxE, kcache_NxPxGxE, vcache_NxPxGxE, positions_T, token_slot_T,
                    tables_SxM):
  """Each token's attention over its sequence's cached positions 0 .. positions_T (causal by
  absolute position). token_slot_T names the sequence slot (row of tables_SxM) of each token;
  -1 marks padding, whose output is zero. Table entries < 0 are blocks not held; positions
  past a token's own are masked and their values zeroed, so stale slots never reach an output.
  """
  t, h, e = q_TxHxE.shape
  _, p, g, _ = kcache_NxPxGxE.shape
  if h % g:
    raise ValueError(f"{h} query heads cannot share {g} K/V heads: {g} must divide {h}")
  acc = acc_dtype(q_TxHxE.dtype)
  scale = e ** -0.5
  real_T = token_slot_T >= 0
  table_TxM = tables_SxM[jnp.where(real_T, token_slot_T, 0)]
  pos_T = jnp.where(real_T, positions_T, -1)
  last = jnp.max(pos_T)
  q_TxGxRxE = q_TxHxE.reshape(t, g, h // g, e)

  def visit(carry, j):
    m_TxGxR, l_TxGxR, o_TxGxRxE = carry
    block_T = table_TxM[:, j]
    # Gather whole blocks from a 2-D (blocks x block elements) view: gathering from the 4-D
    # pool made XLA:CPU copy the pool first.
    k_TxPxGxE, v_TxPxGxE = (
        values(c.reshape(c.shape[0], p * g * e)[jnp.maximum(block_T, 0)].reshape(t, p, g, e),
               q_TxHxE.dtype) for c in (kcache_NxPxGxE, vcache_NxPxGxE))
    k_pos_P = j * p + jnp.arange(p)
    seen_TxP = (k_pos_P[None, :] <= pos_T[:, None]) & (block_T >= 0)[:, None]
    v_TxPxGxE = jnp.where(seen_TxP[:, :, None, None], v_TxPxGxE, 0)
    s = jnp.einsum("tgre,tpge->tgrp", q_TxGxRxE, k_TxPxGxE, preferred_element_type=acc) * scale
    s = jnp.where(seen_TxP[:, None, None, :], s, _NEG)
    m_new = jnp.maximum(m_TxGxR, s.max(axis=-1))
    # Masked scores give exp(_NEG - m) == 0 once a real key is seen; before that they give 1
    # and `correction` wipes them out at the first real key (block 0 holds position 0).
    pr = jnp.exp(s - m_new[..., None])
    correction = jnp.exp(m_TxGxR - m_new)
    pv = jnp.einsum("tgrp,tpge->tgre", pr.astype(v_TxPxGxE.dtype), v_TxPxGxE,
                    preferred_element_type=acc)
    return m_new, l_TxGxR * correction + pr.sum(axis=-1), o_TxGxRxE * correction[..., None] + pv

  def step(carry, j):
    return jax.lax.cond(j * p <= last, visit, lambda c, _: c, carry, j), None

  init = (jnp.full((t, g, h // g), _NEG, acc), jnp.zeros((t, g, h // g), acc),
          jnp.zeros((t, g, h // g, e), acc))
  (_, l_TxGxR, o_TxGxRxE), _ = jax.lax.scan(step, init, jnp.arange(tables_SxM.shape[1]))
  l_TxGxR = jnp.where(l_TxGxR > 0, l_TxGxR, 1)
  out_TxGxRxE = jnp.where(real_T[:, None, None, None], o_TxGxRxE / l_TxGxR[..., None], 0)
  return out_TxGxRxE.reshape(t, h, e).astype(q_TxHxE.dtype)


def paged_step(q_TxHxE, k_TxGxE, v_TxGxE, kcache_NxPxGxE, vcache_NxPxGxE, positions_T,
               token_slot_T, write_T, tables_SxM):
  """One layer's attention for a step: write the step's K/V, then attend through the tables.
  Returns (out_TxHxE, kcache, vcache)."""
  kc, vc = write_kv(kcache_NxPxGxE, vcache_NxPxGxE, k_TxGxE, v_TxGxE, write_T)
  return paged_attention(q_TxHxE, kc, vc, positions_T, token_slot_T, tables_SxM), kc, vc

"""Sharding-independent checksums of arrays, and the check of restored arrays against them.

orbax does not check content: a flipped byte in its zstd data can restore silently as
different numbers. A leaf's checksum is a sum over its elements, modulo 2^32 in two lanes, of a
hash of (global index, bit pattern). Under jit each device sums the shard it holds and one
all-reduce (across processes too) adds the parts; the value does not depend on how the array is
split, so a converted checkpoint must carry the source's checksums exactly, and the whole model
is never gathered to compute it. It detects damage, not tampering.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxpart import validate
from jaxpart.checkpoint.bars import array_bytes, phase
from jaxpart.checkpoint.manifest import CheckpointError, dtype_name

_SEEDS = (0x9E3779B9, 0x85EBCA6B)


def _mix(h):
  """lowbias32 (C. Wellons' hash prospector): a full-avalanche 32-bit finaliser."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def _words(x):
  """The bit pattern as uint32 words; 8-byte dtypes gain a trailing axis of two words."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32)


def _leaf_sums(x):
  """Two lanes of sum over elements of hash(global index, bits), wrapping modulo 2^32.

  Written over the global array: under jit, XLA partitions the iotas and the reduction to
  match x's sharding (local sums, then one all-reduce, across processes too), and because
  wrapping integer addition is associative and commutative the result is the same bits for
  every sharding.
  """
  w = _words(x)
  out = []
  for seed in _SEEDS:
    h = jnp.uint32(seed)
    for a, n in enumerate(w.shape):   # h broadcasts up one axis at a time
      shape = [1] * w.ndim
      shape[a] = n
      i = jax.lax.broadcasted_iota(jnp.uint32, shape, a)
      h = _mix(h ^ _mix(i + jnp.uint32((seed + a * 0x632BE5AB) & 0xFFFFFFFF)))
    out.append(jnp.sum(_mix(h + _mix(w ^ jnp.uint32(seed))), dtype=jnp.uint32))
  return jnp.stack(out)


@jax.jit
def _tree_sums(leaves: list):
  return [_leaf_sums(x) for x in leaves]


def checksums(flat: dict[str, Any], progress: bool = False,
              desc: str = "checksum") -> dict[str, str]:
  """Checksum of every leaf, in one jitted call (one compile per placement of the tree)."""
  leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in flat.values()]
  with phase(desc, progress, sum(array_bytes(x) for x in leaves)):
    sums = [_local_value(s) for s in _tree_sums(leaves)]
  return {p: f"{int(s[0]):08x}{int(s[1]):08x}" for p, s in zip(flat, sums)}


def _local_value(s: jax.Array) -> np.ndarray:
  """A (replicated) result on the host; across processes every process holds the whole of it."""
  if s.is_fully_addressable:
    return np.asarray(s)
  if not s.is_fully_replicated:
    raise CheckpointError(f"checksum result is split across processes ({s.sharding})")
  return np.asarray(s.addressable_data(0))


def checksum(x) -> str:
  return checksums({"x": x})["x"]


def verify(flat: dict[str, Any], entries: dict[str, dict], where: str, progress: bool,
            prefix: str = "") -> dict[str, str]:
  if set(flat) != set(entries):
    raise CheckpointError(f"{where}: read {prefix or 'params/'}{sorted(flat)}, the manifest "
                          f"lists {sorted(entries)}")
  for p, x in flat.items():
    e = entries.get(p)
    if e is None:
      raise CheckpointError(f"{where}: {prefix}{p} is not in the manifest")
    if list(x.shape) != e["shape"] or dtype_name(x.dtype) != e["dtype"]:
      raise CheckpointError(f"{where}: {prefix}{p} read as {dtype_name(x.dtype)}"
                            f"{list(x.shape)}, the manifest says {e['dtype']}{e['shape']}")
  sums = checksums(flat, progress, f"verify {prefix or 'params'}".strip("/"))
  bad = [f"{prefix}{p} (manifest {entries[p]['checksum']}, data {s})"
         for p, s in sums.items() if s != entries[p]["checksum"]]
  if bad:
    raise CheckpointError(f"{where}: checksum mismatch, the array data is corrupted: "
                          f"{'; '.join(bad)}")
  return sums


# --- non-finite values ---------------------------------------------------------------------

_INT32_LIMIT = 2**31


def _kept_axes(shape: tuple[int, ...]) -> int:
  """Leading axes kept by the count so each partial count (an int32) cannot overflow."""
  k = 0
  while k < len(shape) and math.prod(shape[k:]) >= _INT32_LIMIT:
    k += 1
  return k


@functools.partial(jax.jit, static_argnums=0)
def _nonfinite_parts(kept: tuple[int, ...], leaves: list):
  out = []
  for k, x in zip(kept, leaves):
    axes = tuple(range(k, x.ndim))
    out.append((jnp.sum(jnp.isnan(x), axis=axes, dtype=jnp.int32),
                jnp.sum(jnp.isinf(x), axis=axes, dtype=jnp.int32)))
  return out


def _host_total(part: jax.Array) -> int:
  """Exact total of int32 partial counts (x64 is off on the device, so summed here)."""
  a = part if part.is_fully_addressable else multihost_utils.process_allgather(part, tiled=True)
  return int(np.asarray(a, dtype=np.int64).sum())


def nonfinite(flat: dict[str, Any], progress: bool = False,
              desc: str = "check finite") -> dict[str, tuple[int, int, int]]:
  """{leaf: (NaN count, Inf count, size)} for the floating leaves holding any, counted where
  the shards live (one jitted call, like the checksums): no leaf is gathered to check it."""
  floats = {p: x if isinstance(x, jax.Array) else jnp.asarray(x) for p, x in flat.items()
            if jnp.issubdtype(x.dtype, jnp.inexact)}
  if not floats:
    return {}
  leaves = list(floats.values())
  kept = tuple(_kept_axes(tuple(x.shape)) for x in leaves)
  with phase(desc, progress, sum(array_bytes(x) for x in leaves)):
    parts = _nonfinite_parts(kept, leaves)
  out = {}
  for (p, x), (nan, inf) in zip(floats.items(), parts):
    counts = (_host_total(nan), _host_total(inf), math.prod(x.shape))
    if counts[0] or counts[1]:
      out[p] = counts
  return out


def check_finite(flat: dict[str, Any], where: str, allow_nonfinite: bool, progress: bool = False,
                 prefix: str = "") -> dict[str, str]:
  """NonFiniteError naming the first leaf with NaN or Inf (and counting them) unless allowed;
  the non-finite leaves either way, for `verify` to list."""
  counts = nonfinite(flat, progress, f"check finite {prefix or 'params'}".strip("/"))
  return validate.check_finite_counts(where, {prefix + p: c for p, c in counts.items()},
                                      allow_nonfinite)

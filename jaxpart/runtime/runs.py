"""Set up and check one forward of a Plan: parameters and input on the mesh, engine vs reference.

Arrays are built with make_array_from_callback from host copies made from a seed, so every
process of a multi-host run builds the same global arrays without any device holding the whole
model first.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxpart import paths, validate
from jaxpart.runtime import engine
from jaxpart.runtime import heads
from jaxpart.models import families
from jaxpart.models import dense as model
from jaxpart.runtime import sharding
from jaxpart.config import Setup
from jaxpart.placement.plan import Plan


# A float32 engine against the float32 reference (or the float64 oracle), max|diff| / max|ref|.
# Measured on tiny with random norms, both placements: <= 3.7e-7 (the 39 dumps: <= 5.1e-7);
# 2e-6 leaves ~4x margin, and still fails a LayerNorm eps of 1e-6 for 1e-5 (which moves the
# output by 3.6e-6 to 4.3e-6 relative).
F32_REL_TOL = 2e-6
# float64 engine against the float64 reference: rounding at 1e-16 through a few hundred
# operations per output lands near 1e-15; float32 anywhere inside gives 1e-7 and up.
F64_REL_TOL = 1e-12


def global_array(host, shard):
  """A global jax.Array with `shard` sharding whose shards are read from a host array."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, shard, lambda idx: host[idx])


def global_params(params_host, mesh, cfg):
  """A host parameter tree as the engine's global arrays: the Plan's shardings, the
  vocabulary padded for the mesh (sharding.pad_vocab)."""
  padded = sharding.pad_vocab(params_host, cfg, mesh.size)
  return jax.tree.map(global_array, padded, sharding.param_shardings(mesh, cfg))


def host_params(setup: Setup, seed: int) -> dict:
  """Parameters as numpy arrays (same on every process for the same seed), LayerNorm scales and
  biases random (Family.random_params) so that every check built on them can see a norm bug.

  Made one layer at a time into preallocated stacked arrays: initialising the paper preset's
  3.2B weights in one program needs ~32 GB of temporaries (random bits, float32 draws), one
  layer's ~8 GB. Layer l is drawn from fold_in(key, l), the edges from the first call."""
  cfg = setup.model
  fam = families.of(cfg)
  one = dataclasses.replace(cfg, layers=1)
  key = jax.random.key(seed)
  out = None
  for layer in range(cfg.layers):
    p_layers, p_edges = fam.split(jax.tree.map(np.asarray, _init(one, jax.random.fold_in(key,
                                                                                       layer))))
    if out is None:
      out = jax.tree.map(lambda a: np.empty((cfg.layers,) + a.shape[1:], a.dtype), p_layers)
      edges = p_edges
    jax.tree.map(lambda dst, src: dst.__setitem__(layer, src[0]), out, p_layers)
  return {**out, **edges}


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg, key):
  """Compiled once per config: eager Flax init costs ~0.5 s a call, this ~10 ms. Norms random
  (Family.random_params)."""
  return families.of(cfg).random_params(cfg, key)


def host_input(setup: Setup, seed: int, dtype=None) -> np.ndarray:
  """What stage 0 takes: hidden vectors (dense, in `dtype` or the model's) or token ids."""
  key = jax.random.fold_in(jax.random.key(seed), 1)
  cfg = setup.model
  x = families.of(cfg).random_input(cfg, setup.run.batch, setup.run.seq, key)
  return np.asarray(x if families.of(cfg).tokens_in else x.astype(dtype or cfg.dtype))


@dataclass
class Placed:
  """A Plan made concrete: its mesh, parameters and input on the mesh, the jitted forward."""

  plan: Plan
  mesh: Any
  params: Any
  x: Any
  forward: Any

  def __call__(self):
    return self.forward(self.params, self.x)


def place(setup: Setup, plan: Plan, params_host, x_host, *, dtype=None, devices=None,
          **engine_kw) -> Placed:
  """Parameters and input (x_host may be None) on the Plan's mesh, and the jitted forward."""
  mesh = sharding.mesh_for(plan, devices)
  params = global_params(params_host, mesh, setup.model)
  x = None if x_host is None else global_array(x_host, sharding.input_sharding(mesh, setup.model))
  fwd = engine.jit_forward(plan, setup.model, mesh, dtype, differentiable=False, **engine_kw)
  return Placed(plan, mesh, params, x, fwd)


def make_forward(setup: Setup, plan: Plan, params_host, *, dtype=None, devices=None,
                 **engine_kw) -> Callable[[Any], np.ndarray]:
  """The Plan's forward as a host function, inp -> out (numpy), for scripts: the parameters are
  placed on the Plan's mesh once; each call places its input, runs the engine and gathers the
  output. (engine.make_forward is the traced, mesh-level function this jits.)"""
  placed = place(setup, plan, params_host, None, dtype=dtype, devices=devices, **engine_kw)
  shard = sharding.input_sharding(placed.mesh, setup.model)
  return lambda inp: fetch(placed.forward(placed.params, global_array(inp, shard)))


def logits_chunks(placed: Placed, cfg, rows: int, tokens: int, dtype=None):
  """(row0, tok0, logits rows x tokens x V on the host) slice by slice, covering B x T, from a
  Placed made with output="hidden": the head runs on one slice at a time, so a device holds
  rows x tokens x V/tp logits at most (a last slice that would run past T starts earlier)."""
  plan = placed.plan
  chunk = heads.make_logits_chunk(plan, cfg, placed.mesh, rows, tokens)
  cast = (lambda p: p) if dtype is None else (lambda p: model.cast_params(p, dtype))
  head = jax.jit(lambda p, h, r, t: chunk(cast(p), h, r, t))
  hidden = placed()
  for r0 in range(0, plan.batch, rows):
    for t0 in range(0, plan.seq, tokens):
      t0 = min(t0, plan.seq - tokens)
      yield r0, t0, fetch(head(placed.params, hidden, jnp.int32(r0), jnp.int32(t0)))


def write_logits(placed: Placed, cfg, rows: int, tokens: int, path: str | None = None,
                 dtype=None, flag: str = "--out") -> tuple[int, int, int]:
  """Every logit of a Placed made with output="hidden", slice by slice (logits_chunks), each
  checked finite and, with `path`, appended to a .npy file beside it (paths.atomic_file) that
  replaces `path` only once whole. Plain writes of one block of rows at a time, not a memmap:
  a full disk is then an OSError (one line), not a SIGBUS. Returns the shape."""
  shape = (placed.plan.batch, placed.plan.seq, cfg.vocab)
  chunks = logits_chunks(placed, cfg, rows, tokens, dtype)
  if path is None:
    for _, _, block in chunks:
      validate.check_finite(f"logits of the {placed.plan.strategy} placement", block)
    return shape
  with paths.atomic_file(flag, path) as tmp, open(tmp, "wb") as f:
    np.lib.format.write_array_header_2_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False, "shape": shape})
    rows_block, row0 = None, 0
    for r0, t0, block in chunks:
      validate.check_finite(f"logits of the {placed.plan.strategy} placement", block)
      if rows_block is not None and r0 != row0:
        f.write(rows_block.tobytes())
        rows_block = None
      if rows_block is None:
        n = min(block.shape[0], shape[0] - r0)
        rows_block, row0 = np.empty((n,) + shape[1:], np.float32), r0
      rows_block[:, t0:t0 + block.shape[1]] = block[:rows_block.shape[0]]
    if rows_block is not None:
      f.write(rows_block.tobytes())
  return shape


def fetch(y) -> np.ndarray:
  """The whole of a (replicated or per-process addressable) result on the host."""
  if getattr(y, "is_fully_addressable", True):
    return np.asarray(y)
  return np.asarray(multihost_utils.process_allgather(y, tiled=True))


def reference(setup: Setup, params_host, x_host, dtype=None) -> np.ndarray:
  """The single-device reference on this process's first device."""
  dev = jax.local_devices()[0]
  p = jax.device_put(params_host, dev)
  x = jax.device_put(x_host, dev)
  f = jax.jit(reference_forward(setup.model, dtype))
  return np.asarray(f(p, x))


def reference_forward(cfg, dtype=None) -> Callable[[Any, jax.Array], jax.Array]:
  """The family's single-device forward, (params, inp) -> out: the one reference every check
  compares with. dtype None keeps the config's, else the parameters are cast (and a hidden-vector
  input; token ids stay ids)."""
  fam = families.of(cfg)

  def forward(params, inp):
    if dtype is not None and fam.tokens_in:
      params = model.cast_params(params, dtype)
    elif dtype is not None:   # dense: model.forward casts each layer to the input's dtype
      inp = inp.astype(dtype)
    return fam.reference(params, inp, cfg)
  return forward


def errors(y, y_ref) -> dict[str, float]:
  y = np.asarray(y, np.float64)
  y_ref = np.asarray(y_ref, np.float64)
  abs_err = float(np.max(np.abs(y - y_ref)))
  scale = float(np.max(np.abs(y_ref)))
  return {"max_abs_err": abs_err, "max_rel_err": abs_err / scale if scale else abs_err,
          "finite": bool(np.isfinite(y).all()), "bit_exact": bool(np.array_equal(y, y_ref))}


def bf16_tolerance(setup: Setup, params_host, x_host) -> float:
  """How far the bf16 reference itself sits from float32: an engine that rounds differently
  (psum of partial sums, blocked softmax) may land one such distance away on the other side,
  so twice this gap is the yardstick for a bf16 engine-vs-reference check."""
  ref_bf = reference(setup, params_host, x_host)
  ref_32 = reference(setup, params_host, x_host, jnp.float32)
  return 2.0 * errors(ref_bf, ref_32)["max_abs_err"]

"""hlo.py against programs whose collective bytes are known by hand: loop trips, nested loops,
cond weights, operand sizes."""

import re

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from conftest import require_devices
from jaxpart.runtime import compat
from jaxpart.measure import hlo

F32 = 4


def _mesh(n, name="x"):
  return compat.make_mesh(jax.devices()[:n], (n,), (name,))


def _hlo(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_shape_bytes():
  assert hlo.shape_bytes("f32[2,100,128]{2,1,0}") == 2 * 100 * 128 * 4
  assert hlo.shape_bytes("bf16[3,5]") == 30
  assert hlo.shape_bytes("(f32[4]{0}, bf16[2,2]{1,0}, s32[])") == 16 + 8 + 4
  assert hlo.shape_bytes("pred[]") == 1
  assert hlo.shape_bytes("token[]") == 0


def test_psum_in_scan_counts_trips():
  require_devices(4)
  mesh, steps = _mesh(4), 5

  def body(x_8x16):
    def step(c, _):
      return c + jax.lax.psum(c, "x"), None
    return jax.lax.scan(step, x_8x16, None, length=steps)[0]

  f = compat.shard_map(body, mesh, in_specs=P("x"), out_specs=P("x"))
  text = _hlo(f, jnp.ones((32, 16), jnp.float32))
  got = hlo.collective_bytes(text)
  assert got["all-reduce"] == steps * 8 * 16 * F32
  assert got["collective-permute"] == 0


def test_nested_loops_and_permute():
  require_devices(4)
  mesh, outer, inner = _mesh(4), 4, 3

  def body(x_2x8):
    def inner_step(c, _):
      return jax.lax.psum(c, "x") * 0.5, None

    def outer_step(c, _):
      c = jax.lax.scan(inner_step, c, None, length=inner)[0]
      return jax.lax.ppermute(c, "x", [(i, (i + 1) % 4) for i in range(4)]), None
    y = jax.lax.scan(outer_step, x_2x8, None, length=outer)[0]
    return jax.lax.ppermute(y, "x", [(0, 1)])   # once, outside every loop

  f = compat.shard_map(body, mesh, in_specs=P("x"), out_specs=P("x"))
  text = _hlo(f, jnp.ones((8, 8), jnp.float32))
  got = hlo.collective_bytes(text)
  unit = 2 * 8 * F32
  assert got["all-reduce"] == outer * inner * unit
  assert got["collective-permute"] == (outer + 1) * unit
  depths = sorted(o.loop_depth for o in hlo.collective_ops(text))
  assert depths == [0, 1, 2]


def test_trip_count_read_from_condition_without_annotation():
  require_devices(4)
  mesh, steps = _mesh(4), 7

  def body(x_4x4):
    def step(c, _):
      return jax.lax.psum(c, "x"), None
    return jax.lax.scan(step, x_4x4, None, length=steps)[0]

  f = compat.shard_map(body, mesh, in_specs=P("x"), out_specs=P("x"))
  text = _hlo(f, jnp.ones((16, 4), jnp.float32))
  stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
  assert "known_trip_count" not in stripped
  assert hlo.collective_bytes(stripped)["all-reduce"] == steps * 16 * F32
  assert hlo.collective_bytes(text)["all-reduce"] == steps * 16 * F32


def test_cond_branch_weight():
  require_devices(4)
  mesh, steps = _mesh(4), 6

  def body(x_4x4, flag):
    def step(c, _):
      return jax.lax.cond(flag[0] > 0, lambda v: jax.lax.psum(v, "x"), lambda v: v * 2.0, c), None
    return jax.lax.scan(step, x_4x4, None, length=steps)[0]

  f = compat.shard_map(body, mesh, in_specs=(P("x"), P()), out_specs=P("x"))
  text = _hlo(f, jnp.ones((16, 4), jnp.float32), jnp.ones((1,), jnp.int32))
  assert hlo.collective_bytes(text)["all-reduce"] == steps * 16 * F32      # upper bound
  assert hlo.collective_bytes(text, cond_weight=0.5)["all-reduce"] == steps * 16 * F32 / 2
  (op,) = hlo.collective_ops(text)
  assert op.cond_depth == 1 and op.loop_depth == 1


def test_all_gather_counts_local_operand():
  require_devices(4)
  mesh = _mesh(4)
  f = compat.shard_map(lambda x: jax.lax.all_gather(x, "x", tiled=True), mesh,
                       in_specs=P("x"), out_specs=P())
  got = hlo.collective_bytes(_hlo(f, jnp.ones((32, 8), jnp.float32)))
  assert got["all-gather"] == 8 * 8 * F32

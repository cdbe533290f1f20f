"""The pipeline engine against the single-device reference, for every kind of Plan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_devices
from jaxpart import config, planner, runs
from jaxpart.plan import PlanError

NAN = float("nan")


def _setup(preset="tiny", **overrides):
  return config.load_setup(preset, overrides={k.replace("__", "."): str(v)
                                              for k, v in overrides.items()})


def _check_f32(setup, plan, key, **engine_kw):
  seed = int(jax.random.randint(key, (), 0, 2**30))
  params_h, x_h = runs.host_params(setup, seed), runs.host_input(setup, seed)
  placed = runs.place(setup, plan, params_h, x_h, dtype=jnp.float32, **engine_kw)
  y = runs.fetch(placed())
  ref = runs.reference(setup, params_h, x_h, jnp.float32)
  err = runs.errors(y, ref)
  assert err["finite"], "output has NaN/inf"
  assert err["max_rel_err"] < 1e-5, err
  return y


@pytest.mark.parametrize("strategy, kw", [("layerwise", dict(chunk_tokens=16)),
                                          ("baseline", dict(tp=8, pp=2))])
def test_both_placements_on_16_devices(fresh_key, strategy, kw):
  require_devices(16)
  setup = _setup()
  plan = planner.make_plan(setup, 16, strategy, **kw)
  assert plan.mesh_shape == ((4, 4) if strategy == "layerwise" else (2, 8))
  _check_f32(setup, plan, fresh_key)


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_layerwise_on_fewer_devices(fresh_key, devices):
  require_devices(devices)
  setup = _setup()
  plan = planner.make_plan(setup, devices, "layerwise", chunk_tokens=32)
  assert plan.stages == min(devices, 4)
  _check_f32(setup, plan, fresh_key)


@pytest.mark.parametrize("microbatches", [1, 2, 4])
def test_baseline_microbatch_counts(fresh_key, microbatches):
  require_devices(16)
  setup = _setup(run__batch=4)
  plan = planner.make_plan(setup, 16, "baseline", tp=8, pp=2, microbatches=microbatches)
  assert plan.units == microbatches
  _check_f32(setup, plan, fresh_key)


@pytest.mark.parametrize("chunk_tokens", [7, 24, 64, 100])
def test_ragged_chunks(fresh_key, chunk_tokens):
  """seq 100 is a multiple of none of these but 100: the last chunk is short."""
  require_devices(4)
  setup = _setup()
  plan = planner.make_plan(setup, 4, "layerwise", chunk_tokens=chunk_tokens)
  assert plan.last_chunk_tokens == 100 - (plan.n_chunks - 1) * chunk_tokens
  _check_f32(setup, plan, fresh_key)


def test_microbatches_and_chunks_together(fresh_key):
  """Rows split and tokens chunked at once: KV caches must not leak between microbatches."""
  require_devices(16)
  setup = _setup(run__batch=4)
  plan = planner.make_plan(setup, 16, "layerwise", chunk_tokens=32, chunk_rows=1)
  assert plan.microbatches == 4 and plan.n_chunks == 4
  _check_f32(setup, plan, fresh_key)


def test_pure_tensor_parallel_one_stage(fresh_key):
  require_devices(8)
  setup = _setup()
  plan = planner.make_plan(setup, 8, "layerwise", tp=8, chunk_tokens=50)
  assert plan.mesh_shape == (1, 8)
  _check_f32(setup, plan, fresh_key)


@pytest.mark.parametrize("strategy, kw", [("layerwise", dict(chunk_tokens=16)),
                                          ("baseline", dict(tp=8, pp=2))])
def test_nan_bubbles_and_poisoned_output_do_not_leak(fresh_key, strategy, kw):
  """Bubble inputs are NaN and the output buffer starts as NaN: any unwritten element or any
  bubble computation that reached the output would show up as NaN."""
  require_devices(16)
  setup = _setup()
  plan = planner.make_plan(setup, 16, strategy, **kw)
  assert plan.bubble_fraction > 0
  _check_f32(setup, plan, fresh_key, bubble_fill=NAN, out_fill=NAN)


def test_bf16_within_stated_tolerance(fresh_key):
  """bf16 engine vs bf16 reference: within twice the bf16 reference's own distance from
  float32 (runs.bf16_tolerance), since the engine's psum of partial sums and blocked softmax
  round differently from one fused matmul and one softmax."""
  require_devices(16)
  setup = _setup()
  seed = int(jax.random.randint(fresh_key, (), 0, 2**30))
  params_h, x_h = runs.host_params(setup, seed), runs.host_input(setup, seed)
  tol = runs.bf16_tolerance(setup, params_h, x_h)
  ref = runs.reference(setup, params_h, x_h)
  for plan in (planner.make_plan(setup, 16, "layerwise", chunk_tokens=16),
               planner.make_plan(setup, 16, "baseline", tp=8, pp=2)):
    y = runs.fetch(runs.place(setup, plan, params_h, x_h)())
    assert y.dtype == jnp.bfloat16
    err = runs.errors(y, ref)
    assert err["finite"] and err["max_abs_err"] <= tol, (plan.strategy, err, tol)


def _placed_tiny(devices):
  require_devices(devices)
  setup = _setup()
  plan = planner.make_plan(setup, devices, "layerwise", chunk_tokens=16)
  return runs.place(setup, plan, runs.host_params(setup, 0), runs.host_input(setup, 0))


def test_bubble_ticks_are_skipped_by_cond():
  """The stage step sits in a conditional, so bubble ticks run no FLOPs and no collectives."""
  placed = _placed_tiny(16)
  hlo = placed.forward.lower(placed.params, placed.x).compile().as_text()
  assert "conditional" in hlo


def test_wrong_input_shape_is_refused():
  placed = _placed_tiny(4)
  with pytest.raises(ValueError, match="the plan was made for"):
    placed.forward(placed.params, placed.x[:, :50])


def test_too_few_devices_is_a_clear_error():
  from jaxpart import sharding  # noqa: PLC0415
  from jaxpart.plan import Plan  # noqa: PLC0415
  big = Plan(strategy="layerwise", devices=64, stages=4, tp=16,
             stage_layers=((0,), (1,), (2,), (3,)), batch=2, seq=100, microbatches=1,
             chunk_tokens=16, kv_block=16)
  with pytest.raises(PlanError, match="xla_force_host_platform_device_count=64"):
    sharding.mesh_for(big)

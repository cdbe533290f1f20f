"""The pipeline engine against the single-device reference and the float64 oracle, every Plan.

Every placed run here has NaN in every bubble input and in the output buffer before it is
written (a leak shows as NaN), and random LayerNorm scales and biases (runs.host_params).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hlo_graph
import oracle
from conftest import require_devices
from jaxpart import config
from jaxpart.placement import planner
from jaxpart.runtime import runs
from jaxpart.placement.plan import PlanError

NAN = float("nan")


def _setup(preset="tiny", **overrides):
  return config.load_setup(preset, overrides={k.replace("__", "."): str(v)
                                              for k, v in overrides.items()})


def _check_f32(setup, plan, key):
  """float32 engine, NaN in bubbles and in the unwritten output, against the float32 reference
  and the independent float64 oracle, both within runs.F32_REL_TOL."""
  seed = int(jax.random.randint(key, (), 0, 2**30))
  params_h, x_h = runs.host_params(setup, seed), runs.host_input(setup, seed)
  placed = runs.place(setup, plan, params_h, x_h, dtype=jnp.float32, bubble_fill=NAN,
                      out_fill=NAN)
  y = runs.fetch(placed())
  ref = runs.reference(setup, params_h, x_h, jnp.float32)
  err = runs.errors(y, ref)
  assert err["finite"], "output has NaN/inf: a bubble or an unwritten output slot leaked"
  assert err["max_rel_err"] < runs.F32_REL_TOL, err
  want = oracle.forward(params_h, x_h, setup.model.head_dim, setup.model.ln_eps)
  assert oracle.rel_err(y, want) < runs.F32_REL_TOL
  return y


@pytest.mark.parametrize("strategy, kw", [("layerwise", dict(chunk_tokens=16)),
                                          ("baseline", dict(tp=8, pp=2))])
def test_both_placements_on_16_devices(fresh_key, strategy, kw):
  """The seed's two placements; layer-wise in ragged chunks (seq 100 = 6 x 16 + 4)."""
  require_devices(16)
  setup = _setup()
  plan = planner.make_plan(setup, 16, strategy, **kw)
  assert plan.mesh_shape == ((4, 4) if strategy == "layerwise" else (2, 8))
  assert plan.bubble_fraction > 0
  if strategy == "layerwise":
    assert plan.last_chunk_tokens == 4
  _check_f32(setup, plan, fresh_key)


@pytest.mark.parametrize("devices", [1, 2, 8])   # 4 devices: test_ragged_chunks
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
  """Bubble ticks execute no stage work: in the compiled program, no matmul and no all-reduce
  is reachable outside a conditional branch; the tick loop has one conditional, whose skip
  branch holds none and whose run branch holds the stage's two all-reduces per layer (the layer
  loop's body) and its six projections. Computing every tick and selecting the result would put
  them outside. (Written against the scan-over-ticks engine: adapt with it.)"""
  placed = _placed_tiny(16)
  hlo = placed.forward.lower(placed.params, placed.x).compile().as_text()
  comps, entry = hlo_graph.parse(hlo)
  unconditional = hlo_graph.reachable(comps, entry, through_branches=False)
  all_reduce = {"all-reduce", "all-reduce-start"}
  assert hlo_graph.count_ops(comps, unconditional, all_reduce) == 0
  assert hlo_graph.count_ops(comps, unconditional, {"dot"}) == 0
  def work(branches):
    return sorted((hlo_graph.count_ops(comps, r, all_reduce), hlo_graph.count_ops(comps, r, {"dot"}))
                  for r in (hlo_graph.reachable(comps, b, True) for b in branches))
  # The tick's run/skip conditional is the one that holds work (the other, the last stage's
  # head, only slices the dense output).
  working = [w for w in map(work, hlo_graph.conditionals(comps, unconditional))
             if w != [(0, 0)] * len(w)]
  (per_branch,) = working
  assert per_branch[0] == (0, 0), f"the skip branch does work: {per_branch}"
  assert per_branch[1][0] == 2 and per_branch[1][1] >= 6, per_branch


def test_wrong_input_shape_is_refused():
  placed = _placed_tiny(4)
  with pytest.raises(ValueError, match="the plan was made for"):
    placed.forward(placed.params, placed.x[:, :50])


def test_too_few_devices_is_a_clear_error():
  from jaxpart.runtime import sharding  # noqa: PLC0415
  from jaxpart.placement.plan import Plan  # noqa: PLC0415
  big = Plan(strategy="layerwise", devices=64, stages=4, tp=16,
             stage_layers=((0,), (1,), (2,), (3,)), batch=2, seq=100, microbatches=1,
             chunk_tokens=16, kv_block=16)
  with pytest.raises(PlanError, match="xla_force_host_platform_device_count=64"):
    sharding.mesh_for(big)

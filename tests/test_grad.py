"""jax.grad through both placements equals the reference's; float64 central differences; remat.

Compiles dominate the cost on 2 cores, so each placement's grad function is built once
(`_grad_fn`) and reused by every test with the same shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_devices

from jaxpart import config
from jaxpart.runtime import engine
from jaxpart.models import dense as model
from jaxpart.placement import planner
from jaxpart.runtime import runs
from jaxpart.runtime import sharding
from jaxpart.runtime import train
from jaxpart.commands import gradcheck

SEQ = 40            # tiny's width, a shorter sequence
PLACEMENTS = {
    "baseline": dict(tp=8, pp=2),              # the seed's TP8 x PP2, GPipe over microbatches
    "layerwise": dict(chunk_tokens=12),        # 4 stages x tp 4, chunks 12, 12, 12, 4 (ragged)
}
NAN = float("nan")


def _setup(overrides=None):
  return config.load_setup("tiny", overrides={"run.seq": SEQ, **(overrides or {})})


@functools.lru_cache(maxsize=None)
def _placed(strategy: str):
  setup = _setup()
  plan = planner.make_plan(setup, 16, strategy, **PLACEMENTS[strategy])
  return setup.model, plan, sharding.mesh_for(plan)


@functools.lru_cache(maxsize=None)
def _grad_fn(strategy: str, remat: str = "none"):
  """The placed grad step with NaN in every bubble input and in the unwritten output buffer."""
  cfg, plan, mesh = _placed(strategy)
  return train.value_and_grads(
      train.engine_forward(plan, cfg, mesh, remat=remat, bubble_fill=NAN, out_fill=NAN))


@functools.lru_cache(maxsize=None)
def _ref_grad_fn():
  return train.value_and_grads(runs.reference_forward(_setup().model))


def _problem(cfg, key, dtype):
  kp, kx, kt, kn = jax.random.split(key, 4)
  params = model.cast_params(model.randomize_norms(model.init_params(cfg, kp), kn), dtype)
  x = model.random_input(cfg, 2, SEQ, kx, jnp.float32)
  return params, x.astype(dtype), train.teacher_target(cfg, x, kt)


def _assert_within(checks):
  bad = [f"{c.name}: rel {c.rel:.3e} > tol {c.tol:.1e}" + ("" if c.finite else " (not finite)")
         for c in checks if not c.ok]
  assert not bad, "; ".join(bad)


@pytest.mark.parametrize("strategy", list(PLACEMENTS))
def test_f32_grads_match_reference_with_nan_bubbles(strategy, fresh_key):
  """rel < 1e-4 on every parameter leaf and on x, NaN in every bubble, grads sharded as params."""
  require_devices(16)
  cfg, plan, mesh = _placed(strategy)
  assert plan.ticks > plan.units, "no bubble ticks: the NaN poisoning would test nothing"
  if strategy == "layerwise":
    assert plan.n_chunks == 4 and plan.last_chunk_tokens == 4 and plan.stages == 4
  else:
    assert (plan.stages, plan.tp) == (2, 8) and plan.microbatches > 1
  params, x, target = _problem(cfg, fresh_key, jnp.float32)
  placed = sharding.place_params(params, mesh)

  (loss, y), (g_params, g_x) = _grad_fn(strategy)(placed, x, target)
  (ref_loss, ref_y), (r_params, r_x) = _ref_grad_fn()(params, x, target)

  assert np.isfinite(float(loss)), "NaN from a bubble reached the loss"
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves((g_params, g_x))), \
      "NaN from a bubble reached a gradient"
  _assert_within(train.compare({"params": g_params, "x": g_x, "loss": loss},
                               {"params": r_params, "x": r_x, "loss": ref_loss}, 1e-4))
  _assert_within(train.compare(y, ref_y, runs.F32_REL_TOL))
  want, placed_leaves = train.named_leaves(sharding.param_shardings(mesh)), train.named_leaves(placed)
  for name, g in train.named_leaves(g_params).items():
    assert g.sharding.is_equivalent_to(want[name], g.ndim), \
        f"{name}: gradient sharded {g.sharding.spec}, params {want[name].spec}"
    assert g.addressable_shards[0].data.shape == placed_leaves[name].addressable_shards[0].data.shape


def test_bf16_grads_within_derived_tolerance(fresh_key):
  """bf16 bound per leaf: 4 x the bf16 reference's own distance from the f32 reference, at
  least 2^-8 (the gradient is itself stored in bf16); see train.bf16_tolerances for why.
  Layer-wise only, to keep CI short: `scripts/check_correctness.py --dtype bfloat16` runs the
  same check on both placements."""
  require_devices(16)
  strategy = "layerwise"
  cfg, plan, mesh = _placed(strategy)
  params, x, target = _problem(cfg, fresh_key, jnp.float32)
  ref32 = _ref_grad_fn()(params, x, target)[1]
  ref16 = _ref_grad_fn()(model.cast_params(params, jnp.bfloat16), x.astype(jnp.bfloat16),
                         target)[1]
  got = _grad_fn(strategy)(sharding.place_params(model.cast_params(params, jnp.bfloat16), mesh),
                           x.astype(jnp.bfloat16), target)[1]
  assert jax.tree.leaves(got)[0].dtype == jnp.bfloat16
  tol = train.bf16_tolerances(ref16, ref32)
  assert max(tol.values()) < 0.1, f"bf16 reference itself is far from f32: {tol}"
  _assert_within(train.compare(got, ref32, tol))


@pytest.mark.slow
def test_remat_keeps_grads_and_cuts_temp_bytes(fresh_key):
  """remat="stage" recomputes the stage step in the backward: same gradients, less saved; "dots"
  keeps the matmul outputs, so it saves less than "none" and more than "stage"."""
  require_devices(16)
  cfg, plan, mesh = _placed("layerwise")
  params, x, target = _problem(cfg, fresh_key, jnp.float32)
  placed = sharding.place_params(params, mesh)
  want = _grad_fn("layerwise")(placed, x, target)[1]
  got = _grad_fn("layerwise", "stage")(placed, x, target)[1]
  _assert_within(train.compare(got, want, 1e-6))

  # lower().compile() of an already-called jit is a cache hit: no extra compile here
  # "dots" is only compiled (its gradients are checked by test_train's gradcheck command test)
  temp = {r: _grad_fn("layerwise", r).lower(placed, x, target).compile().memory_analysis()
          .temp_size_in_bytes for r in ("none", "dots", "stage")}
  print(f"tiny layer-wise grad step, temp bytes per device: {temp}")
  assert temp["none"] > temp["dots"] > temp["stage"], temp


def test_unknown_remat_policy_is_refused():
  require_devices(16)
  cfg, plan, mesh = _placed("layerwise")
  with pytest.raises(ValueError, match=r"remat = 'everything'.*none, stage, dots"):
    engine.make_forward(plan, cfg, mesh, remat="everything")


def test_compare_flags_mismatch_and_nan():
  """The checker itself can fail: a perturbed leaf, a NaN leaf, a zero reference."""
  want = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.0, 0.0]), "c": jnp.array([4.0])}
  got = {"a": jnp.array([1.0, -2.001]), "b": jnp.array([0.0, 1e-9]), "c": jnp.array([NAN])}
  checks = {c.name: c for c in train.compare(got, want, 1e-4)}
  assert checks["a"].rel == pytest.approx(5e-4, rel=1e-3) and not checks["a"].ok
  assert checks["b"].rel == float("inf") and not checks["b"].ok
  assert not checks["c"].finite and not checks["c"].ok
  assert all(c.ok for c in train.compare(want, want, 0.0))


# --- float64 central differences ------------------------------------------------------------

def _x64():
  """float64 for one block only: jax.enable_x64 (jax >= 0.7), else the older experimental one."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # noqa: PLC0415
  return enable_x64()


FD_OVERRIDES = {"model.d_model": 32, "model.d_ff": 32, "run.seq": 10}   # 8 heads x 4 = 32
FD_TOL = 1e-6   # float64 here: measured <= 4e-8; float32 rounding inside gives 1e-3 and up


def _fd_errors(forward, cfg, key, batch, seq):
  kp, kx, kt, kv, kn = jax.random.split(key, 5)
  params = model.cast_params(model.randomize_norms(model.init_params(cfg, kp), kn), jnp.float64)
  x = model.random_input(cfg, batch, seq, kx, jnp.float64)
  target = jax.random.normal(kt, x.shape, jnp.float64)
  assert forward(params, x).dtype == jnp.float64
  return train.central_difference_errors(
      lambda pr: train.mse(forward(pr[0], pr[1]), target), (params, x), kv)


def _assert_fd(errs):
  assert set(errs) >= {"0.attn.wq", "0.mlp.w_out", "0.ln1.scale", "1"}
  bad = {k: f"{v:.2e}" for k, v in errs.items() if not v < FD_TOL}
  assert not bad, (f"autodiff vs central differences (tol {FD_TOL:g}): {bad}. Errors of 1e-3 "
                   f"and up mean the float64 forward rounds to float32 somewhere inside (a matmul's "
                   f"preferred_element_type, LayerNorm's or attention's float32 statistics)")


@pytest.mark.parametrize("where", ["reference", "layerwise"])
def test_float64_central_differences(where, fresh_key):
  """Every parameter leaf and the input, float64, tiny shrunk to d_model 32, seq 10."""
  if where == "layerwise":
    require_devices(16)
  with _x64():
    setup = _setup({**FD_OVERRIDES, "model.dtype": "float64"})
    cfg = setup.model
    if where == "reference":
      forward = runs.reference_forward(cfg)
    else:
      plan = planner.make_plan(setup, 16, "layerwise", chunk_tokens=4)   # chunks 4, 4, 2
      assert plan.n_chunks == 3 and plan.last_chunk_tokens == 2
      mesh = sharding.mesh_for(plan)
      fwd = train.engine_forward(plan, cfg, mesh, bubble_fill=NAN, out_fill=NAN)
      forward = lambda p, x: fwd(sharding.place_params(p, mesh), x)  # noqa: E731
    errs = _fd_errors(forward, cfg, fresh_key, setup.run.batch, setup.run.seq)
  print(f"{where}: autodiff vs central differences, float64: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
  _assert_fd(errs)
  assert jnp.ones(1).dtype == jnp.float32, "x64 leaked out of the test"


def test_central_differences_catch_a_wrong_gradient(fresh_key):
  """The FD check can fail: a backward off by 1% is flagged, a right one is not. The wrong leaf
  has one element, so the random direction cannot miss the error (v = +-1)."""
  @jax.custom_vjp
  def square(a):
    return a * a

  square.defvjp(lambda a: (a * a, a), lambda a, ct: (2.02 * a * ct,))
  with _x64():
    wrong, right = jax.random.normal(fresh_key, (2, 7), jnp.float64)
    errs = train.central_difference_errors(
        lambda p: jnp.sum(square(p[0])) + jnp.sum(jnp.sin(p[1])), (wrong[:1], right), fresh_key)
  assert errs["0"] == pytest.approx(0.02 / 2.02, rel=1e-3)
  assert errs["1"] < FD_TOL


def test_gradcheck_forward_bound_is_the_engine_bound():
  assert gradcheck.F32_FORWARD_TOL == runs.F32_REL_TOL

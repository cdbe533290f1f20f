"""Parameters placed on the 16-device CPU mesh carry the shardings the Plan names."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import require_devices
from jaxpart import config
from jaxpart.models import dense as model
from jaxpart.placement import planner
from jaxpart.runtime import sharding
from jaxpart.placement.plan import PlanError

# tiny: L=4, D=128, A = 8 heads x 4 = 32, F=128. Expected spec and per-device shard shape of
# every leaf for the seed's two placements, written out by hand.
SPECS = {
    "ln1/scale": P("stage", None), "ln1/bias": P("stage", None),
    "attn/wq": P("stage", None, "tensor"), "attn/wk": P("stage", None, "tensor"),
    "attn/wv": P("stage", None, "tensor"), "attn/wo": P("stage", "tensor", None),
    "ln2/scale": P("stage", None), "ln2/bias": P("stage", None),
    "mlp/w_in": P("stage", None, "tensor"), "mlp/w_out": P("stage", "tensor", None),
}
SHARD_SHAPES = {
    # baseline TP8 x PP2: 2 layers a stage; A=32 / 8 = 4 columns, F=128 / 8 = 16
    "baseline": {"ln1/scale": (2, 128), "ln1/bias": (2, 128), "attn/wq": (2, 128, 4),
                 "attn/wk": (2, 128, 4), "attn/wv": (2, 128, 4), "attn/wo": (2, 4, 128),
                 "ln2/scale": (2, 128), "ln2/bias": (2, 128), "mlp/w_in": (2, 128, 16),
                 "mlp/w_out": (2, 16, 128)},
    # layer-wise 4 stages x tp 4: 1 layer a stage; A / 4 = 8, F / 4 = 32
    "layerwise": {"ln1/scale": (1, 128), "ln1/bias": (1, 128), "attn/wq": (1, 128, 8),
                  "attn/wk": (1, 128, 8), "attn/wv": (1, 128, 8), "attn/wo": (1, 8, 128),
                  "ln2/scale": (1, 128), "ln2/bias": (1, 128), "mlp/w_in": (1, 128, 32),
                  "mlp/w_out": (1, 32, 128)},
}


def _plan(strategy):
  setup = config.load_setup("tiny")
  if strategy == "baseline":
    return setup, planner.make_plan(setup, 16, "baseline", tp=8, pp=2)
  return setup, planner.make_plan(setup, 16, "layerwise")


def _host_params(cfg, key):
  """Fresh random host arrays in the model's tree and dtype: placement does not care how they
  were initialised, and skipping Flax's init keeps this test cheap."""
  seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                      model.param_shapes(cfg))


def _leaves(tree):
  return {f"{a}/{b}": leaf for a, sub in tree.items() for b, leaf in sub.items()}


@pytest.mark.parametrize("strategy", ["baseline", "layerwise"])
def test_placed_params_carry_the_plan_shardings(strategy, fresh_key):
  require_devices(16)
  setup, plan = _plan(strategy)
  mesh = sharding.mesh_for(plan)
  assert dict(mesh.shape) == dict(zip(("stage", "tensor"), plan.mesh_shape))
  host = _host_params(setup.model, fresh_key)
  placed = sharding.place_for_plan(host, plan, mesh)
  want_shapes = SHARD_SHAPES[strategy]
  host_leaves = _leaves(host)
  stage_of = {d: s for s, row in enumerate(mesh.devices) for d in row}
  tensor_of = {d: t for row in mesh.devices for t, d in enumerate(row)}
  lps = plan.layers_per_stage
  for name, arr in _leaves(placed).items():
    assert arr.sharding.spec == SPECS[name], name
    assert arr.sharding.mesh.shape == mesh.shape
    assert arr.sharding.shard_shape(arr.shape) == want_shapes[name], name
    assert len(arr.addressable_shards) == 16
    full = np.asarray(host_leaves[name])
    for shard in arr.addressable_shards:
      assert shard.data.shape == want_shapes[name], name
      s, t = stage_of[shard.device], tensor_of[shard.device]
      # stage s holds its own layers, exactly plan.stage_layers[s]
      assert list(range(shard.index[0].start, shard.index[0].stop)) == list(plan.stage_layers[s])
      assert shard.index[0] == slice(s * lps, (s + 1) * lps)
      expect = full[s * lps:(s + 1) * lps]          # LayerNorms: replicated over tensor
      if SPECS[name] == P("stage", None, "tensor"):
        w = want_shapes[name][2]
        expect = full[s * lps:(s + 1) * lps, :, t * w:(t + 1) * w]
      elif SPECS[name] == P("stage", "tensor", None):
        w = want_shapes[name][1]
        expect = full[s * lps:(s + 1) * lps, t * w:(t + 1) * w, :]
      np.testing.assert_array_equal(np.asarray(shard.data), expect)
  # the pure computation agrees with what JAX did
  assert _leaves(sharding.param_local_shapes(host, plan)) == want_shapes


def test_local_shapes_without_devices_and_refusals():
  setup, plan = _plan("layerwise")
  shapes = model.param_shapes(setup.model)
  assert _leaves(sharding.param_local_shapes(shapes, plan)) == SHARD_SHAPES["layerwise"]
  other = config.load_setup("tiny", overrides={"model.layers": 2})
  with pytest.raises(PlanError, match=r"has 2 layers on axis 0, the plan places 4"):
    sharding.param_local_shapes(model.param_shapes(other.model), plan)
  with pytest.raises(PlanError, match=r"size 10, not divisible by 4"):
    sharding.local_shape((4, 10), P(None, "tensor"), plan)


def test_place_for_plan_refuses_other_mesh(fresh_key):
  require_devices(16)
  setup, lw = _plan("layerwise")
  _, base = _plan("baseline")
  host = _host_params(setup.model, fresh_key)
  with pytest.raises(PlanError, match="is not the plan's"):
    sharding.place_for_plan(host, lw, sharding.mesh_for(base))


def test_stream_sharding():
  require_devices(16)
  _, plan = _plan("layerwise")
  sh = sharding.stream(sharding.mesh_for(plan))
  # Never replicated: the engine's input and output width is split over both mesh axes,
  # tensor-major.
  assert sh.spec == P(None, None, ("tensor", "stage"))


def test_mesh_needs_enough_devices():
  setup = config.load_setup("paper")
  plan = planner.make_plan(setup, 64, "layerwise")
  with pytest.raises(PlanError, match="the plan needs 64 devices"):
    sharding.mesh_for(plan, devices=[object()] * 16)

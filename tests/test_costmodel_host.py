"""The cost model on a host whose cores simulated devices share, the calibration fits that feed
it, and what the engine moves per tick, counted in compiled HLO.

The fits are checked against times made from known constants (numpy, not the fitting code),
and the host tick against figures worked out by hand.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_devices
from jaxpart import config
from jaxpart.measure import calibfit
from jaxpart.cost import forward as costmodel
from jaxpart.cost import params as costparams
from jaxpart.cost import units as unitcosts
from jaxpart.cost import counts
from jaxpart.runtime import engine
from jaxpart.runtime import streams
from jaxpart.measure import hlo
from jaxpart.measure import compiled as measure
from jaxpart.placement import planner
from jaxpart.runtime import sharding
from jaxpart.config import ConfigError

SMALL = config.load_setup("small", "cpu")


# --- counts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,tp", [("small", 1), ("small", 8), ("tiny", 4),
                                       ("llama-tiny", 1), ("llama-tiny", 2), ("llama3-8b", 8),
                                       ("mistral-7b", 4)])
def test_step_gemms_add_up_to_the_matmul_flops(preset, tp):
  cfg = config.load_setup(preset).model
  gemms = counts.step_gemms(cfg, 37, tp)
  assert sum(2 * m * k * n for m, k, n in gemms) == counts.matmul_flops(cfg, 37, tp)
  arrays = counts.step_gemm_arrays(cfg, 37, tp)
  # each GEMM's weight and result once, its input once per distinct input (Q/K/V share one,
  # the MLP in-projections share one): 4 distinct inputs
  assert len(arrays) == 2 * len(gemms) + 4
  assert sum(arrays) == (sum(k * n + m * n for m, k, n in gemms)
                         + 37 * (2 * cfg.d_model + cfg.attn_dim // tp + cfg.d_ff // tp))


def test_attention_visits_invert_kv_positions():
  plan = planner.make_plan(SMALL, 16, "layerwise", tp=4, chunk_tokens=155, chunk_rows=1)
  for k in range(plan.n_chunks):
    visits = counts.attention_visits(plan, counts.kv_positions(plan, k))
    assert visits == pytest.approx(counts.visit_sum(plan, k))


# --- the host tick ---------------------------------------------------------------------------

HOST = dataclasses.replace(SMALL.hardware, host_cores=2)


def _plan(stages, tp, units):
  return planner.make_plan(config.load_setup("tiny", overrides={"run.batch": str(units),
                                                                "run.seq": "64"}),
                           stages * tp, "baseline", tp=tp, pp=stages, microbatches=units)


def test_host_tick_by_hand():
  """2 stages x tp 2 (4 devices on 2 cores), 3 units of 10, 20, 30 ms per device (critical
  path) and 8, 16, 24 ms of core time; transfers 1 ms a tick (0.5 ms of it bytes).
  Ticks hold units (stage 0, stage 1): (0, -), (1, 0), (2, 1), (-, 2).
  Lock-step: busy + 1 ms = 11, 21, 31, 31 ms. Cores: (2 x busy core time + 4 x 0.5) / 2 =
  (16 + 2) / 2 = 9, (2 x (16 + 8) + 2) / 2 = 25, (2 x (24 + 16) + 2) / 2 = 41, (48 + 2) / 2 = 25.
  The tick takes the larger: 11, 25, 41, 31 ms."""
  plan = _plan(2, 2, 3)
  unit_s, work_s = np.array([10e-3, 20e-3, 30e-3]), np.array([8e-3, 16e-3, 24e-3])
  got = costmodel.tick_seconds(unit_s, plan, HOST, 1e-3, costparams.DEFAULT,
                               unit_work_s=work_s, pipe_work_s=0.5e-3)
  np.testing.assert_allclose(got, [11e-3, 25e-3, 41e-3, 31e-3], rtol=1e-12)
  chip = costmodel.tick_seconds(unit_s, plan, dataclasses.replace(HOST, host_cores=0), 1e-3,
                                costparams.DEFAULT, unit_work_s=work_s, pipe_work_s=0.5e-3)
  np.testing.assert_allclose(chip, [11e-3, 21e-3, 31e-3, 31e-3], rtol=1e-12)


def test_on_a_host_bubbles_are_cheap_and_tensor_parallelism_buys_nothing():
  """Same work, more devices on the same 2 cores: no faster. Fewer microbatches (more
  bubble) cost a chip the bubble share, a host almost nothing."""
  chip = dataclasses.replace(SMALL.hardware, host_cores=0)
  host = dataclasses.replace(SMALL.hardware, host_cores=2)

  def total(hw, stages, tp, m):
    setup = dataclasses.replace(SMALL, hardware=hw)
    plan = planner.make_plan(setup, stages * tp, "baseline", tp=tp, pp=stages, microbatches=m)
    return costmodel.predict(setup, plan).total_s

  assert total(chip, 4, 4, 4) < total(chip, 4, 2, 4)            # chips: 16 beat 8
  assert total(host, 4, 4, 4) > 0.95 * total(host, 4, 2, 4)     # a host: no such gain
  bubble = (total(chip, 4, 4, 1) / total(chip, 4, 4, 4), total(host, 4, 4, 1)
            / total(host, 4, 4, 4))
  # 1 microbatch of 4 rows: 4 ticks, a stage busy in one; 4 of 1 row: 7 ticks, 4 busy each
  assert bubble[0] > bubble[1] + 0.4 and bubble[1] < 1.3, bubble


def test_cache_share_on_a_host():
  assert unitcosts.cache_bytes(SMALL.hardware, 16) == SMALL.hardware.l2_bytes * 2 / 16
  assert unitcosts.cache_bytes(SMALL.hardware, 1) == SMALL.hardware.l2_bytes
  gpu = config.HARDWARE_PRESETS["h100"]
  assert unitcosts.cache_bytes(gpu, 16) == gpu.l2_bytes


def test_gemm_overhead_by_hand():
  hw = dataclasses.replace(SMALL.hardware, gemm_call_s=1e-6, gemm_element_s=1e-9,
                           gemm_spill_element_s=3e-9)
  # arrays of 100 and 10,000 elements (2 B each) against a 1,000-byte cache: 100 fits
  got = unitcosts.gemm_overhead_seconds(2, [100, 10_000], 2, hw, 1_000.0)
  assert got == pytest.approx(2e-6 + 100e-9 + 30_000e-9)


@pytest.mark.parametrize("field", ["gemm_call_s", "gemm_element_s", "gemm_spill_element_s",
                                   "score_element_s", "attention_visit_s"])
def test_host_fields_refuse_negative_values(field):
  with pytest.raises(ConfigError, match=f"Hardware.{field} = -1.0: must be a non-negative"):
    dataclasses.replace(SMALL.hardware, **{field: -1.0})


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_host_cores_must_be_a_count(value):
  with pytest.raises(ConfigError, match="Hardware.host_cores"):
    dataclasses.replace(SMALL.hardware, host_cores=value)


def test_host_fields_load_from_toml(tmp_path):
  f = tmp_path / "hw.toml"
  f.write_text('[hardware]\nname = "cpu"\nhost_cores = 3\ngemm_call_s = 2e-6\n')
  hw = config.load_setup("tiny", config_file=str(f)).hardware
  assert (hw.host_cores, hw.gemm_call_s) == (3, 2e-6)
  assert config.load_setup("tiny", "h100").hardware.host_cores == 0


# --- calibration fits against known constants ---------------------------------------------------

SHAPES = [(m, k, n) for m in (64, 256, 1024, 4096)
          for k, n in ((512, 16), (512, 128), (16, 512), (128, 512), (512, 512))]


def _times(call, elem, spill, rate, l2=2 ** 21, eb=2):
  out = []
  for m, k, n in SHAPES:
    arrays = np.array([m * k, k * n, m * n], float)
    small = arrays[arrays * eb <= l2].sum()
    out.append(call + elem * small + spill * (arrays.sum() - small) + 2.0 * m * k * n / rate)
  return np.array(out)


def test_gemm_fit_recovers_known_constants():
  t = _times(3e-6, 4e-10, 9e-10, 1.2e11)
  fit = calibfit.gemm_fit([calibfit.gemm_features(*s, 2, 2 ** 21) for s in SHAPES], t)
  assert fit["call_s"] == pytest.approx(3e-6, rel=1e-6)
  assert fit["element_s"] == pytest.approx(4e-10, rel=1e-6)
  assert fit["spill_element_s"] == pytest.approx(9e-10, rel=1e-6)
  assert fit["flops_per_s"] == pytest.approx(1.2e11, rel=1e-6)
  assert fit["worst_rel_residual"] < 1e-9


def test_gemm_fit_with_noise_and_a_term_that_is_not_there():
  rng = np.random.default_rng(0)
  t = _times(0.0, 5e-10, 5e-10, 1e11) * rng.uniform(0.97, 1.03, len(SHAPES))
  fit = calibfit.gemm_fit([calibfit.gemm_features(*s, 2, 2 ** 21) for s in SHAPES], t)
  assert fit["call_s"] >= 0 and fit["call_s"] < 2e-6          # dropped or tiny, never negative
  assert fit["flops_per_s"] == pytest.approx(1e11, rel=0.1)
  assert fit["element_s"] == pytest.approx(5e-10, rel=0.25)


def test_gemm_fit_refuses_what_it_cannot_fit():
  feats = [calibfit.gemm_features(*s, 2, 2 ** 21) for s in SHAPES]
  with pytest.raises(ValueError, match="need equal counts"):
    calibfit.gemm_fit(feats[:2], [1.0, 2.0])
  with pytest.raises(ValueError, match="positive and finite"):
    calibfit.gemm_fit(feats, [0.0] * len(feats))


def test_attention_and_link_fits_recover_known_constants():
  visits, scores = [8, 15, 20, 40], [131072, 491520, 163840, 81920]
  flops = [4.0 * s * 16 for s in scores]
  t = [v * 3e-6 + s * 2e-9 + f / 1e11 for v, s, f in zip(visits, scores, flops)]
  got = calibfit.attention_fit(visits, scores, flops, t, 1e11)
  assert got["visit_s"] == pytest.approx(3e-6, rel=1e-6)
  assert got["score_element_s"] == pytest.approx(2e-9, rel=1e-6)
  # ppermute wall: 400 us + 2 ns a byte on 16 devices sharing 2 cores: a device's bytes cost
  # it 2 ns x 2/16 = 0.25 ns a byte -> link_bw x 0.8 = 4e9
  link = calibfit.link_fit((1 << 16, 1 << 20), [4e-4 + 2e-9 * (1 << 16), 4e-4 + 2e-9 * (1 << 20)],
                           2 / 16, 0.8)
  assert link["link_latency"] == pytest.approx(4e-4, rel=1e-9)
  assert link["link_bw"] * 0.8 == pytest.approx(4e9, rel=1e-9)
  with pytest.raises(ValueError, match="too noisy"):
    calibfit.link_fit((1, 2), [2.0, 1.0], 1.0, 0.8)


# --- what the engine moves per tick, in compiled HLO -------------------------------------------

def _tick_body(hlo_text):
  comps, entry = hlo.parse_hlo(hlo_text)

  def find(c, depth=0):
    for ins in comps[c]:
      if ins.opcode == "while":
        return comps[hlo._attr_names(ins.attrs, "body")[0]]
      for sub in hlo._attr_names(ins.attrs, "to_apply") + hlo._attr_names(ins.attrs, "calls"):
        if sub in comps and depth < 3 and (found := find(sub, depth + 1)) is not None:
          return found
    return None
  return find(entry)


@pytest.mark.parametrize("kw", [dict(strategy="baseline", tp=4, pp=4, microbatches=1),
                                dict(strategy="layerwise", tp=8, chunk_tokens=256, chunk_rows=1)])
def test_unit_sized_writes_per_tick_match_the_count(kw):
  """The forward-only engine's tick loop, outside its conds: exactly TICK_UNIT_WRITES buffers of
  one unit (the gathered unit, its relayout, the pipeline send), and none of them widened to
  float32 (bf16 units move as bit patterns)."""
  require_devices(16)
  setup = SMALL
  plan = planner.make_plan(setup, 16, **kw)
  mesh = sharding.mesh_for(plan)
  params = sharding.abstract_placed_params(setup.model, plan, mesh)
  x = jax.ShapeDtypeStruct((setup.run.batch, setup.run.seq, setup.model.d_model), jnp.bfloat16,
                           sharding=sharding.stream(mesh))
  text = measure.compile_stats(engine.jit_forward(plan, setup.model, mesh, differentiable=False),
                               params, x)["hlo"]
  unit = counts.unit_bytes(setup.model, plan)
  skip = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "conditional"}
  body = [i for i in _tick_body(text) if i.opcode not in skip]
  assert sum(hlo.shape_bytes(i.type_str) == unit for i in body) == counts.TICK_UNIT_WRITES
  assert not any(hlo.shape_bytes(i.type_str) == 2 * unit and i.type_str.startswith("f32")
                 for i in body)


def test_forward_only_kv_cache_updates_in_place():
  """A bf16 stage step with a cache of bit patterns updates it without widening the whole
  cache to float32 (which XLA:CPU does to a bf16 cache), and computes the same values."""
  plan = planner.make_plan(SMALL, 16, "layerwise", tp=4, chunk_tokens=256, chunk_rows=2)
  cfg = SMALL.model
  step = measure.jit_stage_step(cfg, plan, donate_caches=False)
  params, x, cache, _, _ = measure.stage_step_args(cfg, plan)
  bits = jax.ShapeDtypeStruct(cache.shape, jnp.uint16)
  cache_shape = ",".join(map(str, cache.shape))
  for c, widened in ((cache, True), (bits, False)):
    text = step.lower(params, x, c, c, jax.ShapeDtypeStruct((), jnp.int32)).compile().as_text()
    assert (f"f32[{cache_shape}]" in text) == widened
  rng = np.random.default_rng(1)
  real = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.1, s.dtype), params)
  xv = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
  kc = jnp.asarray(rng.standard_normal(cache.shape), jnp.bfloat16)
  vc = jnp.asarray(rng.standard_normal(cache.shape), jnp.bfloat16)
  y1, k1, v1 = step(real, xv, kc, vc, jnp.int32(256))
  y2, k2, v2 = step(real, xv, streams.as_bits(kc), streams.as_bits(vc), jnp.int32(256))
  np.testing.assert_array_equal(np.asarray(y1, np.float32), np.asarray(y2, np.float32))
  np.testing.assert_array_equal(np.asarray(streams.as_bits(k1)), np.asarray(k2))
  np.testing.assert_array_equal(np.asarray(streams.as_bits(v1)), np.asarray(v2))

"""The cost model: its arithmetic, and its counts against what XLA compiles for the engine.

Model and measurement count the same thing on purpose:
- collective bytes: each collective op's buffer per device, for the ops inside the engine's tick
  loop, times loop trip counts, with the tick's cond weighted by units / ticks (the psums run
  only on valid ticks; the ppermute runs on every tick). The gather of the output after the
  loop belongs to XLA's partitioner and is in neither.
- FLOPs: matmul (dot) FLOPs times loop trip counts; the tick cond weighted by units / ticks and
  attention's per-KV-block cond by the share of blocks visited (counts.hlo_cond_weights), or
  every branch counted as taken for the static count. XLA's cost_analysis() is not used: it
  counts a loop body once. Elementwise FLOPs are in neither.
float32, because CPU XLA promotes bf16 collectives to float32.
"""

import json

import jax
import jax.numpy as jnp
import pytest

from conftest import require_devices
from jaxpart import cli, config
from jaxpart.cost import forward as costmodel
from jaxpart.cost import params as costparams
from jaxpart.cost import units as unitcosts
from jaxpart.cost import counts
from jaxpart.placement import memory
from jaxpart.placement import shards
from jaxpart.runtime import engine
from jaxpart.measure import compiled as measure
from jaxpart.placement import planner
from jaxpart.runtime import sharding
from jaxpart.measure.hlo import COLLECTIVE_KINDS, collective_ops, hlo_flops
from jaxpart.placement.plan import Plan, contiguous_stage_layers

TINY32 = config.load_setup("tiny", overrides={"model.dtype": "float32"})
PAPER = config.load_setup("paper")
RTOL = 0.05

TINY_PLANS = {
    "baseline": lambda s: planner.make_plan(s, 16, "baseline", tp=8, pp=2),
    # whole sequences of 100 in query tiles of 16 (the last one ragged) against blocks of 16
    "baseline-tiled": lambda s: planner.make_plan(s, 16, "baseline", tp=8, pp=2, kv_block=16),
    # 2 microbatches x 7 chunks of 16 (ragged: the last holds 4), kv blocks of 16
    "layerwise": lambda s: planner.make_plan(s, 16, "layerwise", chunk_tokens=16, chunk_rows=1),
}


@pytest.fixture(scope="module")
def compiled():
  require_devices(16)
  out = {}
  for name, make in TINY_PLANS.items():
    plan = make(TINY32)
    mesh = sharding.mesh_for(plan)
    params = sharding.abstract_placed_params(TINY32.model, plan, mesh)
    x = jax.ShapeDtypeStruct((TINY32.run.batch, TINY32.run.seq, TINY32.model.d_model),
                             jnp.float32)
    stats = measure.compile_stats(engine.jit_forward(plan, TINY32.model, mesh), params, x)
    out[name] = (plan, stats["hlo"])
  return out


@pytest.mark.parametrize("name", sorted(TINY_PLANS))
def test_collective_bytes_match_compiled_hlo(compiled, name):
  plan, hlo = compiled[name]
  modelled = counts.collective_bytes(TINY32.model, plan)
  loop = measure.engine_loop_bytes(hlo, plan)["loop"]
  static = {k: 0.0 for k in COLLECTIVE_KINDS}
  for op in collective_ops(hlo):
    if op.loop_depth:
      static[op.kind] += op.bytes * op.count
  kinds = ("all-reduce", "collective-permute", "all-gather")
  for kind in kinds:
    assert modelled["executed"][kind] > 0
    assert modelled["executed"][kind] == pytest.approx(loop[kind], rel=RTOL), kind
    assert modelled["static"][kind] == pytest.approx(static[kind], rel=RTOL), kind
  assert not any(v for k, v in loop.items() if k not in kinds)


@pytest.mark.parametrize("name", sorted(TINY_PLANS))
def test_flops_match_compiled_hlo(compiled, name):
  plan, hlo = compiled[name]
  fl = counts.plan_flops(TINY32.model, plan)
  executed = hlo_flops(hlo, counts.hlo_cond_weights(plan))
  assert fl["executed"] == pytest.approx(executed, rel=RTOL)
  assert fl["static"] == pytest.approx(hlo_flops(hlo), rel=RTOL)
  # The counts differ where they should: bubble ticks and skipped KV blocks are real savings.
  assert fl["executed"] < 0.95 * fl["static"]


def test_ring_allreduce_and_collective_link_bytes():
  assert counts.ring_allreduce_link_bytes(1000, 1) == 0
  assert counts.ring_allreduce_link_bytes(1000, 2) == pytest.approx(1000)
  assert counts.ring_allreduce_link_bytes(1000, 8) == pytest.approx(1750)
  hw = PAPER.hardware
  p = costparams.DEFAULT
  assert unitcosts.allreduce_seconds(1e9, 4, hw, p) == pytest.approx(
      1.5e9 / (hw.link_bw * p.link_fraction) + hw.link_latency)
  assert unitcosts.allreduce_seconds(1e9, 1, hw, p) == 0
  plan = planner.make_plan(PAPER, 16, "baseline", tp=8, pp=2)
  cb = counts.collective_bytes(PAPER.model, plan)
  unit = plan.rows * plan.seq * PAPER.model.d_model * 2
  # Megatron forward: two all-reduces of the unit per layer, on each of the units.
  assert cb["executed"]["all-reduce"] == 2 * plan.layers_per_stage * plan.units * unit
  assert cb["link"]["all-reduce"] == pytest.approx(cb["executed"]["all-reduce"] * 2 * 7 / 8)
  # The pipeline send of a unit each tick, plus the streams: S-1 slices of 1/N of a unit into
  # stage 0 and S-1 out of the last stage (S = 2 here), and a 1/tp slice all-gathered.
  assert cb["executed"]["collective-permute"] == plan.ticks * (unit + 2 * 1 * unit // 16)
  assert cb["executed"]["all-gather"] == plan.ticks * unit // 8


@pytest.mark.parametrize("stages,units", [(1, 5), (2, 8), (4, 85), (4, 10880)])
def test_bubble_formula(stages, units):
  """The one bubble formula, on the Plan; the prediction reports it."""
  plan = Plan(strategy="layerwise", devices=stages, stages=stages, tp=1,
              stage_layers=contiguous_stage_layers(stages, stages), batch=1, seq=units,
              microbatches=1, chunk_tokens=1, kv_block=1)
  assert plan.units == units
  assert plan.bubble_fraction == pytest.approx((stages - 1) / (units + stages - 1))


def test_uniform_pipeline_time_is_ticks_times_step():
  """One chunk per microbatch: every tick costs the same, a stage idles S-1 of them."""
  plan = planner.make_plan(PAPER, 16, "baseline", tp=8, pp=2)
  p = costmodel.predict(PAPER, plan)
  assert p.bubble_fraction == pytest.approx(plan.bubble_fraction)
  assert p.total_s == pytest.approx(plan.ticks * p.step_s)
  pipe = p.pipe_comm_s / plan.ticks
  assert p.bubble_s == pytest.approx((plan.stages - 1) * (p.step_s - pipe))
  assert p.tokens_per_s * p.total_s == pytest.approx(plan.batch * plan.seq)
  assert p.seed_time_per_token_ms == pytest.approx(1e3 / p.tokens_per_s)


@pytest.mark.parametrize("strategy,kw", [("baseline", {"tp": 8, "pp": 2}), ("layerwise", {})])
@pytest.mark.parametrize("field,factor", [("link_bw", 4.0), ("hbm_bw", 2.0), ("peak_flops", 2.0),
                                          ("l2_bytes", 4.0), ("l2_bw", 2.0)])
def test_better_hardware_is_never_slower(strategy, kw, field, factor):
  plan = planner.make_plan(PAPER, 16, strategy, **kw)
  base = costmodel.predict(PAPER, plan)
  better = config.load_setup(
      "paper", overrides={f"hardware.{field}": getattr(PAPER.hardware, field) * factor})
  assert costmodel.predict(better, plan).total_s <= base.total_s * (1 + 1e-12)


def test_more_work_takes_longer():
  plan = planner.make_plan(PAPER, 16, "layerwise")
  longer = config.load_setup("paper", overrides={"model.d_ff": 2 * PAPER.model.d_ff})
  plan2 = planner.make_plan(longer, 16, "layerwise", chunk_tokens=plan.chunk_tokens,
                            chunk_rows=plan.rows)
  assert costmodel.predict(longer, plan2).total_s > costmodel.predict(PAPER, plan).total_s


def test_paper_layerwise_streams_its_weights():
  """The design's central fact: a 403 MB shard never sits in a 50 MB L2, so an L2-sized chunk
  of T tokens has arithmetic intensity about T FLOP/byte and is HBM-bound on an H100."""
  plan = planner.make_plan(PAPER, 16, "layerwise")
  p = costmodel.predict(PAPER, plan)
  assert p.working_set_fits_l2 and not p.weights_resident_in_l2
  assert p.weights_per_device_bytes > 8 * PAPER.hardware.l2_bytes
  n = plan.rows * plan.chunk_tokens
  assert p.arithmetic_intensity == pytest.approx(n, rel=0.25)
  assert n < PAPER.hardware.ridge_flop_per_byte and p.bound == "hbm"
  step = costmodel.layer_step(PAPER, plan, counts.kv_positions(plan, 0))
  assert step["weight_bytes"] == shards.weight_shard_bytes(PAPER.model, plan.tp, 1)


def test_small_model_weights_stay_in_l2():
  small = config.load_setup("tiny")
  plan = planner.make_plan(small, 16, "layerwise", chunk_tokens=16, chunk_rows=1)
  p = costmodel.predict(small, plan)
  assert p.weights_resident_in_l2
  # Weights then cross HBM once per run, not once per step.
  assert p.hbm_read_bytes_per_device < plan.units * p.weights_per_device_bytes


def test_tile_visits_follow_blocked_attention():
  plan = planner.make_plan(PAPER, 16, "layerwise", chunk_tokens=100, chunk_rows=1, kv_block=64)
  # chunk 0: queries 0..63 need block 0, queries 64..99 blocks 0..1
  assert counts.tile_visits(plan, 0).tolist() == [1, 2]
  # chunk 1: queries 100..163 need blocks 0..2, queries 164..199 blocks 0..3
  assert counts.tile_visits(plan, 1).tolist() == [3, 4]
  # every (tile, block) pair in full: 3 and 7 pairs of 64 x 64, over the chunk's 100 queries
  assert counts.kv_positions(plan, 0) == pytest.approx(3 * 64 * 64 / 100)
  assert counts.kv_positions(plan, 1) == pytest.approx(7 * 64 * 64 / 100)
  last = counts.tile_visits(plan, plan.n_chunks - 1)
  assert last[-1] == plan.cache_len // plan.kv_block


def test_whole_sequence_attention_is_causal_not_square():
  """A 10,000-token microbatch in 128 x 128 tiles does the triangle plus the diagonal tiles."""
  plan = planner.make_plan(PAPER, 16, "baseline", tp=8, pp=2)
  visits = counts.tile_visits(plan, 0).tolist()
  tiles = -(-plan.seq // 128)
  assert plan.kv_block == 128 and visits == [i + 1 for i in range(tiles)]
  pairs = tiles * (tiles + 1) // 2
  assert pairs / tiles**2 == pytest.approx(0.506, abs=0.01)


def test_flop_counts_are_ordered():
  for strategy, kw in (("baseline", {"tp": 8, "pp": 2}), ("layerwise", {})):
    plan = planner.make_plan(PAPER, 16, strategy, **kw)
    fl = counts.plan_flops(PAPER.model, plan)
    assert fl["useful"] <= fl["executed"] <= fl["static"]
    assert fl["executed"] == pytest.approx(fl["matmul"] + fl["attention"])
    per_token = fl["useful"] * plan.devices / (plan.batch * plan.seq)
    assert per_token == pytest.approx(memory.forward_flops_per_token(PAPER.model,
                                                                                plan.seq))


def test_energy_adds_up():
  for strategy, kw in (("baseline", {"tp": 8, "pp": 2}), ("layerwise", {})):
    p = costmodel.predict(PAPER, planner.make_plan(PAPER, 16, strategy, **kw))
    assert p.energy_j == pytest.approx(sum(p.energy_breakdown_j.values()))
    assert all(v >= 0 for v in p.energy_breakdown_j.values())
    assert p.energy_per_token_j == pytest.approx(p.energy_j / (PAPER.run.batch * PAPER.run.seq))
    assert 0 <= p.l2_hit_rate <= 1


def test_planner_auto_ranks_by_the_cost_model():
  how, scorer = costmodel.SCORER
  assert scorer is costmodel.score and "cost model" in how
  best, ranked, _ = planner.plan_auto(PAPER, 16, scorer=costmodel.SCORER)
  scores = [s for s, _ in ranked]
  assert scores == sorted(scores)
  assert scores[0] == pytest.approx(costmodel.score(PAPER, best))


def test_predict_command_json(capsys):
  rc = cli.main(["predict", "--preset", "paper", "--devices", "16", "--strategy", "baseline",
                 "--tp", "8", "--pp", "2", "--json"])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  plan = planner.make_plan(PAPER, 16, "baseline", tp=8, pp=2)
  assert out["plan"]["tp"] == 8 and out["plan"]["stages"] == 2
  assert out["prediction"]["tokens_per_s"] == pytest.approx(
      costmodel.predict(PAPER, plan).tokens_per_s)


def test_predict_command_table_and_errors(capsys):
  assert cli.main(["predict", "--preset", "paper", "--devices", "16",
                   "--strategy", "layerwise"]) == 0
  text = capsys.readouterr().out
  assert "tokens/s" in text and "L2 hit rate (modelled)" in text
  assert cli.main(["predict", "--preset", "paper", "--devices", "16", "--strategy", "baseline",
                   "--tp", "3"]) == 2
  assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("kw,match", [({"gemm_fraction": 1.5}, "gemm_fraction = 1.5: must be in"),
                                      ({"tile_m": 0}, "tile_m = 0: must be positive"),
                                      ({"static_watts": -1.0}, "static_watts = -1.0")])
def test_bad_model_params_name_the_field(kw, match):
  with pytest.raises(config.ConfigError, match=match):
    costparams.ModelParams(**kw)


def test_step_time_equals_a_hand_computed_figure():
  """Paper model, batch 1 x 64 tokens, baseline TP8 x PP2 on H100: one unit, 2 ticks, 2 layers a
  stage. Every figure below is worked out by hand from the H100 datasheet constants and the
  ModelParams defaults (gemm 0.75, HBM 0.90, link 0.80 of peak), not by calling the model.

  Per device, one layer on the 64-token unit (bf16, tp 8: A = 4096/8 = 512 attention columns):
  - weight read: 805,306,368 / 8 projection weights x 2 B + 4 LayerNorm vectors x 16384 x 2 B
    (replicated) = 201,326,592 + 131,072 = 201,457,664 B, streamed from HBM every step (two
    layers' weights cannot sit in a 50 MB L2);
  - activations in and out 2 x 64 x 16384 x 2 B = 4,194,304 B; K/V read 2 x 64 x 512 x 2 B =
    131,072 B and written the same; the 24.9 MB working set fits L2, so nothing spills;
    HBM bytes 201,457,664 + 4,194,304 + 2 x 131,072 = 205,914,112 B; at 0.9 x 3.35e12 B/s
    that is 6.8297e-5 s, above compute (12,893,290,496 FLOP at 0.75 x 989e12 = 1.74e-5 s);
  - two all-reduces of 64 x 16384 x 2 B = 2,097,152 B: a ring sends 2 x 7/8 of it =
    3,670,016 B at 0.8 x 450e9 B/s plus 5 us latency = 1.51945e-5 s each;
  - the pipeline send of the unit, 2,097,152 B at 0.8 x 450e9 plus 5 us = 1.08254e-5 s;
  - the sharded input and output streams: one 1/16 slice of the unit (131,072 B) into stage 0
    and one out of the last stage, each at 0.8 x 450e9 plus 5 us, and the all-gather of the
    unit inside stage 0's tensor group, 7/8 x 2,097,152 B at 0.8 x 450e9 plus 5 us;
  - the tick's local copies of the unit (3 unit-sized buffers written and read: the gathered
    unit, its relayout, the send's buffer) = 6 x 2,097,152 B, from the 50 MB L2 at 12e12 B/s.
  Step = 2 layers x (HBM + 2 all-reduces) + send + streams + copies; the run is 2 such ticks
  (one unit, 2 stages).
  """
  setup = config.load_setup("paper", overrides={"run.batch": "1", "run.seq": "64"})
  plan = planner.make_plan(setup, 16, "baseline", tp=8, pp=2)
  assert (plan.units, plan.ticks, plan.layers_per_stage, plan.chunk_tokens) == (1, 2, 2, 64)
  hbm_s = (201_457_664 + 4_194_304 + 2 * 131_072) / (0.9 * 3.35e12)
  compute_s = (2 * 64 * 805_306_368 / 8 + 4 * 64 * 64 * 512) / (0.75 * 989e12)
  allreduce_s = 3_670_016 / (0.8 * 450e9) + 5e-6
  send_s = 2_097_152 / (0.8 * 450e9) + 5e-6
  stream_s = 2 * (131_072 / (0.8 * 450e9) + 5e-6) + 7 / 8 * 2_097_152 / (0.8 * 450e9) + 5e-6
  move_s = 6 * 2_097_152 / 12e12
  assert compute_s < hbm_s
  layer_s = hbm_s + 2 * allreduce_s
  assert layer_s == pytest.approx(9.86855e-5, rel=1e-5)   # the hand figure, to 6 digits
  step_s = 2 * layer_s + send_s + stream_s + move_s

  p = costmodel.predict(setup, plan)
  assert p.bound == "hbm" and not p.weights_resident_in_l2
  assert p.step_s == pytest.approx(step_s, rel=1e-9)
  assert p.total_s == pytest.approx(2 * step_s, rel=1e-9)
  assert p.tp_comm_s == pytest.approx(2 * 2 * allreduce_s, rel=1e-9)
  assert p.pipe_comm_s == pytest.approx(2 * (send_s + stream_s + move_s), rel=1e-9)
  assert p.hbm_read_bytes_per_device == 2 * (201_457_664 + 2_097_152 + 131_072)


@pytest.mark.parametrize("seq, chunk, kv_block", [(100, 100, 16), (1000, 7, 16), (1000, 64, 16),
                                                   (10000, 10000, 128), (777, 200, 64)])
def test_visit_sum_closed_form_equals_the_tiles(seq, chunk, kv_block):
  setup = config.load_setup("tiny", overrides={"run.seq": str(seq)})
  plan = planner.make_plan(setup, 4, "layerwise", chunk_tokens=chunk, chunk_rows=1,
                           kv_block=kv_block)
  for k in range(plan.n_chunks):
    assert counts.visit_sum(plan, k) == int(counts.tile_visits(plan, k).sum())

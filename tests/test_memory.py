"""Working-set and footprint arithmetic against figures computed by hand (literals below)."""

import pytest

from jaxpart import config
from jaxpart.placement import memory
from jaxpart.placement import shards
from jaxpart.placement import planner
from jaxpart.placement.plan import PlanError


def _cfg(preset):
  return config.MODEL_PRESETS[preset]


def test_step_working_set_tiny_by_hand():
  # tiny: D=128, H=8, E=4 (A=32), F=128, bf16 (b=2). Step: 2 rows x 100 tokens, kv_block 100,
  # tp 4 -> local heads h=2, local attention width a=8, local MLP width f=32, rt=200.
  got = memory.step_working_set(_cfg("tiny"), memory.StepShape(rows=2, tokens=100, kv_block=100,
                                                                tp=4))
  want = {
      "input_chunk": 51_200,             # 200 x 128 x 2
      "ln1_out": 51_200,                 # 200 x 128 x 2
      "qkv_shard": 28_800,               # 3 x 200 x 8 x (4 + 2)
      "kv_block": 6_400,                 # 2 x 2 rows x 100 keys x 8 x 2
      "scores_tile": 160_000,            # 2 rows x 2 heads x 100 x 100 x 4
      "probs_tile": 80_000,              # 2 x 2 x 100 x 100 x 2
      "softmax_state": 9_600,            # 200 x 8 x 4 + 2 x 200 x 2 heads x 4
      "attn_out_shard": 3_200,           # 200 x 8 x 2
      "attn_partial_sum": 153_600,       # 200 x 128 x (4 + 2)
      "residual_mid": 51_200,            # 200 x 128 x 2
      "ln2_out": 51_200,                 # 200 x 128 x 2
      "mlp_intermediate_shard": 38_400,  # 200 x 32 x (4 + 2)
      "mlp_partial_sum": 153_600,        # 200 x 128 x (4 + 2)
      "output_chunk": 51_200,            # 200 x 128 x 2
  }
  assert got == want
  assert sum(got.values()) == 889_600
  # attention phase: 2 x 51,200 + 28,800 + 6,400 + 160,000 + 80,000 + 9,600 + 3,200 + 153,600
  # mlp phase: 3 x 51,200 + 38,400 + 153,600
  phases = memory.step_phase_bytes(_cfg("tiny"), memory.StepShape(2, 100, 100, 4))
  assert phases == {"attention": 544_000, "mlp": 345_600}
  assert memory.step_peak_bytes(_cfg("tiny"), memory.StepShape(2, 100, 100, 4)) == 544_000


def test_step_working_set_paper_by_hand():
  # paper: D=16384, H=32, E=128 (A=4096), F=16384, bf16. Step: 1 row x 64 tokens, kv_block 64,
  # tp 4 -> h=8, a=1024, f=4096, rt=64.
  got = memory.step_working_set(_cfg("paper"), memory.StepShape(rows=1, tokens=64, kv_block=64,
                                                                 tp=4))
  want = {
      "input_chunk": 2_097_152,             # 64 x 16384 x 2
      "ln1_out": 2_097_152,
      "qkv_shard": 1_179_648,               # 3 x 64 x 1024 x 6
      "kv_block": 262_144,                  # 2 x 1 x 64 x 1024 x 2
      "scores_tile": 131_072,               # 1 x 8 x 64 x 64 x 4
      "probs_tile": 65_536,                 # 1 x 8 x 64 x 64 x 2
      "softmax_state": 266_240,             # 64 x 1024 x 4 + 2 x 64 x 8 x 4
      "attn_out_shard": 131_072,            # 64 x 1024 x 2
      "attn_partial_sum": 6_291_456,        # 64 x 16384 x 6
      "residual_mid": 2_097_152,
      "ln2_out": 2_097_152,
      "mlp_intermediate_shard": 1_572_864,  # 64 x 4096 x 6
      "mlp_partial_sum": 6_291_456,
      "output_chunk": 2_097_152,
  }
  assert got == want
  # 5 x 2,097,152 + 1,179,648 + 262,144 + 131,072 + 65,536 + 266,240 + 131,072
  #   + 2 x 6,291,456 + 1,572,864
  assert sum(got.values()) == 26_677_248


def test_terms_documented_and_phased():
  got = memory.step_working_set(_cfg("small"), memory.StepShape(1, 10, 16, 2))
  assert set(got) == set(memory.STEP_TERMS)
  assert {phase for phase, _ in memory.STEP_TERMS.values()} == {"attention", "mlp"}


def test_working_set_rejects_bad_tp():
  with pytest.raises(PlanError, match="tp = 3"):
    memory.step_working_set(_cfg("paper"), memory.StepShape(1, 1, 16, 3))


def test_paper_footprint_by_hand():
  fp = memory.footprint(_cfg("paper"), config.RUN_PRESETS["paper"])
  # 4 x 16384 x 4096 (Q, K, V, O) + 2 x 16384 x 16384 (MLP in, out)
  assert fp["projection_params_per_layer"] == 805_306_368
  # + 2 LayerNorms x (scale + bias) x 16384 = 65,536 per layer; x 4 layers
  assert fp["params_total"] == 3_221_487_616
  assert fp["weight_bytes_total"] == 6_442_975_232
  # 128 x 10000 x 16384 x 2 = 41.94 GB = 39.06 GiB
  assert fp["activation_bytes_full_layer"] == 41_943_040_000
  # 2 (K, V) x 128 x 10000 x 4096 x 2
  assert fp["kv_cache_bytes_per_layer"] == 20_971_520_000
  assert fp["kv_bytes_per_token_per_layer"] == 16_384
  # (805,306,368 / 4 + 65,536) x 2: ~403 MB, the per-GPU weights of both seed placements
  assert shards.weight_shard_bytes(_cfg("paper"), 4, 1) == 402_784_256
  assert shards.weight_shard_bytes(_cfg("paper"), 8, 2) == 2 * (100_663_296 + 65_536) * 2


def test_run_streamed_bytes_by_hand():
  # tiny, batch 2, seq 100, rows 1, tokens 30 -> 4 chunks (30, 30, 30, 10), 2 microbatches.
  # weights: 2 x 4 unit steps x ((4 x 128 x 32 + 2 x 128 x 128) / 2 + 512) x 2 B
  #   = 8 x (24,576 + 512) x 2 = 401,408
  # KV prefix positions per row: 30 x (4 x 3 / 2) + 100 = 280; bytes 2 x 2 rows x 280 x 16 x 2
  got = memory.run_streamed_bytes(_cfg("tiny"), 2, 100, 1, 30, 2)
  assert got == {"weights": 401_408, "kv_prefix": 35_840}


def test_paper_seed_claims_verdicts():
  setup = config.load_setup("paper")
  plan = planner.make_plan(setup, 16, "layerwise")
  claims = {c["claim"]: c for c in memory.seed_claims(setup.model, setup.run, setup.hardware,
                                                         plan)}
  verdicts = {k: c["verdict"] for k, c in claims.items()}
  assert verdicts.pop("full activation per layer").startswith("holds (binary units")
  assert set(verdicts.values()) == {"does not hold"}
  assert claims["activation chunk"]["true"] == 268_435_456       # 128 x 64 x 16384 x 2
  assert claims["total parameters"]["true"] == 3_221_487_616
  assert claims["weights per layer"]["true"] == 1_610_743_808     # 805,371,904 x 2
  assert claims["weight tiles per step"]["true"] == 402_784_256
  assert claims["cache utilisation"]["true"] > 1.0


def test_paper_30b_claims_hold():
  setup = config.load_setup("paper-30b")
  plan = planner.make_plan(setup, 16, "layerwise")
  claims = {c["claim"]: c["verdict"] for c in memory.seed_claims(
      setup.model, setup.run, setup.hardware, plan)}
  assert claims["total parameters"] == "holds"
  assert claims["total model size"] == "holds"
  assert claims["weights per layer"] == "holds"
  assert claims["activation chunk"] == "does not hold"


def test_verdict_rules():
  assert memory.verdict(30, 30.5e9, 1e9) == "holds"
  assert memory.verdict(30, 31e9, 1e9) == "does not hold"
  assert memory.verdict(39.06, 41_943_040_000, 1e9, 2**30).startswith("holds (binary")
  assert memory.verdict(12, 268_435_456, 1e6, 2**20) == "does not hold"


def test_per_device_paper_layerwise():
  setup = config.load_setup("paper")
  plan = planner.make_plan(setup, 16, "layerwise")
  pd = memory.per_device(setup.model, setup.run, plan)
  assert pd["weights_per_device"] == 402_784_256
  # 2 x 128 x 10000 x 1024 x 2: the whole batch's K/V for one layer on one tensor shard
  assert pd["kv_cache_per_device"] == 5_242_880_000
  assert pd["working_set_per_step"] == plan.predicted_working_set_bytes
  assert pd["cache_utilisation"] == pytest.approx(plan.predicted_working_set_bytes / 50e6)
  assert pd["working_set_peak_phase"] < pd["working_set_per_step"]

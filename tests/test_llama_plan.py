"""The Llama family in the planner, memory model and cost model, against hand-computed figures.

Published shapes (config.json of each model): Llama-3-8B D 4096, 32 heads of 128, 8 K/V heads,
d_ff 14336, vocab 128256, 32 layers, untied; Llama-3-70B D 8192, 64 heads, 8 K/V heads,
d_ff 28672, 80 layers. Literals below are worked out from those, not from the code.
"""

import json

import pytest

from jaxpart import cli, config
from jaxpart.cost import forward as costmodel
from jaxpart.cost import counts
from jaxpart.placement import memory
from jaxpart.placement import shards
from jaxpart.placement.grids import layerwise_grids
from jaxpart.placement.plan import valid_tps
from jaxpart.placement import planner
from jaxpart.config import ModelConfig

L8B = config.MODEL_PRESETS["llama3-8b"]
L70B = config.MODEL_PRESETS["llama3-70b"]


def _cli(capsys, *argv):
  rc = cli.main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def test_llama3_8b_weights_per_device_at_tp8():
  # Per layer on one of 8 shards: Q and O 4096 x 4096 / 8 each; K and V 4096 x 1024 / 8 each
  # (8 K/V heads: one per shard); gate, up, down 4096 x 14336 / 8 each; two RMSNorm scales of
  # 4096, replicated.
  q = o = 4096 * 4096 // 8                      # 2,097,152
  k = v = 4096 * 1024 // 8                      # 524,288
  mlp = 3 * 4096 * 14336 // 8                   # 22,020,096
  layer = q + o + k + v + mlp + 2 * 4096        # 27,271,168
  assert layer == 27_271_168
  vocab_shard = 128256 // 8                     # 16,032 rows of the table, columns of the head
  edges = 2 * vocab_shard * 4096 + 4096         # embedding + LM head + final norm
  per_device = 32 * layer + edges
  assert per_device == 1_004_015_616
  # The same from the total: 1/8 of every weight, plus 7/8 of the replicated norm scales.
  norms = 32 * 2 * 4096 + 4096
  assert per_device == 8_030_261_248 // 8 + norms - norms // 8
  assert shards.device_weight_bytes(L8B, 8, 32) == 2 * per_device
  setup = config.load_setup("llama3-8b")
  plan = planner.make_plan(setup, 8, "layerwise", tp=8)
  pd = memory.per_device(setup.model, setup.run, plan)
  assert pd["weights_per_device"] == 2 * per_device
  assert pd["edge_weights_per_device"] == {"embedding": 2 * 16032 * 4096, "final_norm": 8192,
                                           "lm_head": 2 * 16032 * 4096}


def test_kv_heads_local_rules():
  assert [shards.kv_heads_local(L70B, t) for t in (1, 2, 4, 8, 16)] == [8, 4, 2, 1, 1]
  # 6 query heads over 3 K/V heads at tp 2: a shard's 3 query heads straddle two groups, so it
  # computes one K/V head per query head (llama._local_kv_heads).
  odd = ModelConfig(layers=1, d_model=64, n_heads=6, head_dim=8, d_ff=64, arch="llama",
                    n_kv_heads=3, vocab=64)
  assert shards.kv_heads_local(odd, 2) == 3
  # At tp 16 the 70B's K/V weights are replicated: held whole, 1 head's columns read.
  held = shards.weight_shard_bytes(L70B, 16, 1)
  read = shards.weight_shard_bytes(L70B, 16, 1, held=False)
  assert held - read == 2 * 2 * 8192 * (1024 - 128)


def test_kv_cache_uses_kv_dim_not_attn_dim():
  # 70B, 8 rows x 4096 positions, 5 layers, tp 4: 2 K/V heads of 128 per shard.
  assert shards.kv_cache_bytes(L70B, 8, 4096, 4, 5) == 2 * 5 * 8 * 4096 * 256 * 2
  fp = memory.footprint(L70B, config.RUN_PRESETS["llama3-70b"])
  assert fp["kv_bytes_per_token_per_layer"] == 2 * 1024 * 2


def test_flops_count_swiglu_and_the_head():
  # One token, tp 8: 2 FLOPs per local projection weight (Q, K, V, O, gate, up, down).
  assert counts.matmul_flops(L8B, 1, 8) == 2 * (27_271_168 - 2 * 4096)
  assert counts.head_flops(L8B, 1, 8) == 2 * 4096 * 16032
  assert counts.head_flops(config.MODEL_PRESETS["paper"], 1, 8) == 0
  # Scores use every query head: n_heads x head_dim = 4096 / tp, not the K/V width.
  assert counts.attention_flops(L8B, 1, 1, 100, 8) == 2 * 2 * 100 * 512
  # Whole model, seq 1: 32 layers x 2 x (2 x 4096^2 + 2 x 4096 x 1024 + 3 x 4096 x 14336 =
  # 218,103,808), attention 4 x 4096 per layer over (1 + 1) / 2 keys, LM head 2 x 4096 x V.
  per_token = memory.forward_flops_per_token(L8B, 1)
  assert per_token == 32 * 2 * 218_103_808 + 32 * 4 * 4096 + 2 * 4096 * 128256


def test_llama_grids_need_heads_and_d_ff_not_kv_heads():
  grids = layerwise_grids(L70B, 16)
  assert [(s, t) for s, t, p in grids if not p] == [(16, 1), (8, 2), (4, 4), (2, 8), (1, 16)]
  assert 16 in valid_tps(L70B)           # 16 does not divide 8 K/V heads: replicated


def test_program_bytes_llama_streams():
  setup = config.load_setup("llama3-70b")
  plan = planner.make_plan(setup, 16, "layerwise", tp=4, chunk_tokens=256, chunk_rows=2)
  prog = memory.program_bytes(setup.model, setup.run, plan)
  assert prog["input_share"] == 8 * 4096 * 4                          # int32 ids everywhere
  assert prog["output_share"] == 8 * 4096 * 8192 * 2 // 16           # bf16 hidden vectors, 1/16
  assert prog["output_loop_buffer"] == (8 + 2) * 4096 * 8192 * 2 // 16
  assert prog["edge_weights"] == 2 * (2 * 32064 * 8192 + 8192)
  assert prog["logits_chunk"] == 2048 * 32064 * 4                    # one slice of logits, V/tp
  gen = memory.program_bytes(setup.model, setup.run, plan, last_only=True)
  assert gen["output_share"] == 8 * 8016 * 4                          # each row's last logits
  assert gen["output_loop_buffer"] == (8 + 2) * 8016 * 4
  assert gen["head_logits_unit"] == 2 * 32064 * 4
  assert prog["kv_cache"] == 2 * 20 * 2 * 4096 * 256 * 2


def test_llama3_70b_auto_fits_h100_and_predicts(capsys):
  rc, out, _ = _cli(capsys, "plan", "--preset", "llama3-70b", "--devices", "16", "--strategy",
                    "auto", "--json")
  assert rc == 0
  d = json.loads(out)
  pd = d["per_device"]
  assert pd["predicted_hbm_bytes"] <= 80e9 and pd["fits_prefill"]
  assert pd["fits_generation"] and pd["generation_hbm_bytes"] > pd["predicted_hbm_bytes"]
  assert d["plan"]["derived"]["layers_per_stage"] > 1
  setup = config.load_setup("llama3-70b")
  plan = planner.make_plan(setup, 16, "auto", scorer=costmodel.SCORER)
  pred = costmodel.predict(setup, plan)
  assert pred.tokens_per_s > 0 and pred.edge_s > 0 and pred.fits_device_memory
  assert pred.weights_per_device_bytes == pd["weights_per_device"]


def test_info_llama3_70b(capsys):
  rc, out, _ = _cli(capsys, "info", "--preset", "llama3-70b", "--json")
  assert rc == 0
  assert json.loads(out)["params"]["total_params"] == 70_553_706_496


@pytest.mark.parametrize("command", ["memory", "predict"])
def test_memory_and_predict_run_for_every_llama_preset(capsys, command):
  for preset in ("llama3-8b", "mistral-7b", "qwen2.5-7b", "llama-tiny"):
    rc, out, err = _cli(capsys, command, "--preset", preset, "--devices", "4", "--strategy",
                        "layerwise")
    assert rc == 0, err

"""Decode in the cost model: the HBM-read bound by hand, and how TPOT orders."""

import json
import sys
from pathlib import Path

import pytest

from jaxpart import cli, config
from jaxpart.cost import forward as costmodel
from jaxpart.cost import decode as decode_cost
from jaxpart.placement import planner
from jaxpart.placement.plan import decode_microbatches

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is not installed

from experiments import common, sec4_throughput  # noqa: E402


def test_decode_microbatches():
  assert decode_microbatches(64, 16) == 16
  assert decode_microbatches(8, 16) == 8
  assert decode_microbatches(1, 16) == 1
  assert decode_microbatches(12, 8) == 6


def test_bound_by_hand_tiny():
  # tiny: D 128, 8 heads of 4 (A 32), d_ff 128, 4 layers, bf16; batch 2, prompt 100. Layer-wise
  # on 16 devices: 4 stages x tp 4, one layer a stage. M = 2 microbatches of 1 row.
  # Per tick, one device reads its layer's shard: (4 x 128 x 32 + 2 x 128 x 128) / 4 = 12,288
  # projection weights + 4 x 128 LayerNorm values = 12,800 x 2 B = 25,600 B; and its row's K/V
  # at 8 columns a shard: 2 x 8 x 2 B = 32 B per position. With 3 new tokens the decode steps
  # attend to 101 and 102 positions: mean 101.5 -> 3,248 B.
  setup = config.load_setup("tiny", "h100")
  plan = planner.make_plan(setup, 16, "layerwise")
  assert (plan.stages, plan.tp) == (4, 4)
  d = decode_cost.predict_decode(setup, plan, 3)
  assert (d.microbatches, d.rows, d.cycle_ticks) == (2, 1, 4)
  assert d.hbm_bound_s == pytest.approx(4 * (25_600 + 3_248) / 3.35e12, rel=1e-12)
  assert d.bubble_fraction == pytest.approx(1 - 3 * 2 / (3 * 4 + 2 - 1))
  assert d.ttft_s == costmodel.predict(setup, plan).total_s
  assert d.tpot_s >= d.hbm_bound_s
  assert d.generation_s == pytest.approx(d.ttft_s + 2 * d.tpot_s)


def _l70b(batch):
  setup = config.load_setup("llama3-70b", "h100", overrides={"run.batch": str(batch)})
  return setup, planner.make_plan(setup, 16, "layerwise", tp=4, chunk_tokens=256,
                                chunk_rows=1)


def test_llama3_70b_tpot_orders_with_batch_and_stays_near_the_bound():
  out = {}
  for batch in (1, 8, 64):
    setup, plan = _l70b(batch)
    out[batch] = decode_cost.predict_decode(setup, plan, 256)
  for d in out.values():
    assert d.hbm_bound_s <= d.tpot_s <= 1.3 * d.hbm_bound_s
    assert d.ideal_bound_s < d.hbm_bound_s     # 4 stages: 4 ticks a token
    assert d.fits_device_memory
  # More rows per microbatch read more KV per tick: TPOT and the bound grow with the batch.
  assert out[1].tpot_s < out[8].tpot_s < out[64].tpot_s
  assert out[1].hbm_bound_s < out[8].hbm_bound_s < out[64].hbm_bound_s
  assert out[64].bytes_read_per_tick["kv_cache"] > out[8].bytes_read_per_tick["kv_cache"]
  assert out[1].decode_tokens_per_s < out[64].decode_tokens_per_s
  # The decode KV cache (whole batch, prompt + new tokens) grows the per-device memory.
  assert (out[64].memory_per_device["decode_kv_cache_bytes"]
          == 64 * out[1].memory_per_device["decode_kv_cache_bytes"])


def test_longer_generation_reads_more_kv():
  setup, plan = _l70b(8)
  short = decode_cost.predict_decode(setup, plan, 16)
  long = decode_cost.predict_decode(setup, plan, 4096)
  assert long.tpot_last_s > short.tpot_last_s and long.tpot_s > short.tpot_s


def test_new_tokens_refused_when_invalid():
  setup, plan = _l70b(8)
  with pytest.raises(Exception, match="new_tokens = 0"):
    decode_cost.predict_decode(setup, plan, 0)


def test_cli_predict_decode(capsys):
  rc = cli.main(["predict", "--preset", "llama3-70b", "--devices", "16", "--strategy",
                 "layerwise", "--tp", "4", "--decode", "--new-tokens", "64", "--json"])
  out, _ = capsys.readouterr()
  assert rc == 0
  d = json.loads(out)["decode"]
  assert d["new_tokens"] == 64 and d["tpot_s"] >= d["hbm_bound_s"] > 0
  rc = cli.main(["predict", "--preset", "paper", "--decode"])
  out, _ = capsys.readouterr()
  assert rc == 0 and "HBM-read bound" in out and "TTFT" in out
  rc = cli.main(["predict", "--preset", "paper", "--new-tokens", "4"])
  _, err = capsys.readouterr()
  assert rc == 2 and "--decode" in err


def test_seed_throughput_table_has_the_decode_row(tmp_path):
  res = sec4_throughput.run(common.Context(results_dir=tmp_path, measure=False, progress=False))
  text = "\n".join(res.lines)
  assert "modelled decode TPOT ms" in text and sec4_throughput.NOT_MEASURED_YET in text
  setup = common.paper()
  for name, plan in common.seed_plans(setup).items():
    d = decode_cost.predict_decode(setup, plan, sec4_throughput.DECODE_NEW_TOKENS)
    assert res.data["modelled_decode"][name]["tpot_s"] == pytest.approx(d.tpot_s)
    assert d.tpot_s > sec4_throughput.SEED_TPOT_MS[name] * 1e-3   # the seed's is 1/TPS

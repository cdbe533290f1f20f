"""serve-bench on llama-tiny (float32, context capped at 256, virtual clock): the record's keys,
the same greedy tokens per request in all three modes, compiles bounded per mode, one-line
errors for bad flags. Nothing here is timed."""

import numpy as np
import pytest

from conftest import require_devices
from jaxpart import cli, config
from jaxpart.measure import serve_bench
from jaxpart.placement import planner

MODE_KEYS = {"throughput_tok_s", "ttft_s", "itl_s", "goodput_req_s", "kv_waste", "preemptions",
             "host_gap_fraction", "itl_decode_only_p50_s", "load"}


@pytest.fixture(scope="module")
def bench():
  require_devices(16)
  seed = int(np.random.SeedSequence().entropy % 2**31)
  print(f"serve-bench seed {seed}")
  setup = config.load_setup("llama-tiny", overrides={"model.dtype": "float32",
                                                     "model.max_positions": 256})
  opts = serve_bench.ServeBenchOptions(rates=(float(np.random.default_rng(seed).uniform(2, 8)),),
                                       requests=24, seed=seed, slots=4, chunk_tokens=32,
                                       clock="virtual")
  record, outs = serve_bench.run(setup, lambda s: planner.make_plan(s, 16, "layerwise"), opts)
  return opts, record, outs


def test_record_has_every_key_for_each_mode(bench):
  opts, record, _ = bench
  assert {"load", "slo", "scenarios"} <= set(record)
  assert set(record["scenarios"]) == {"poisson", "long-prompt"}
  for doc in record["scenarios"].values():
    (modes,) = doc["rates"].values()
    assert set(modes) == {"static", "continuous", "chunked"}
    for m in modes.values():
      assert MODE_KEYS <= set(m)
      for k in ("ttft_s", "itl_s"):
        assert set(m[k]) == {"p50", "p90", "p99"} and m[k]["p50"] <= m[k]["p99"]
      assert 0 <= m["kv_waste"] < 1 and 0 <= m["host_gap_fraction"] <= 1
      assert m["requests"] == opts.requests and m["throughput_tok_s"] > 0
  assert record["slo"]["ttft_s"] > 0 and record["slo"]["itl_s"] > 0


def test_modes_give_the_same_greedy_tokens(bench):
  opts, _, outs = bench
  for sc in ("poisson", "long-prompt"):
    got = {m: {rid: c.tokens for rid, c in outs[(sc, opts.rates[0], m)].items()}
           for m in serve_bench.MODES}
    assert got["static"] == got["continuous"] == got["chunked"], sc
    assert all(len(t) > 0 for t in got["static"].values())


def test_compiles_per_mode_are_bounded(bench):
  opts, record, _ = bench
  traced = record["compiles"]["paged_step_tokens"]
  assert len(traced) == len(set(traced))                   # no shape compiled twice
  chunked = [t for t in traced if t == opts.slots + opts.chunk_tokens]
  assert len(chunked) == 1 and len(traced) - 1 <= 4        # continuous: decode + 3 buckets


@pytest.mark.parametrize("flag, value, needle", [
    ("--rates", "0", "--rates = '0'"), ("--rates", "1,x", "--rates = '1,x'"),
    ("--requests", "0", "--requests = 0"), ("--slots", "-1", "--slots = -1"),
    ("--kv-blocks", "3", "--kv-blocks = 3"), ("--slo-itl-s", "0", "--slo-itl-s = 0.0")])
def test_bad_flags_are_one_line(capsys, flag, value, needle):
  rc = cli.main(["serve-bench", "--preset", "llama-tiny", flag, value])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and "error:" in err[0] and needle in err[0], err

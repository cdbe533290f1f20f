"""`jaxpart bench`: the figures it prints follow from its measurements, and bad input fails."""

import json

import jax.numpy as jnp
import pytest

from conftest import require_devices
from jaxpart import cli, config
from jaxpart.measure import bench
from jaxpart.cost import counts
from jaxpart.placement import planner


def _bench(tmp_path, *extra):
  out = tmp_path / "bench.json"
  rc = cli.main(["bench", "--preset", "tiny", "--devices", "4", "--repeats", "2",
                 "--warmup", "0", "--json", str(out), *extra])
  return rc, json.loads(out.read_text()) if out.exists() else None


def test_bench_layerwise_figures(tmp_path, capsys):
  require_devices(4)
  rc, res = _bench(tmp_path, "--strategy", "layerwise", "--chunk-tokens", "32",
                   "--memory-seqs", "100")
  assert rc == 0
  names = [v["name"] for v in res["variants"]]
  assert names == ["engine:layerwise", "own-steps", "reference", "gspmd-tp"]
  tokens = res["run"]["batch"] * res["run"]["seq"]
  for v in res["variants"]:
    assert len(v["runs_s"]) == 2
    assert v["median_s"] == pytest.approx(sum(v["runs_s"]) / 2)
    assert v["tokens_per_s"] == pytest.approx(tokens / v["median_s"])
    assert v["time_per_token_s"] == pytest.approx(1 / v["tokens_per_s"])
    assert v["achieved_flops_per_s"] == pytest.approx(v["model_flops"] / v["median_s"])
    assert v["temp_bytes"] > 0 and v["argument_bytes"] > 0
    # the benchmarked programs compute the model: bf16 rounding only (own-steps does not: its
    # tensor shards are never summed)
    if v["name"] != "own-steps":
      assert v["max_abs_err_vs_reference"] < 0.25
  eng, own, ref, gspmd = res["variants"]
  assert eng["devices"] == 4 and ref["devices"] == 1 and gspmd["devices"] == 4
  assert sum(ref["collective_bytes"].values()) == 0
  assert gspmd["collective_bytes"]["all-reduce"] > 0
  s = config.load_setup("tiny")
  plan = planner.make_plan(s, 4, "layerwise", chunk_tokens=32)
  want = counts.collective_bytes(s.model, plan, 2)["executed"]["collective-permute"]
  assert eng["collective_bytes"]["collective-permute"] >= want > 0
  # compiled matmul FLOPs of 4 devices cover the model's useful FLOPs (padding and masked
  # attention blocks add, nothing is missing)
  assert eng["compiled_flops_per_device"] * 4 >= 0.99 * eng["model_flops"]
  assert res["ratios"]["engine/reference"] == pytest.approx(eng["median_s"] / ref["median_s"])
  assert res["ratios"]["engine/gspmd"] == pytest.approx(eng["median_s"] / gspmd["median_s"])
  assert res["ratios"]["engine/own-steps"] == pytest.approx(eng["median_s"] / own["median_s"])
  (mem,) = res["memory_by_seq"]
  assert mem["seq"] == 100 and mem["step_temp_bytes"] > 0 and mem["forward_temp_bytes"] > 0
  printed = capsys.readouterr().out
  assert "engine/reference" in printed and "predicted WS" in printed


def test_bench_own_steps_does_the_engines_local_work(capsys):
  """own-steps: every (stage, tensor shard) step of every unit on one device, no collectives;
  with tp 2 its matmul FLOPs are the reference's (the same total work, nothing summed)."""
  require_devices(4)
  rc = cli.main(["bench", "--preset", "tiny", "--devices", "4", "--strategy", "baseline",
                 "--tp", "2", "--pp", "2", "--repeats", "1", "--warmup", "0", "--no-gspmd",
                 "--json"])
  assert rc == 0
  res = json.loads(capsys.readouterr().out)
  eng, own, ref = res["variants"]
  assert own["name"] == "own-steps" and own["devices"] == 1
  plan = res["plan"]
  assert own["steps"] == plan["derived"]["units"] * plan["stages"] * plan["tp"]
  assert sum(own["collective_bytes"].values()) == 0
  assert own["compiled_flops_per_device"] == pytest.approx(ref["compiled_flops_per_device"])
  assert own["max_abs_err_vs_reference"] is None
  for key in ("engine/own-steps", "engine/own-steps (cpu)", "own-steps/reference"):
    assert res["ratios"][key] > 0
  assert res["ratios"]["engine/own-steps (cpu)"] == pytest.approx(
      eng["cpu_median_s"] / own["cpu_median_s"])


def test_bench_baseline_and_stdout_json(capsys):
  require_devices(4)
  rc = cli.main(["bench", "--preset", "tiny", "--devices", "4", "--strategy", "baseline",
                 "--tp", "2", "--pp", "2", "--repeats", "1", "--warmup", "0", "--no-gspmd",
                 "--no-own-steps", "--json"])
  assert rc == 0
  res = json.loads(capsys.readouterr().out)
  assert [v["name"] for v in res["variants"]] == ["engine:baseline", "reference"]
  assert res["plan"]["stages"] == 2 and res["plan"]["tp"] == 2
  assert res["variants"][0]["collective_bytes"]["all-reduce"] > 0


@pytest.mark.parametrize("argv,message", [
    (["--repeats", "0"], "--repeats = 0"),
    (["--devices", "3"], "devices = 3"),
    (["--strategy", "baseline", "--tp", "3", "--pp", "2"], "tp = 3"),
    (["--memory-seqs", "256,x"], "--memory-seqs = '256,x'"),
    (["--memory-only"], "--memory-only needs --memory-seqs"),
])
def test_bench_bad_input(argv, message, capsys):
  rc = cli.main(["bench", "--preset", "tiny", *argv])
  assert rc == 2
  assert message in capsys.readouterr().err


def test_bench_sweep_writes_one_line_per_point(tmp_path):
  require_devices(4)
  out = tmp_path / "sweep.jsonl"
  rc = cli.main(["bench", "--preset", "tiny", "--strategy", "layerwise", "--sweep",
                 "--device-counts", "1,4", "--chunks", "50,100", "--repeats", "1",
                 "--warmup", "0", "--jsonl", str(out)])
  assert rc == 0
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [(l["devices"], l["chunk_tokens"]) for l in lines] == [(1, 50), (1, 100), (4, 50),
                                                                (4, 100)]
  for l in lines:
    assert l["tokens_per_s"] > 0 and "engine/reference" in l["ratios"]
    assert l["units"] == -(-100 // l["chunk_tokens"])


# --- timing ----------------------------------------------------------------------------------

def test_time_interleaved_order_and_median():
  calls = []
  fns = {n: (lambda n=n: calls.append(n) or jnp.zeros(())) for n in "abc"}
  out = bench.time_interleaved(fns, repeats=3, warmup=1)
  assert calls == list("abc") + list("abc") + list("bca") + list("cab")
  for n in "abc":
    assert len(out[n]["runs"]) == 3
    assert out[n]["median_s"] == sorted(out[n]["runs"])[1]
  with pytest.raises(ValueError, match="repeats = 0"):
    bench.time_interleaved(fns, repeats=0, warmup=0)

"""Measured autotuning: the rank correlation by hand, and `plan --strategy auto --measure`."""

import json
import math
import os

import pytest

from conftest import require_devices
from jaxpart import cli, config
from jaxpart.measure import autotune
from jaxpart.cost import params as costparams


def test_ranks_average_ties():
  assert autotune.ranks([10, 30, 20, 20]) == [1, 4, 2.5, 2.5]
  assert autotune.ranks([5, 5, 5]) == [2, 2, 2]


def test_spearman_against_a_hand_computed_example():
  # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4], both of mean 2.5: deviations [-1.5, 0, 0, 1.5]
  # and [-1.5, .5, -.5, 1.5]; covariance 4.5, variances 4.5 and 5: 4.5 / sqrt(22.5) = 3/sqrt(10)
  assert autotune.spearman([1, 2, 2, 4], [10, 30, 20, 40]) == pytest.approx(3 / math.sqrt(10))
  assert autotune.spearman([1, 2, 3], [0.1, 5, 7]) == pytest.approx(1.0)
  assert autotune.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  # without ties it is 1 - 6 sum d^2 / (n (n^2 - 1)): d = [1, -1, 0, 0] -> 1 - 12/60 = 0.8
  assert autotune.spearman([1, 2, 3, 4], [2, 1, 3, 4]) == pytest.approx(0.8)
  assert math.isnan(autotune.spearman([1, 1, 1], [1, 2, 3]))
  assert math.isnan(autotune.spearman([1], [2]))
  with pytest.raises(ValueError, match="3 values against 2"):
    autotune.spearman([1, 2, 3], [1, 2])


def test_plan_auto_measure_json(capsys):
  require_devices(4)
  rc = cli.main(["plan", "--preset", "tiny", "--devices", "4", "--strategy", "auto",
                 "--measure", "--top", "3", "--repeats", "1", "--warmup", "0", "--json"])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  cands = out["candidates"]
  assert len(cands) == 3
  for c in cands:
    assert c["predicted_s"] > 0 and c["measured_s"] > 0 and c["measured_cpu_s"] > 0
    assert c["max_abs_err_vs_reference"] < 0.25     # bf16 rounding: each computes the model
  assert [c["predicted_s"] for c in cands] == sorted(c["predicted_s"] for c in cands)
  assert out["spearman"] is None or -1 <= out["spearman"] <= 1
  assert out["reference_s"] > 0
  best = cands[out["best"]]
  assert best["measured_s"] == min(c["measured_s"] for c in cands)
  assert out["plan"] == best["plan"]
  assert out["model_agreed"] == (out["best"] == 0)
  assert set(out["load"]) >= {"before", "after", "under_load", "note"}


def test_plan_measure_prints_the_comparison(capsys):
  require_devices(4)
  rc = cli.main(["plan", "--preset", "tiny", "--devices", "4", "--strategy", "auto",
                 "--measure", "--top", "2", "--repeats", "1", "--warmup", "0"])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "Spearman rank correlation" in printed and "measured best: #" in printed
  assert "the cost model agreed" in printed or "the cost model disagreed" in printed


@pytest.mark.parametrize("argv,message", [
    (["--strategy", "layerwise", "--measure"], "--measure applies to --strategy auto only"),
    (["--strategy", "auto", "--repeats", "3"], "--repeats does not apply without --measure"),
    (["--strategy", "auto", "--measure", "--top", "1"], "--top = 1: measuring needs at least 2"),
    (["--strategy", "auto", "--measure", "--devices", "64"], "only 16 devices are present"),
])
def test_plan_measure_refusals(argv, message, capsys):
  rc = cli.main(["plan", "--preset", "tiny", *argv])
  assert rc == 2
  assert message in capsys.readouterr().err


# --- calibrate -------------------------------------------------------------------------------

def test_calibrate_writes_a_hardware_toml_that_config_loads(tmp_path, capsys):
  out = tmp_path / "hw.toml"
  rc = cli.main(["calibrate", "--out", str(out), "--sizes", "16,32", "--copy-mb", "0.1",
                 "--dtype", "float32", "--repeats", "1", "--json"])
  assert rc == 0
  res = json.loads(capsys.readouterr().out)
  assert [g["m"] for g in res["gemm"]] == [16] * 5 + [32] * 5
  assert all(g["median_s"] > 0 for g in res["gemm"] + res["attention"])
  hw = res["hardware"]
  fit = res["gemm_fit"]
  assert hw["peak_flops"] == pytest.approx(fit["flops_per_s"] / costparams.DEFAULT.gemm_fraction)
  assert min(hw["gemm_call_s"], hw["gemm_element_s"], hw["score_element_s"]) >= 0
  assert res["base"] == "cpu" and hw["host_cores"] == len(os.sched_getaffinity(0))
  setup = config.load_setup("tiny", config_file=str(out))
  for name, value in hw.items():                 # every measured field lands in the file
    assert getattr(setup.hardware, name) == pytest.approx(value, rel=1e-5), name
  assert setup.hardware.hbm_bytes == config.HARDWARE_PRESETS["cpu"].hbm_bytes
  assert cli.main(["predict", "--preset", "tiny", "--config", str(out), "--devices", "4",
                   "--json"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "16,x"], "--sizes = '16,x'"),
    (["--copy-mb", "0"], "--copy-mb = 0"),
    (["--hardware", "tpu"], "--hardware = 'tpu'"),
])
def test_calibrate_refusals(tmp_path, argv, message, capsys):
  rc = cli.main(["calibrate", "--out", str(tmp_path / "hw.toml"), "--repeats", "1", *argv])
  assert rc == 2
  assert message in capsys.readouterr().err

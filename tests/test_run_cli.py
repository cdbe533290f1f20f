"""`jaxpart info`, `run` and `compare` end to end, through the same entry point users call."""

import json

import numpy as np
import pytest

from conftest import require_devices
from jaxpart import cli, config
from jaxpart.models import dense as model
from jaxpart.runtime import runs
from jaxpart.commands import compare


def _json(capsys, argv):
  rc = cli.main(argv)
  out = capsys.readouterr().out
  return rc, json.loads(out)


def test_info_reports_paper_counts(capsys):
  rc, out = _json(capsys, ["info", "--preset", "paper", "--json"])
  assert rc == 0
  assert out["params"]["projection_params"] == 3_221_225_472
  assert out["params"]["projection_params_per_layer"] == 805_306_368


def test_bad_preset_exits_2(capsys):
  assert cli.main(["info", "--preset", "huge"]) == 2
  assert "valid presets are" in capsys.readouterr().err


def test_run_check_and_dump(capsys, tmp_path):
  require_devices(16)
  dump = tmp_path / "fwd.npz"
  rc, out = _json(capsys, ["run", "--preset", "tiny", "--devices", "16", "--strategy",
                           "layerwise", "--chunk-tokens", "16", "--check", "--f32",
                           "--repeats", "1", "--seed", "5", "--dump", str(dump), "--json"])
  assert rc == 0 and out["check"]["ok"] and out["check"]["max_rel_err"] < 1e-5
  assert out["plan"]["stages"] == 4 and out["plan"]["tp"] == 4
  # The dump is enough to re-run the forward with nothing but numpy and the reference.
  d = np.load(dump)
  cfg = config.ModelConfig(**json.loads(str(d["model_json"])))
  params = {}
  for name in d.files:
    if name.startswith("param/"):
      group, leaf = name.split("/")[1:]
      params.setdefault(group, {})[leaf] = d[name]
  assert set(params) == {"ln1", "attn", "ln2", "mlp"}
  y = np.asarray(model.forward(params, d["input"], cfg))
  np.testing.assert_allclose(y, d["output"], rtol=0, atol=1e-5 * np.abs(y).max())
  assert json.loads(str(d["plan_json"]))["strategy"] == "layerwise"


def test_compare_json(capsys):
  require_devices(16)
  rc, out = _json(capsys, ["compare", "--preset", "tiny", "--chunk-tokens", "16",
                           "--repeats", "1", "--json"])
  assert rc == 0
  res = out["results"]
  assert res["baseline"]["plan"]["stages"] == 2 and res["baseline"]["plan"]["tp"] == 8
  assert res["layerwise"]["plan"]["stages"] == 4 and res["layerwise"]["plan"]["tp"] == 4
  for name in ("baseline", "layerwise"):
    assert res[name]["ok"] and res[name]["float32"]["max_rel_err"] <= runs.F32_REL_TOL
    assert res[name]["tokens_per_s"] > 0
  assert out["ratios"]["layerwise_over_baseline_throughput"] > 0
  # One float32 bound for compare and `run --check`, printed from the constant.
  assert out["float32_tolerance_rel"] == runs.F32_REL_TOL
  compare._print(config.load_setup("tiny"), out)
  assert f"float32 tolerance {runs.F32_REL_TOL:g} rel" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["run", "--preset", "tiny", "--devices", "16", "--strategy", "baseline", "--tp", "3",
      "--pp", "2"], "valid (tp, pp)"),
    (["run", "--preset", "tiny", "--repeats", "0"], "--repeats = 0"),
])
def test_run_bad_input(capsys, argv, needle):
  assert cli.main(argv) == 2
  assert needle in capsys.readouterr().err

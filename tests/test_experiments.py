"""The experiments: they run, write labelled tables and JSON, and the verdict reads them.

Model-only runs (ctx.measure=False) are fast; the measured paths are exercised on the tiny
preset here and on the paper preset by `jaxpart experiments` itself.
"""

import json
import sys
from pathlib import Path

import pytest

from conftest import require_devices

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is not installed

from experiments import common, measured, runner  # noqa: E402
from jaxpart import cli, config  # noqa: E402
from jaxpart.placement import planner  # noqa: E402
from jaxpart.cost import forward as costmodel
from jaxpart.cost import counts

MODEL_ONLY = ["sec2_memory", "sec3_partitioning", "sec3_cache", "sec4_throughput",
              "sec5_communication", "sec6_cache_hit", "sec7_scaling", "sec8_correctness",
              "chunk_sweep", "causes", "plots", "verdict"]


@pytest.fixture(scope="module")
def model_only(tmp_path_factory):
  out = tmp_path_factory.mktemp("results")
  ctx = common.Context(results_dir=out, measure=False, progress=False)
  done = runner.run(MODEL_ONLY, ctx)
  return out, done


def test_every_section_is_run_and_written(model_only):
  out, done = model_only
  assert [d["name"] for d in done] == list(runner.SECTIONS)
  for name in runner.SECTIONS:
    stem = "VERDICT" if name == "verdict" else name
    md = (out / f"{stem}.md").read_text()
    data = json.loads((out / f"{stem}.json").read_text())
    assert data["name"] == name
    assert md.startswith("# ") and f"--only {name}" in md
  # Each table that reports figures says whose figure it is.
  for name in ("sec4_throughput", "sec6_cache_hit", "sec3_cache", "sec5_communication"):
    md = (out / f"{name}.md").read_text()
    assert common.SEED in md and common.MODEL in md


def test_throughput_table_is_the_model(model_only):
  out, _ = model_only
  data = json.loads((out / "sec4_throughput.json").read_text())
  setup = common.paper()
  plans = common.seed_plans(setup)
  for name, plan in plans.items():
    p = costmodel.predict(setup, plan)
    assert data["modelled"][name]["tokens_per_s"] == pytest.approx(p.tokens_per_s)
    assert data["modelled"][name]["seed_time_per_token_ms"] == pytest.approx(
        1e3 / p.tokens_per_s)
  assert data["seed"]["tps"] == {"baseline": 12800, "layerwise": 15360}
  # 12,800 tok/s x ~6.8 GFLOP per token against 16 x 989 TFLOP/s: about half a percent.
  assert 0.004 < data["seed_12800_fraction_of_peak"] < 0.007
  assert data["measured_cpu"] is None


def test_chunk_sweep_marks_l2_and_ridge(model_only):
  out, _ = model_only
  data = json.loads((out / "chunk_sweep.json").read_text())
  for hw, ridge in (("h100", 295), ("h200", 206)):
    pts = data["sweeps"][hw]
    th = data["sweeps"][hw + "_thresholds"]
    assert th["ridge_flop_per_byte"] == pytest.approx(ridge, rel=0.01)
    first = next(p for p in pts if p["chunk_tokens"] == th["first_chunk_past_ridge"])
    assert first["intensity"] >= ridge
    assert all(p["intensity"] < ridge for p in pts if p["chunk_tokens"] < first["chunk_tokens"])
    fits = [p["chunk_tokens"] for p in pts if p["fits_l2"]]
    assert fits and max(fits) < th["first_chunk_overflowing_l2"]
    # Below the ridge, time per token falls as the chunk grows (weights amortised).
    below = [p["us_per_token_no_allreduce"] for p in pts if not p["past_ridge"]]
    assert below == sorted(below, reverse=True)
  assert data["gpu_h200"] == []


def test_causes_switch_each_effect_off_alone(model_only):
  out, _ = model_only
  cfgs = json.loads((out / "causes.json").read_text())["configs"]
  assert set(cfgs) == {"A", "B", "B'", "C", "D"}
  assert (cfgs["A"]["plan"]["tp"], cfgs["A"]["plan"]["stages"]) == (8, 2)
  assert (cfgs["D"]["plan"]["tp"], cfgs["D"]["plan"]["stages"]) == (4, 4)
  for c in cfgs.values():
    # Taking the L2 away or making links free can only help or cost nothing.
    assert c["tokens_per_s_without_l2"] <= c["tokens_per_s"] * (1 + 1e-12)
    assert c["tokens_per_s_free_links"] >= c["tokens_per_s"] * (1 - 1e-12)


def test_verdict_covers_every_claim(model_only):
  out, _ = model_only
  text = (out / "VERDICT.md").read_text()
  for claim in ("+20% throughput", "L2 hit rate", "linear strong scaling", "bit-exact",
                "-16.7% energy", "30B parameters", "12 MB activation chunk", "12,800 tok/s",
                "39.06 GB"):
    assert claim in text, claim
  assert common.MODEL in text and common.CPU in text


def test_verdict_refuses_without_inputs(tmp_path):
  ctx = common.Context(results_dir=tmp_path, measure=False, progress=False)
  with pytest.raises(RuntimeError, match="verdict needs .*sec2_memory.json"):
    runner.run(["verdict"], ctx)


def test_unknown_experiment_is_an_error(capfd):
  """`jaxpart experiments` runs `python -m experiments` as a child: read its file descriptors."""
  with pytest.raises(runner.UnknownExperiment, match="valid names are sec2_memory"):
    runner.select(["nope"])
  assert cli.main(["experiments", "--only", "nope", "--no-progress"]) == 2
  assert "unknown experiment" in capfd.readouterr().err
  assert cli.main(["experiments", "--list"]) == 0
  assert capfd.readouterr().out.split() == list(runner.SECTIONS)


def test_compiled_engine_figures_match_the_model():
  """The measured path the experiments use, on the tiny preset (compile only)."""
  require_devices(16)
  setup = config.load_setup("tiny")     # bf16: CPU XLA promotes its collectives to f32
  plan = planner.make_plan(setup, 16, "layerwise", chunk_tokens=32)
  m = measured.compile_engine(setup, plan)
  # all-reduces promoted to f32 by CPU XLA; sends and gathers as the model's 2-byte bits
  assert m["collective_element_bytes"] == {"all-reduce": 4, "collective-permute": 2,
                                           "all-gather": 2, "reduce-scatter": 0, "all-to-all": 0}
  for kind in ("all-reduce", "collective-permute", "all-gather"):
    model = counts.collective_bytes(setup.model, plan,
                                       element_bytes=m["collective_element_bytes"][kind])
    assert m["collective_loop_executed"][kind] == pytest.approx(model["executed"][kind],
                                                                rel=0.05)
  assert m["flops_executed"] == pytest.approx(counts.plan_flops(setup.model, plan)["executed"],
                                              rel=0.05)


def test_verdict_caveats_come_from_the_code(model_only):
  """The memory and attention caveats are the planner's and the cost model's figures, not prose
  that outlives them (issue 23: 'input replicated, about 85 GB', 'visits every KV block')."""
  from jaxpart.cost import counts
  from jaxpart.placement import memory
  out, _ = model_only
  text = (out / "VERDICT.md").read_text()
  caveats = text[text.index("## Caveats"):]
  setup = common.paper()
  fits = True
  for name, plan in common.seed_plans(setup).items():
    total = memory.predicted_hbm_bytes(setup.model, setup.run, plan)
    fits &= total <= setup.hardware.hbm_bytes
    assert f"{name} {common.gb(total)} modelled" in caveats
    # Visited (tile, block) pairs summed tile by tile, against the closed form the text uses.
    visited = sum(int(counts.tile_visits(plan, k).sum()) for k in range(plan.n_chunks))
    assert f"{name} {visited:,} of " in caveats
  assert ("within the 80 GB" if fits else "more than the 80 GB") in caveats
  assert "replicated" not in caveats and "every block for every query" not in caveats


def test_results_name_paths_relative_to_the_repository():
  from experiments import chunk_sweep
  _, note = chunk_sweep.gpu_points(common.Context(progress=False))
  assert "experiments/results" in note and str(common.REPO) not in note
  assert common.repo_path(common.REPO / "a" / "b.json") == "a/b.json"
  assert common.repo_path("/elsewhere/x") == "/elsewhere/x"


def test_cpu_ratio_text_gives_the_spread_and_says_machine_dependent():
  cpu = {"ratio_layerwise_over_baseline_tps": 0.84, "ratio_per_round": [0.9, 0.82, 0.84],
         "load": {"before": {"cores": 2}}}
  text = common.cpu_ratio_text(cpu)
  assert text.startswith("-16% median, -18% to -10% over its 3 interleaved rounds")
  assert "machine-dependent (2 shared cores here)" in text

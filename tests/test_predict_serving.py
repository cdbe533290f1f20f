"""predict --serving and the serving KV pool in plan/memory (issue 24's cost-model part)."""

import dataclasses
import json

import numpy as np
import pytest

from jaxpart import cli, config
from jaxpart.errors import UserError
from jaxpart.cost import forward as costmodel
from jaxpart.cost import published_gpu
from jaxpart.cost.serving_step import StepCost
from jaxpart.placement import memory, planner
from jaxpart.placement.kv_blocks import serving_step_plan
from jaxpart.serving import serve_model, simulate, workload

# One H200 holds llama3-8b with room to spare; a short context keeps every stream small.
SEQ = 1024


def _setup(preset="llama3-8b", hardware="h200", seq=SEQ):
  return config.load_setup(preset=preset, hardware=hardware,
                           overrides=config.parse_overrides([f"run.seq={seq}"]))


def _plan(setup, devices=1, strategy="baseline", tp=1):
  return planner.make_plan(setup, devices, strategy, tp=tp if strategy == "baseline" else None,
                           pp=None, scorer=costmodel.SCORER)


def _opts(setup, mode, kv_blocks, slots=16, chunk=128):
  return simulate.SimOptions(slots, chunk, setup.run.seq, mode, kv_blocks, 16)


@pytest.mark.parametrize("argv", [
    ["--preset", "llama3-8b", "--hardware", "h100", "--strategy", "layerwise"],
    ["--preset", "llama-tiny", "--hardware", "cpu", "--devices", "4", "--strategy", "baseline",
     "--tp", "2", "--pp", "2"],
])
@pytest.mark.parametrize("command", ["plan", "memory"])
def test_pool_is_memory_left_over_kv_bytes_per_token_in_whole_blocks(capsys, argv, command):
  assert cli.main([command, *argv, "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  pool = out["kv_pool"]
  preset = argv[1]
  setup = config.load_setup(preset=preset, hardware=argv[3])
  cfg, p = setup.model, out["plan"]
  lps = len(p["stage_layers"][0])
  per_token = 2 * lps * (cfg.n_kv_heads // p["tp"]) * cfg.head_dim * cfg.dtype_bytes
  assert pool["kv_bytes_per_token"] == per_token
  held = sum(pool["held_bytes"].values())
  assert held > pool["held_bytes"]["weights"] > 0
  assert pool["bytes_left"] == setup.hardware.hbm_bytes - held
  assert pool["blocks"] == int(pool["bytes_left"] // (per_token * 16)) > 0
  assert pool["tokens"] == 16 * pool["blocks"]
  assert pool["context_sequences"] == pool["blocks"] // -(-setup.run.seq // 16)
  assert cli.main([command, *argv]) == 0
  text = capsys.readouterr().out
  assert f"{pool['tokens']:,} tokens" in text and f"{pool['context_sequences']:,} sequences" in text


def test_every_request_finishes_even_when_the_pool_forces_preemptions():
  setup = _setup()
  cost = StepCost(setup, _plan(setup))
  reqs = workload.make("poisson", 60, 50.0, SEQ, setup.model.vocab, seed=3)
  for mode in ("chunked", "continuous"):
    sim = simulate.run(cost, reqs, _opts(setup, mode, kv_blocks=SEQ // 16 + 8))
    assert sim["preemptions"] > 0, mode
    assert set(sim["outputs"]) == {r.id for r in reqs}
    # every request got exactly its max_tokens tokens, stamped in order
    for r in reqs:
      ts = sim["token_times"][r.id]
      assert len(ts) >= r.params.max_tokens and np.all(np.diff(ts) > 0) and ts[0] > r.arrival_s


def test_ttft_grows_with_rate_and_a_lone_request_pays_one_prefill():
  setup = _setup()
  cost = StepCost(setup, _plan(setup))
  opts = serve_model.ServeModelOptions(slots=16, chunk_tokens=128, modes=("chunked",),
                                       requests=60)
  pred = serve_model.predict_serving(setup, _plan(setup), (0.01, 5.0, 60.0), opts)
  ttft = [pred["rates"][r]["chunked"]["ttft_s"]["mean"] for r in ("0.01", "5", "60")]
  assert ttft[0] < ttft[1] < ttft[2]
  # At 0.01 req/s nobody queues: each TTFT is its own prompt's prefill steps alone.
  reqs = workload.make("poisson", 20, 0.01, SEQ, setup.model.vocab, seed=0)
  sim = simulate.run(cost, reqs, _opts(setup, "chunked", 10_000, chunk=128))
  quiet = [r for r in reqs if all(sim["token_times"][q.id][-1] < r.arrival_s
                                  for q in reqs if q.arrival_s < r.arrival_s)]
  assert len(quiet) >= 15    # at this rate nearly every request finds the engine idle
  for r in quiet:
    alone = simulate.run(cost, [dataclasses.replace(r, arrival_s=0.0)],
                         _opts(setup, "chunked", 10_000, chunk=128))
    got = sim["token_times"][r.id][0] - r.arrival_s
    assert got == pytest.approx(alone["token_times"][r.id][0], rel=1e-9)
  r0 = next(r for r in quiet if len(r.prompt) <= 128)   # one step of the S + C = 144 shape
  p = len(r0.prompt)
  assert sim["token_times"][r0.id][0] - r0.arrival_s == pytest.approx(
      cost.seconds(((p, p), (128 + 16 - p, 0)), (), 16))


def test_chunked_itl_tail_beats_whole_prompt_steps_on_long_prompts():
  setup = _setup(seq=2048)
  opts = serve_model.ServeModelOptions(slots=16, chunk_tokens=256, requests=40,
                                       scenario="long-prompt")
  pred = serve_model.predict_serving(setup, _plan(setup), (8.0,), opts)
  m = pred["rates"]["8"]
  assert m["chunked"]["itl_s"]["p99"] <= m["continuous"]["itl_s"]["p99"]
  # the stall: continuous's tail is several of its own decode steps
  assert m["continuous"]["itl_s"]["p99"] > 3 * m["continuous"]["itl_s"]["p50"]


def test_refusals_are_one_line(capsys):
  base = ["predict", "--serving", "--preset", "llama3-8b", "--hardware", "h200", "--devices",
          "1", "--strategy", "baseline", "--tp", "1", "--set", f"run.seq={SEQ}"]
  for extra, needle in ((["--rate", "0"], "--rate = 0.0"), (["--rates", "1,-2"], "--rate = -2"),
                        ([], "needs --rate"), (["--rate", "1", "--kv-blocks", "3"],
                                               "--kv-blocks = 3"),
                        (["--rate", "1", "--mode", "static"], "--mode")):
    assert cli.main(base + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxpart predict: error:") and needle in err[0], err
  # the planner's own pool too small for one sequence: weights and step buffers leave 1 MB
  setup = _setup()
  plan = _plan(setup)
  opts = serve_model.ServeModelOptions(slots=16, chunk_tokens=128)
  held = sum(serve_model.pool_for(setup, plan, opts, "chunked")["held_bytes"].values())
  small = dataclasses.replace(setup, hardware=dataclasses.replace(setup.hardware,
                                                                   hbm_bytes=held + 1e6))
  with pytest.raises(UserError, match="KV pool the planner leaves .* cannot hold one sequence"):
    serve_model.pool_for(small, plan, opts, "chunked")
  assert cli.main(["predict", "--preset", "paper", "--rate", "1"]) == 2
  assert "--serving only" in capsys.readouterr().err


def test_json_keys(capsys):
  assert cli.main(["predict", "--serving", "--preset", "llama3-8b", "--hardware", "h200",
                   "--devices", "1", "--strategy", "baseline", "--tp", "1", "--set",
                   f"run.seq={SEQ}", "--rates", "1,4", "--requests", "20", "--json"]) == 0
  d = json.loads(capsys.readouterr().out)
  assert {"plan", "pool", "unloaded", "slo", "rates", "options", "context"} <= set(d)
  assert set(d["rates"]) == {"1", "4"} and set(d["rates"]["1"]) == {"chunked", "continuous"}
  m = d["rates"]["4"]["chunked"]
  assert {"ttft_s", "itl_s", "throughput_tok_s", "goodput_req_s", "preemptions"} <= set(m)
  assert set(m["itl_s"]) == {"p50", "p90", "p99", "mean"} and m["finished"] == 20
  assert d["slo"]["ttft_s"] == pytest.approx(5 * d["unloaded"]["ttft_s"])


def test_published_rows_print_prediction_beside_figure(monkeypatch):
  rows = tuple(dataclasses.replace(r, requests=10) for r in published_gpu.ROWS
               if r.preset == "llama3-8b")
  monkeypatch.setattr(published_gpu, "ROWS", rows)
  opts = serve_model.ServeModelOptions(slots=16, chunk_tokens=128, modes=("chunked",))
  pub = serve_model.published(opts)
  assert [r["id"] for r in pub["rows"]] == ["T5"] and {"T1", "M1"} <= set(pub["not_expressed"])
  f = pub["rows"][0]["figures"]["mean_itl_s"]
  assert f["published"] == 0.008 and f["ratio"] == pytest.approx(f["predicted"] / 0.008)


def test_step_cost_grows_with_tokens_and_keys():
  setup = _setup()
  cost = StepCost(setup, _plan(setup))
  assert cost.seconds((), (100,) * 8, 8) < cost.seconds((), (900,) * 8, 8)
  assert cost.seconds(((64, 64),), (), 1) < cost.seconds(((512, 512),), (), 1)
  step = serving_step_plan(_plan(setup), 576)
  assert memory.program_bytes(setup.model, setup.run, step)["step_and_pipeline_buffers"] > 0


def test_compare_placements_names_the_better_by_its_own_figures(capsys):
  assert cli.main(["predict", "--serving", "--preset", "llama3-8b", "--hardware", "h100",
                   "--compare-placements", "--set", f"run.seq={SEQ}", "--rates", "2",
                   "--requests", "20", "--mode", "chunked", "--json"]) == 0
  d = json.loads(capsys.readouterr().out)
  assert {d["why"][n]["stages"] for n in ("baseline", "layerwise")} == {2, 16}
  for v in d["verdicts"]:
    f = v["figures"]
    assert v["better"]["itl_p99"] == min(f, key=lambda n: f[n]["itl_p99_s"])
    assert v["better"]["ttft_p99"] == min(f, key=lambda n: f[n]["ttft_p99_s"])
  # both held to the same SLOs (the baseline's)
  preds = d["predictions"]
  assert preds["layerwise"]["slo"] == preds["baseline"]["slo"] == d["slo"]

"""The partitioning algorithm: device counts, chunk fitting, refusals, the Plan's JSON, the CLI."""

import dataclasses
import json

import pytest

from jaxpart import cli, config
from jaxpart.cost import forward as costmodel
from jaxpart.placement import memory
from jaxpart.placement import planner
from jaxpart.placement.plan import Plan, PlanError

FOUR_LAYER = ("tiny", "small", "paper")
# devices -> (stages, tp) for a 4-layer model: fewer devices than layers stack layers on a
# stage; more put a tensor-parallel group inside each one-layer stage.
LAYERWISE_GRID = {1: (1, 1), 2: (2, 1), 4: (4, 1), 8: (4, 2), 16: (4, 4)}


def _setup(preset, **over):
  return config.load_setup(preset, overrides=over)


@pytest.mark.parametrize("preset", FOUR_LAYER)
@pytest.mark.parametrize("devices", sorted(LAYERWISE_GRID))
def test_layerwise_device_counts(preset, devices):
  setup = _setup(preset)
  plan = planner.plan_layerwise(setup, devices)  # the grid; memory is checked below
  stages, tp = LAYERWISE_GRID[devices]
  assert (plan.stages, plan.tp, plan.mesh_shape) == (stages, tp, (stages, tp))
  per = 4 // stages
  assert plan.stage_layers == tuple(tuple(range(s * per, (s + 1) * per)) for s in range(stages))
  assert plan.layer_to_stage == tuple(i // per for i in range(4))
  assert plan.chunk_tokens >= 1 and plan.rows >= 1
  assert plan.predicted_working_set_bytes <= plan.cache_budget_bytes == 50_000_000
  assert plan.predicted_working_set_bytes == planner.working_set(
      setup.model, plan.rows, plan.chunk_tokens, plan.tp, plan.kv_block)
  # the largest that fits: one more token at the same rows would not
  if plan.chunk_tokens < plan.seq:
    assert planner.working_set(setup.model, plan.rows, plan.chunk_tokens + 1, plan.tp) > 50e6


@pytest.mark.parametrize("preset", FOUR_LAYER)
def test_seed_baseline_tp8_pp2(preset):
  plan = planner.make_plan(_setup(preset), 16, "baseline", tp=8, pp=2)
  assert (plan.stages, plan.tp) == (2, 8)
  assert plan.stage_layers == ((0, 1), (2, 3))
  assert plan.chunk_tokens == plan.seq and plan.n_chunks == 1
  assert plan.bubble_fraction == pytest.approx(1 / (plan.microbatches + 1))


def test_paper_16_layerwise_is_the_seed_placement():
  plan = planner.make_plan(_setup("paper"), 16, "layerwise")
  assert plan.stage_layers == ((0,), (1,), (2,), (3,))
  assert plan.predicted_working_set_bytes <= 50_000_000
  # 10000 is not a multiple of the chunk: the last chunk is ragged and counted
  assert plan.n_chunks == -(-10_000 // plan.chunk_tokens)
  assert plan.last_chunk_tokens == 10_000 - (plan.n_chunks - 1) * plan.chunk_tokens
  assert plan.ragged == (plan.last_chunk_tokens != plan.chunk_tokens)
  assert plan.units == plan.microbatches * plan.n_chunks
  assert plan.bubble_fraction == pytest.approx(3 / (plan.units + 3))
  # More rows of shorter chunks can hold as many token-rows, but re-read the KV prefix far more.
  cfg = _setup("paper").model
  # By hand, 1 row at tp 4 (kv_block = T): per token 5 x 32,768 (D-wide bf16) + 2 x 98,304
  # (partial sums) + 18,432 (QKV) + 4,160 (softmax state) + 2,048 (attn out) + 24,576 (MLP)
  # = 409,664; plus scores and probs 8 heads x T x 6 and a KV block 4,096 x T.
  # T=119: 48,750,016 + 679,728 + 487,424 = 49,917,168 <= 50e6;
  # T=120: 49,159,680 + 691,200 + 491,520 = 50,342,400 > 50e6.
  assert (plan.rows, plan.chunk_tokens) == (1, 119)
  assert plan.predicted_working_set_bytes == 49_917_168
  assert planner.working_set(cfg, 8, 15, 4) <= 50e6 and 8 * 15 > 119
  alt = memory.run_streamed_bytes(cfg, 128, 10_000, 8, 15, 4)
  got = memory.run_streamed_bytes(cfg, 128, 10_000, 1, 119, 4)
  assert alt["kv_prefix"] > 7 * got["kv_prefix"]
  assert sum(alt.values()) > sum(got.values())


@pytest.mark.parametrize("devices,tp", [(32, 8), (64, 16)])
def test_paper_32_and_64(devices, tp):
  plan = planner.make_plan(_setup("paper"), devices, "layerwise")
  assert (plan.stages, plan.tp) == (4, tp)
  assert plan.predicted_working_set_bytes <= 50_000_000


@pytest.mark.parametrize("preset", FOUR_LAYER)
@pytest.mark.parametrize("devices", [3, 5, 6, 12])
def test_odd_device_counts_refused_with_reason(preset, devices):
  with pytest.raises(PlanError) as e:
    planner.make_plan(_setup(preset), devices, "layerwise")
  msg = str(e.value)
  assert f"devices = {devices}" in msg and "is not divisible by tp" in msg
  assert "Device counts that plan this model layer-wise: 1, 2, 4, 8, 16, 32" in msg


def test_twelve_devices_plan_when_heads_allow():
  # 12 heads of 8 and d_ff 192: tp 3 splits them, so 12 devices give 4 stages x tp 3.
  setup = _setup("tiny", **{"model.n_heads": 12, "model.head_dim": 8, "model.d_model": 384,
                            "model.d_ff": 384})
  plan = planner.make_plan(setup, 12, "layerwise")
  assert (plan.stages, plan.tp) == (4, 3)
  six = planner.make_plan(setup, 6, "layerwise")
  assert (six.stages, six.tp) == (2, 3)


def test_baseline_refusals_name_the_reason():
  setup = _setup("paper")
  with pytest.raises(PlanError, match=r"n_heads = 32 is not divisible by tp = 3.*valid \(tp, pp\)"):
    planner.make_plan(setup, 12, "baseline", tp=3, pp=4)
  with pytest.raises(PlanError, match=r"tp x pp = 4 x 2 = 8 != devices = 16"):
    planner.make_plan(setup, 16, "baseline", tp=4, pp=2)
  with pytest.raises(PlanError, match=r"stages = 8 exceeds layers = 4"):
    planner.make_plan(setup, 16, "baseline", tp=2, pp=8)
  with pytest.raises(PlanError, match=r"needs --tp and/or --pp.*\(16, 1\), \(8, 2\), \(4, 4\)"):
    planner.make_plan(setup, 16, "baseline")
  with pytest.raises(PlanError, match=r"microbatches = 3 must divide batch = 128"):
    planner.make_plan(setup, 16, "baseline", tp=8, pp=2, microbatches=3)
  # one of tp and pp is enough: the other is devices / it
  assert planner.make_plan(setup, 16, "baseline", pp=2).mesh_shape == (2, 8)


def test_layerwise_refusals_name_the_reason():
  setup = _setup("tiny")
  with pytest.raises(PlanError, match=r"tp = 2 on devices = 16 gives 8 stages.*Valid tp here: 4, 8"):
    planner.make_plan(setup, 16, "layerwise", tp=2)
  with pytest.raises(PlanError, match=r"--pp does not apply to strategy 'layerwise'"):
    planner.make_plan(setup, 16, "layerwise", pp=4)
  with pytest.raises(PlanError, match=r"--chunk-tokens does not apply to strategy 'baseline'"):
    planner.make_plan(setup, 16, "baseline", tp=8, pp=2, chunk_tokens=10)
  with pytest.raises(PlanError, match=r"chunk_rows = 3: must divide batch = 2"):
    planner.make_plan(setup, 16, "layerwise", chunk_rows=3)
  with pytest.raises(PlanError, match=r"chunk_tokens = 101: must be in 1..seq = 100"):
    planner.make_plan(setup, 16, "layerwise", chunk_tokens=101)
  with pytest.raises(PlanError, match=r"strategy = 'fast'"):
    planner.make_plan(setup, 16, "fast")
  with pytest.raises(PlanError, match=r"devices = 0: must be a positive integer"):
    planner.make_plan(setup, 0, "layerwise")


def test_cache_budget_too_small_is_an_error_never_a_zero_chunk():
  setup = _setup("paper")
  one = planner.working_set(setup.model, 1, 1, 4)   # 1 row x 1 token at tp 4
  with pytest.raises(PlanError, match=r"too small: even 1 row\(s\) x 1 token\(s\) needs"):
    planner.make_plan(setup, 16, "layerwise", cache_bytes=one - 1)
  plan = planner.make_plan(setup, 16, "layerwise", cache_bytes=one)
  assert (plan.rows, plan.chunk_tokens) == (1, 1)
  with pytest.raises(PlanError, match="must be positive"):
    planner.make_plan(setup, 16, "layerwise", cache_bytes=0)


def test_budget_shapes_the_chunk():
  setup = _setup("small")
  big = planner.make_plan(setup, 16, "layerwise", cache_bytes=4e6)
  small = planner.make_plan(setup, 16, "layerwise", cache_bytes=1e6)
  assert small.rows * small.chunk_tokens < big.rows * big.chunk_tokens
  for p, budget in ((big, 4e6), (small, 1e6)):
    assert p.predicted_working_set_bytes <= budget
    if p.chunk_tokens < p.seq:
      assert planner.working_set(setup.model, p.rows, p.chunk_tokens + 1, p.tp) > budget


def test_fixed_chunk_over_budget_is_kept_and_flagged():
  plan = planner.make_plan(_setup("paper"), 16, "layerwise", chunk_tokens=64, chunk_rows=128)
  assert (plan.rows, plan.chunk_tokens, plan.n_chunks, plan.last_chunk_tokens) == (128, 64, 157, 16)
  assert plan.predicted_working_set_bytes > plan.cache_budget_bytes
  assert "exceeds" in plan.reason


def test_auto_ranks_and_filters():
  setup = _setup("small")
  best, ranked, how = planner.plan_auto(setup, 16, top=50, scorer=costmodel.SCORER)
  scores = [s for s, _ in ranked]
  assert scores == sorted(scores)
  assert best == ranked[0][1] and best.reason.startswith("auto:")
  assert {p.strategy for _, p in ranked} == {"baseline", "layerwise"}
  only = planner.candidates(setup, 16, tp=8)
  assert only and {p.tp for p in only} == {8}
  with pytest.raises(PlanError, match="no \\(stages, tp\\) split works"):
    planner.candidates(setup, 16, tp=3)
  with pytest.raises(PlanError, match="--microbatches does not apply to strategy 'auto'"):
    planner.make_plan(setup, 16, "auto", microbatches=2)


def test_auto_heuristic_prefers_a_fitting_chunk():
  best, ranked, how = planner.plan_auto(_setup("paper"), 16, scorer=planner.HEURISTIC)
  assert how.startswith("heuristic")
  assert best.predicted_working_set_bytes <= best.cache_budget_bytes
  assert best.strategy == "layerwise"


# --- the Plan as data ------------------------------------------------------------------------

def _plans():
  yield planner.make_plan(_setup("paper"), 16, "layerwise")
  yield planner.make_plan(_setup("paper"), 16, "baseline", tp=8, pp=2)
  yield planner.make_plan(_setup("tiny"), 2, "layerwise", chunk_tokens=30, chunk_rows=1)


def test_plan_json_round_trip():
  for plan in _plans():
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan
    assert back.to_json() == text
    d = json.loads(text)
    assert d["derived"]["mesh_shape"] == list(plan.mesh_shape)
    assert d["derived"]["n_chunks"] == plan.n_chunks


def test_plan_json_refuses_edits_and_unknown_keys():
  plan = next(_plans())
  d = plan.to_dict()
  d["derived"]["n_chunks"] += 1
  with pytest.raises(PlanError, match="derived.n_chunks"):
    Plan.from_dict(d)
  d = plan.to_dict()
  d["chunk_size"] = 64
  with pytest.raises(PlanError, match="unknown keys \\['chunk_size'\\]"):
    Plan.from_dict(d)
  d = plan.to_dict()
  del d["tp"]
  with pytest.raises(PlanError, match="required keys"):
    Plan.from_dict(d)
  with pytest.raises(PlanError, match="stages x tp = 4 x 2 != devices = 16"):
    dataclasses.replace(plan, tp=2)
  with pytest.raises(PlanError, match="predicted_working_set_bytes = -1"):
    dataclasses.replace(plan, predicted_working_set_bytes=-1)


# --- the commands ----------------------------------------------------------------------------

def _cli(capsys, *argv):
  rc = cli.main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def test_cli_plan_json_paper_16(capsys):
  rc, out, _ = _cli(capsys, "plan", "--preset", "paper", "--devices", "16", "--strategy",
                    "layerwise", "--json")
  assert rc == 0
  d = json.loads(out)
  plan = Plan.from_dict(d["plan"])
  assert (plan.stages, plan.tp, plan.stage_layers) == (4, 4, ((0,), (1,), (2,), (3,)))
  assert d["working_set_total"] == plan.predicted_working_set_bytes <= 50_000_000
  assert set(d["working_set_terms"]) == set(memory.STEP_TERMS)


def test_cli_plan_text_baseline(capsys):
  rc, out, _ = _cli(capsys, "plan", "--preset", "paper", "--devices", "16", "--strategy",
                    "baseline", "--tp", "8", "--pp", "2")
  assert rc == 0
  assert "stage x tensor = 2 x 8" in out
  assert "stage 0: [0, 1]; stage 1: [2, 3]" in out
  assert "DOES NOT FIT" in out


def test_cli_plan_auto_lists_candidates(capsys):
  rc, out, _ = _cli(capsys, "plan", "--preset", "small", "--devices", "16", "--strategy", "auto",
                    "--top", "3", "--json")
  assert rc == 0
  d = json.loads(out)
  assert len(d["candidates"]) == 3 and d["ranking"]
  assert d["candidates"][0]["plan"] == d["plan"]


@pytest.mark.parametrize("argv,needle", [
    (["--devices", "12", "--strategy", "layerwise"], "cannot place this model layer-wise"),
    (["--devices", "16", "--strategy", "layerwise", "--cache-mb", "0.0001"], "too small"),
    (["--devices", "12", "--strategy", "baseline", "--tp", "3", "--pp", "4"],
     "n_heads = 32 is not divisible by tp = 3"),
    (["--devices", "16", "--strategy", "auto", "--chunk-tokens", "64"],
     "--chunk-tokens does not apply to strategy 'auto'"),
])
def test_cli_plan_errors_exit_2(capsys, argv, needle):
  rc, out, err = _cli(capsys, "plan", "--preset", "paper", *argv)
  assert rc == 2 and out == ""
  assert err.startswith("jaxpart plan: error: ") and needle in err


def test_cli_memory_json(capsys):
  rc, out, _ = _cli(capsys, "memory", "--preset", "paper", "--json")
  assert rc == 0
  d = json.loads(out)
  claims = {c["claim"]: c for c in d["seed_claims"]}
  assert claims["total parameters"]["verdict"] == "does not hold"
  assert claims["activation chunk"]["true"] == 268_435_456
  assert claims["full activation per layer"]["verdict"].startswith("holds")
  assert d["footprint"]["projection_params_per_layer"] == 805_306_368
  assert d["per_device"]["weights_per_device"] == 402_784_256
  assert d["plan"]["stages"] == 4 and d["plan"]["tp"] == 4


def test_cli_memory_text(capsys):
  rc, out, _ = _cli(capsys, "memory", "--preset", "paper")
  assert rc == 0
  for needle in ("does not hold", "268.44 MB (256.00 MiB)", "41.94 GB (39.06 GiB)",
                 "3,221,487,616 (3.22B)", "cache utilisation"):
    assert needle in out


def test_cli_memory_error_exit_2(capsys):
  rc, out, err = _cli(capsys, "memory", "--preset", "paper", "--devices", "5")
  assert rc == 2 and "jaxpart memory: error: devices = 5" in err

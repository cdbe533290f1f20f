"""The seed's own model at its own size, compiled for 16 devices (nothing runs, nothing is
allocated): what each device holds, against the H100's HBM and the planner's prediction."""

import pytest

from conftest import require_devices
from jaxpart import config
from jaxpart.measure import compiled as measure
from jaxpart.placement import memory
from jaxpart.placement import shards
from jaxpart.placement import planner

PAPER = config.load_setup("paper")
PLANS = {"layerwise": {}, "baseline": {"tp": 8, "pp": 2}}


@pytest.fixture(scope="module", params=sorted(PLANS))
def compiled(request):
  require_devices(16)
  plan = planner.make_plan(PAPER, 16, request.param, **PLANS[request.param])
  return plan, measure.forward_memory(PAPER, plan)


def test_paper_fits_an_h100_and_matches_the_planner(compiled):
  plan, stats = compiled
  total = stats["total_bytes"]
  assert total == (stats["argument_bytes"] + stats["output_bytes"] + stats["temp_bytes"]
                   - stats["alias_bytes"])
  assert total <= PAPER.hardware.hbm_bytes == 80e9
  predicted = memory.predicted_hbm_bytes(PAPER.model, PAPER.run, plan)
  assert abs(total / predicted - 1) <= 0.15, (total, predicted)


def test_no_device_holds_more_than_its_share(compiled):
  """Arguments are the device's parameter shard and 1/16 of the input, nothing replicated;
  the output is 1/16 of the output."""
  plan, stats = compiled
  cfg, run = PAPER.model, PAPER.run
  share = run.batch * run.seq * cfg.d_model * cfg.dtype_bytes // 16
  weights = shards.weight_shard_bytes(cfg, plan.tp, plan.layers_per_stage)
  assert stats["argument_bytes"] <= share + weights
  assert stats["output_bytes"] <= share

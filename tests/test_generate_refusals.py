"""`jaxpart generate` refuses a shape it cannot place as `forward` does (issue 23 item 3): one
`error:` line naming the dimension and what would be valid, exit 2, checked before anything is
traced; and the same through the library (generate.generate raises the PlanError)."""

import numpy as np
import pytest

from jaxpart import cli, config
from jaxpart.placement import planner
from jaxpart.placement.plan import PlanError
from jaxpart.runtime import generate, runs

# d_model 72 (8 heads of 9) does not split over 16 devices, the streams' width
ODD = ["--preset", "tiny", "--devices", "16", "--set", "model.d_model=72", "--set",
       "model.head_dim=9", "--set", "model.d_ff=72", "--set", "run.seq=8"]


@pytest.mark.parametrize("strategy", [["--strategy", "layerwise"],
                                      ["--strategy", "baseline", "--tp", "8", "--pp", "2"]])
def test_generate_cli_one_line_for_unplaceable_shape(strategy, capsys):
  rc = cli.main(["generate", *ODD, *strategy, "--new-tokens", "2"])
  err = capsys.readouterr().err
  assert rc == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err
  assert "d_model = 72" in lines[0] and "devices = 16" in lines[0]


def test_generate_library_refuses_before_tracing(monkeypatch):
  setup = config.load_setup("tiny", overrides={"model.d_model": "72", "model.head_dim": "9",
                                               "model.d_ff": "72", "run.seq": "8"})
  plan = planner.make_plan(setup, 16, "layerwise")
  traced = []
  monkeypatch.setattr(generate.engine, "make_prefill", lambda *a, **k: traced.append(1))
  with pytest.raises(PlanError, match="d_model = 72"):
    generate.generate(setup, plan, runs.host_params(setup, 0), runs.host_input(setup, 0),
                      np.full(setup.run.batch, setup.run.seq, np.int32), 2)
  assert not traced

"""The Llama family through the one engine without transformers: gradients of every leaf
against the single-device reference in both placements (NaN in every bubble), and the run
command's check at the model's bf16."""

import json

import jax
import pytest

from conftest import require_devices
from jaxpart import cli, config
from jaxpart.placement import planner
from jaxpart.commands import gradcheck

LLAMA = config.load_setup("llama-tiny")


@pytest.mark.parametrize("strategy, kw", [("layerwise", dict(chunk_tokens=16, kv_block=16)),
                                          ("baseline", dict(tp=8, pp=2))])
def test_llama_grads_match_reference(strategy, kw, fresh_key):
  require_devices(16)
  seed = int(jax.random.randint(fresh_key, (), 0, 2**30))
  plan = planner.make_plan(LLAMA, 16, strategy, **kw)
  res = gradcheck.check(LLAMA, plan, "float32", "none", seed, 1e-4)
  names = {c.name for c in res["checks"]}
  # every parameter leaf, the edges included; token ids have no gradient
  assert {"grad.embed.table", "grad.final_norm.scale", "grad.lm_head.w",
          "grad.attn.wk", "grad.mlp.w_gate"} <= names and "grad.x" not in names
  bad = [f"{c.name}: {c.rel:.2e} > {c.tol:.1e}" for c in res["checks"] if not c.ok]
  assert res["ok"], bad


def test_run_check_at_bf16(capsys):
  require_devices(16)
  rc = cli.main(["run", "--preset", "llama-tiny", "--devices", "16", "--strategy", "baseline",
                 "--tp", "8", "--pp", "2", "--check", "--repeats", "1", "--json"])
  out = json.loads(capsys.readouterr().out)
  assert rc == 0 and out["check"]["ok"] and out["dtype"] == "bfloat16"
  assert 0 < out["check"]["max_abs_err"] <= out["check"]["tolerance"]

"""`jaxpart run --check` in each model dtype: the bound it applies, the dtype it ran and dumped.

Each dump is re-run through the independent float64 oracle (tests/oracle.py).
"""

import json

import jax.numpy as jnp
import numpy as np

import oracle
from conftest import require_devices
from jaxpart import cli
from jaxpart.runtime import runs

RUN = ["run", "--preset", "tiny", "--devices", "16", "--strategy", "layerwise",
       "--chunk-tokens", "16", "--check", "--repeats", "1", "--json"]


def _run(capsys, *argv):
  rc = cli.main([*RUN, *argv])
  return rc, json.loads(capsys.readouterr().out)


def _dumped(path):
  d = np.load(path)
  cfg = json.loads(str(d["model_json"]))
  params = {}
  for name in d.files:
    if name.startswith("param/"):
      group, leaf = name.split("/")[1:]
      params.setdefault(group, {})[leaf] = d[name]
  return d, cfg, params


def test_float64_runs_in_float64_and_dumps_float64(capsys, tmp_path):
  require_devices(16)
  dump = tmp_path / "f64.npz"
  rc, out = _run(capsys, "--set", "model.dtype=float64", "--seed", "4", "--dump", str(dump))
  c = out["check"]
  assert out["dtype"] == "float64"
  assert rc == 0 and c["ok"] and c["tolerance"] == runs.F64_REL_TOL, c
  assert jnp.ones(1).dtype == jnp.float32, "x64 leaked out of the command"
  d, cfg, params = _dumped(dump)
  assert str(d["dtype"]) == "float64"
  assert all(a.dtype == np.float64 for a in [d["input"], d["output"], *(
      v for g in params.values() for v in g.values())])
  want = oracle.forward(params, d["input"], cfg["head_dim"], cfg["ln_eps"])
  assert oracle.rel_err(d["output"], want) < runs.F64_REL_TOL


def test_float32_model_checked_with_a_bound_that_sees_an_eps_error(capsys, tmp_path):
  """model.dtype float32 without --f32: the bf16 yardstick (bf16 reference vs float32) is 0 for
  a float32 model, so the check must use the relative float32 bound instead.

  The run uses LayerNorm eps 1e-6: it agrees with the oracle at eps 1e-6 within the float32
  bound and is outside it against the oracle at the default 1e-5: the bound (2e-6) is tight
  enough to see that error, which the former 1e-5 was not. The dump's norms are random."""
  require_devices(16)
  dump = tmp_path / "eps.npz"
  rc, out = _run(capsys, "--set", "model.dtype=float32", "--set", "model.ln_eps=1e-6",
                 "--seed", "6", "--dump", str(dump))
  c = out["check"]
  assert out["dtype"] == "float32"
  assert rc == 0 and c["ok"] and c["tolerance"] == runs.F32_REL_TOL, c
  assert c["max_rel_err"] > 0, "the engine and the reference coincide: nothing was compared"
  d, cfg, params = _dumped(dump)
  assert np.std(params["ln2"]["bias"]) > 0.3 and np.std(params["ln1"]["scale"]) > 0.3
  right = oracle.forward(params, d["input"], cfg["head_dim"], 1e-6)
  wrong = oracle.forward(params, d["input"], cfg["head_dim"], 1e-5)
  assert oracle.rel_err(d["output"], right) < runs.F32_REL_TOL
  assert oracle.rel_err(d["output"], wrong) > runs.F32_REL_TOL

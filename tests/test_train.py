"""AdamW on the mesh equals AdamW on one device; the schedule; the gradcheck command."""

import json

import jax
import numpy as np
import optax
import pytest
from conftest import require_devices

from jaxpart import cli, config, model, planner, sharding, train
from jaxpart.config import ConfigError

SEQ = 40
OC = train.OptimConfig()   # peak 3e-3, warmup 4, cosine to 3e-4 at step 20, weight decay 0.01


def _rel_l2(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_adamw_on_mesh_matches_one_device(fresh_key):
  """20 AdamW steps through the layer-wise engine (NaN in bubbles) vs the same 20 steps of the
  unsharded reference on one device.

  Tolerances, and why they are not a plain elementwise 1e-4: both runs compute the same float32
  math, and the gradients agree to ~1e-6 (test_grad). Adam divides each gradient element by
  its own running RMS, so for an element whose gradient has been within float32 noise of zero
  since step 0 (measured: 3.5e-8 against a leaf maximum of 7.9e-2), the noise decides its step:
  1 or 2 elements in 65,536 then differ by ~2e-5 while all others differ by <= 3e-6. So:
  - the loss trajectories agree to 1e-5 relative at every step;
  - per leaf, the parameters are apart by < 1e-4 of the distance they travelled (L2; measured
    <= 1e-5);
  - per leaf, no element is off by more than 1e-3 of the leaf's largest value (measured
    <= 8e-5), far below one step's worth of movement (lr, 3e-3).
  """
  require_devices(16)
  setup = config.load_setup("tiny", overrides={"run.seq": SEQ, "model.dtype": "float32"})
  cfg = setup.model
  plan = planner.make_plan(setup, 16, "layerwise", chunk_tokens=12)   # 12, 12, 12, 4
  mesh = sharding.mesh_for(plan)
  kp, kx, kt = jax.random.split(fresh_key, 3)
  params0 = model.init_params(cfg, kp)
  x = model.random_input(cfg, plan.batch, plan.seq, kx)
  batches = [(x, train.teacher_target(cfg, x, kt))]

  placed = train.train_on_mesh(plan, cfg, mesh, params0, batches, OC, progress=False,
                               bubble_fill=float("nan"), out_fill=float("nan"))
  single = train.train_reference(cfg, params0, batches, OC, progress=False)

  losses = np.array(placed.losses)
  assert len(losses) == 20 and np.isfinite(losses).all()
  assert losses[1] == losses[0]                  # step 0 runs at lr 0 (warmup starts at 0)
  assert np.all(np.diff(losses[1:]) < 0), f"loss not decreasing: {losses}"
  assert losses[-1] < 0.5 * losses[0]
  np.testing.assert_allclose(losses, single.losses, rtol=1e-5)

  # sharded as the Plan says: params, and Adam's mu and nu with them; the step count replicated
  want = train.named_leaves(sharding.param_shardings(mesh))
  for tree_name in ("mu", "nu"):
    tree = optax.tree_utils.tree_get(placed.opt_state, tree_name)
    for name, a in train.named_leaves(tree).items():
      assert a.sharding.is_equivalent_to(want[name], a.ndim), f"{tree_name}.{name}: {a.sharding}"
  for name, a in train.named_leaves(placed.params).items():
    assert a.sharding.is_equivalent_to(want[name], a.ndim), f"params.{name}: {a.sharding}"
  counts = optax.tree_utils.tree_get_all_with_path(placed.opt_state, "count")
  assert counts and all(c.sharding.is_fully_replicated and int(c) == 20 for _, c in counts)

  got, ref, start = (train.named_leaves(jax.tree.map(np.asarray, t))
                     for t in (placed.params, single.params, params0))
  for name in ref:
    travelled = ref[name] - start[name]
    assert np.abs(travelled).max() > 1e-3, f"{name} did not move"
    assert _rel_l2(got[name] - start[name], travelled) < 1e-4, name
    assert np.abs(got[name] - ref[name]).max() <= 1e-3 * np.abs(ref[name]).max(), name


def test_schedule_warms_up_then_decays():
  s = OC.schedule()
  lrs = [float(s(i)) for i in range(OC.total_steps + 1)]
  assert lrs[0] == 0.0
  assert lrs[OC.warmup_steps] == pytest.approx(OC.peak_lr)
  assert all(a < b for a, b in zip(lrs[:OC.warmup_steps], lrs[1:OC.warmup_steps + 1]))
  assert all(a > b for a, b in zip(lrs[OC.warmup_steps:-1], lrs[OC.warmup_steps + 1:]))
  assert lrs[-1] == pytest.approx(OC.end_lr)


@pytest.mark.parametrize("kw, match", [
    (dict(peak_lr=0.0), r"peak_lr = 0.0: must be a finite number > 0"),
    (dict(warmup_steps=20), r"warmup_steps = 20: must be less than total_steps = 20"),
    (dict(b2=1.0), r"b2 = 1.0: must be in \[0, 1\)"),
    (dict(end_lr=1.0), r"end_lr = 1.0: must be at most peak_lr"),
    (dict(total_steps=2.5), r"total_steps = 2.5: must be an integer"),
])
def test_optim_config_rejects_bad_values(kw, match):
  with pytest.raises(ConfigError, match=match):
    train.OptimConfig(**kw)


def test_gradcheck_command_json(capsys):
  """The command end to end, under the dots remat policy: every leaf within its bound."""
  require_devices(16)
  rc = cli.main(["gradcheck", "--preset", "tiny", "--set", f"run.seq={SEQ}", "--devices", "16",
                 "--strategy", "layerwise", "--chunk-tokens", "12", "--remat", "dots",
                 "--seed", "3", "--json"])
  out = json.loads(capsys.readouterr().out)
  assert rc == 0 and out["ok"] and out["grad_shardings_match_params"]
  assert out["plan"]["strategy"] == "layerwise" and out["plan"]["derived"]["n_chunks"] == 4
  names = {c["name"] for c in out["checks"]}
  assert {"forward", "loss", "grad.x", "grad.attn.wq", "grad.mlp.w_out", "grad.ln2.bias"} <= names
  for c in out["checks"]:
    assert c["ok"] and c["rel"] <= c["tol"] and c["max_abs_ref"] > 0, c


@pytest.mark.parametrize("argv, match", [
    (["--remat", "all"], "--remat = 'all': valid remat policies are none, stage, dots"),
    (["--dtype", "bfloat16", "--tol", "1e-3"], "--tol applies to --dtype float32"),
    (["--tol", "-1"], "--tol = -1.0: must be a positive number"),
])
def test_gradcheck_command_rejects_bad_flags(argv, match, capsys):
  rc = cli.main(["gradcheck", "--preset", "tiny", *argv])
  assert rc == 2 and match in capsys.readouterr().err

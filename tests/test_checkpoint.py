"""Checkpoints: save, restore and convert between placements bit-exactly; refuse bad input
without changing anything; survive a kill mid-write."""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from conftest import require_devices, snapshot
from jaxpart import checkpoint as ck
from jaxpart import cli, config
from jaxpart.runtime import engine
from jaxpart.models import dense as model
from jaxpart.placement import planner
from jaxpart.runtime import sharding
from jaxpart.checkpoint import CheckpointError, orbax_io
from jaxpart.placement.plan import PlanError

ROOT = Path(__file__).resolve().parents[1]


def _setup(preset="tiny"):
  return config.load_setup(preset, "h100")


@functools.partial(jax.jit, static_argnums=0)
def _random_params(cfg, key):
  """Every leaf random (LayerNorms too, so no two leaves hold the same values)."""
  shapes = ck.flatten(model.param_shapes(cfg))
  keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
  flat = {p: (jax.random.normal(keys[p], s.shape, jnp.float32)).astype(s.dtype)
          for p, s in shapes.items()}
  return ck.unflatten(model.param_shapes(cfg), flat)


def _bits(x) -> np.ndarray:
  a = np.asarray(x)
  return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _assert_same_bits(a_tree, b_tree):
  a, b = ck.flatten(a_tree), ck.flatten(b_tree)
  assert list(a) == list(b)
  for p in a:
    assert a[p].dtype == b[p].dtype, p
    np.testing.assert_array_equal(_bits(a[p]), _bits(b[p]), err_msg=p)




def _plans(setup):
  return {
      "base16": planner.make_plan(setup, 16, "baseline", tp=8, pp=2),
      "lw16": planner.make_plan(setup, 16, "layerwise"),
      "lw8": planner.make_plan(setup, 8, "layerwise"),
  }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A baseline (tp 8 x pp 2) checkpoint of random tiny parameters, shared read-only."""
  require_devices(16)
  seed = int(os.environ.get("JAXPART_TEST_SEED", time.time_ns() % 2**31))
  print(f"test_checkpoint base: JAXPART_TEST_SEED={seed}")
  setup = _setup()
  plans = _plans(setup)
  params = _random_params(setup.model, jax.random.key(seed))
  root = tmp_path_factory.mktemp("ckpt")
  m = ck.save(root / "base", params, setup.model, plans["base16"],
              run=config.to_dict(setup.run), hardware="h100")
  return dict(setup=setup, plans=plans, params=params, path=root / "base", manifest=m)


def _cli(*argv) -> int:
  return cli.main([str(a) for a in argv])


# --- pure pieces ---------------------------------------------------------------------------

def test_checksum_does_not_depend_on_sharding_and_catches_one_bit(fresh_key):
  require_devices(16)
  x = jax.random.normal(fresh_key, (4, 8, 16), jnp.float32).astype(jnp.bfloat16)
  mesh = sharding.mesh_for(_plans(_setup())["base16"])
  placements = [np.asarray(x), x,
                jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                    "stage", None, "tensor"))),
                jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                    None, "tensor", None)))]   # replicated over stage: counted once
  sums = {ck.checksum(p) for p in placements}
  assert len(sums) == 1, sums
  flipped = _bits(x).copy()
  flipped[3, 5, 7] ^= 1
  swapped = _bits(x).copy()
  swapped[0, 0, [0, 1]] = swapped[0, 0, [1, 0]]
  if swapped[0, 0, 0] == swapped[0, 0, 1]:
    swapped[0, 0, 0] ^= 2
  for bad in (flipped, swapped):
    assert ck.checksum(bad.view(ml_dtypes.bfloat16)) not in sums


def test_layouts_round_trip_and_refuse_wrong_stage_counts():
  a = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
  store = {}
  for layout, stages in (("stacked", 1), ("per_layer", 1), ("per_stage", 2), ("per_stage", 4)):
    parts = dict(ck.split_leaf("attn/wq", a, layout, stages))
    assert sorted(parts) == ck.stored_keys("attn/wq", layout, 4)
    back = ck.join_leaf("attn/wq", parts.__getitem__, layout, 4, stages)
    np.testing.assert_array_equal(back, a)
    store[(layout, stages)] = parts
  assert store[("per_layer", 1)]["layers/2/attn/wq"].shape == (3, 2)
  assert store[("per_stage", 2)]["attn/wq"].shape == (2, 2, 3, 2)
  with pytest.raises(CheckpointError, match="stages = 3 does not divide layers = 4"):
    ck.split_leaf("attn/wq", a, "per_stage", 3)
  with pytest.raises(CheckpointError, match=r"leading axes \(4, 1\)"):
    ck.join_leaf("attn/wq", store[("per_stage", 2)].__getitem__, "per_stage", 4, 4)
  with pytest.raises(CheckpointError, match="valid layouts"):
    ck.split_leaf("attn/wq", a, "per_expert")


# --- the chain -----------------------------------------------------------------------------

def test_chain_across_placements_is_bit_exact_and_forward_unchanged(base, tmp_path, capsys):
  """baseline(16) -> layer-wise(16) -> unsharded -> npz -> layer-wise(8) -> baseline(16)."""
  setup, plans, cfg = base["setup"], base["plans"], base["setup"].model
  want = {p: e["checksum"] for p, e in base["manifest"].params.items()}
  hops = [(base["path"], tmp_path / "lw16", plans["lw16"]),
          (tmp_path / "lw16", tmp_path / "un", None),
          (tmp_path / "un", tmp_path / "w.npz", None),
          (tmp_path / "w.npz", tmp_path / "lw8", plans["lw8"]),
          (tmp_path / "lw8", tmp_path / "base16", plans["base16"])]
  for src, dst, plan in hops[:3]:
    report = ck.convert(src, dst, plan)
    assert report["bit_exact_vs_source"] and report["checksums"] == want, (src, dst)
  # the npz -> layer-wise(8) hop through the command line, as a user runs it
  capsys.readouterr()
  assert _cli("convert", hops[3][0], hops[3][1], "--to-strategy", "layerwise", "--devices", 8,
              "--json") == 0
  report = json.loads(capsys.readouterr().out)
  assert report["target_placement"] == ck.placement_name(plans["lw8"])
  assert report["bit_exact_vs_source"] and report["checksums"] == want
  report = ck.convert(*hops[4])
  assert report["checksums"] == want

  with np.load(tmp_path / "w.npz") as z:   # bf16 is stored as its uint16 bits
    assert z["attn/wq"].dtype == np.uint16
    np.testing.assert_array_equal(z["attn/wq"], _bits(base["params"]["attn"]["wq"]))
  assert ck.read_manifest(tmp_path / "lw8").plan == plans["lw8"]
  assert ck.read_manifest(tmp_path / "un").plan is None

  final = ck.restore(tmp_path / "base16", cfg, plans["base16"])
  _assert_same_bits(base["params"], final.params)
  specs = sharding.param_specs()
  for p, x in ck.flatten(final.params).items():
    assert x.sharding.spec == ck.flatten(specs)[p], p   # placed as the plan says

  # the forward after conversion == the forward before, bit for bit, under each plan
  x = model.random_input(cfg, setup.run.batch, setup.run.seq, jax.random.key(7))
  for name, restored in (("base16", final), ("lw16", ck.restore(tmp_path / "lw16", cfg,
                                                                  plans["lw16"]))):
    fwd = engine.jit_forward(plans[name], cfg, sharding.mesh_for(plans[name]))
    before = fwd(ck.place(base["params"], plans[name]), x)
    after = fwd(restored.params, x)
    assert np.isfinite(np.asarray(before, np.float32)).all()
    np.testing.assert_array_equal(_bits(before), _bits(after), err_msg=name)


# --- npz -----------------------------------------------------------------------------------

def test_npz_layouts_and_foreign_files(base, tmp_path, capsys):
  cfg = base["setup"].model
  for layout, stages, key, shape in (("per_layer", 1, "layers/3/mlp/w_in", (128, 128)),
                                     ("per_stage", 2, "mlp/w_in", (2, 2, 128, 128))):
    out = tmp_path / f"{layout}.npz"
    report = ck.convert(base["path"], out, npz_layout=layout)
    assert report["target_layout"] == layout and report["layout_stages"] == stages
    with np.load(out) as z:
      assert z[key].shape == shape and z[key].dtype == np.uint16
    _assert_same_bits(base["params"], ck.load(out, cfg).params)

  # another framework's file: per-layer names, float32, no manifest; the model is named
  cfg32 = replace(cfg, dtype="float32")
  host = {p: np.asarray(x, np.float32) for p, x in ck.flatten(base["params"]).items()}
  arrays = {f"layers/{i}/{p}": a[i] for p, a in host.items() for i in range(cfg.layers)}
  np.savez(tmp_path / "foreign.npz", **arrays)
  with pytest.raises(CheckpointError, match="without a jaxpart manifest"):
    ck.load(tmp_path / "foreign.npz")
  got = ck.load(tmp_path / "foreign.npz", cfg32, base["plans"]["lw8"])
  assert got.manifest.layout == "per_layer"
  for p, x in ck.flatten(got.params).items():
    np.testing.assert_array_equal(np.asarray(x), host[p])
  capsys.readouterr()   # the command line names the model; the run shape is recorded
  assert _cli("convert", tmp_path / "foreign.npz", tmp_path / "imported", "--to-strategy",
              "unsharded") == 2
  assert "name the model" in capsys.readouterr().err
  assert _cli("convert", tmp_path / "foreign.npz", tmp_path / "imported", "--to-strategy",
              "unsharded", "--preset", "tiny", "--set", "model.dtype=float32") == 0
  imported = ck.read_manifest(tmp_path / "imported")
  assert imported.model == cfg32 and imported.run == {"batch": 2, "seq": 100}
  with pytest.raises(CheckpointError, match="does not cast"):
    ck.load(tmp_path / "foreign.npz", cfg)   # float32 file, bfloat16 model: no silent rounding
  del arrays["layers/2/attn/wo"]
  np.savez(tmp_path / "short.npz", **arrays)
  with pytest.raises(CheckpointError, match=r"missing arrays \['layers/2/attn/wo'\]"):
    ck.load(tmp_path / "short.npz", cfg32)


# --- optimizer state -----------------------------------------------------------------------

def test_optimizer_state_moves_with_the_parameters(base, tmp_path, fresh_key):
  plans, cfg = base["plans"], base["setup"].model
  params = ck.place(base["params"], plans["base16"])
  tx = optax.adam(1e-2)
  grads = ck.place(_random_params(cfg, fresh_key), plans["base16"])
  state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[1])(grads, params)  # mu, nu != 0
  ck.save(tmp_path / "a", params, cfg, plans["base16"], opt_state=state,
          run=config.to_dict(base["setup"].run))
  report = ck.convert(tmp_path / "a", tmp_path / "b", plans["lw16"])
  assert report["opt_state_leaves"] == len(ck.flatten(state))

  r = ck.restore(tmp_path / "b", cfg, plans["lw16"], opt_state=True)
  got = ck.flatten(r.opt_state)
  for p, x in ck.flatten(state).items():
    np.testing.assert_array_equal(_bits(x), _bits(got[p]), err_msg=p)
  lw_specs = ck.flatten(sharding.param_specs())
  assert got["0/mu/attn/wq"].sharding.spec == lw_specs["attn/wq"]
  # into the optimizer's own structure, as a training loop restores it
  target = jax.tree.map(lambda s, a: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=a.sharding),
                        jax.eval_shape(tx.init, params),
                        ck.unflatten(jax.eval_shape(tx.init, params), got))
  typed = ck.restore(tmp_path / "b", cfg, plans["lw16"], opt_state=target).opt_state
  assert type(typed[0]).__name__ == "ScaleByAdamState" and int(typed[0].count) == 1


# --- bad inputs change nothing -------------------------------------------------------------

def _refused(root: Path, fn, match: str, exc=CheckpointError):
  before = snapshot(root)
  with pytest.raises(exc, match=match):
    fn()
  assert snapshot(root) == before


def _copy(src: Path, dst: Path) -> Path:
  import shutil  # noqa: PLC0415
  shutil.copytree(src, dst)
  return dst


def _data_files(ckpt: Path) -> list[Path]:
  files = [p for p in (ckpt / ck.ORBAX_DIR).rglob("*") if p.is_file() and p.parent.name == "d"]
  return sorted(files, key=lambda p: p.stat().st_size)


def test_bad_sources_are_refused_and_change_nothing(base, tmp_path):
  cfg, plans = base["setup"].model, base["plans"]
  lw = plans["lw16"]
  _refused(tmp_path, lambda: ck.convert(tmp_path / "missing", tmp_path / "out", lw),
           "does not exist")
  _refused(tmp_path, lambda: ck.restore(tmp_path / "missing", cfg, lw), "does not exist")

  truncated = _copy(base["path"], tmp_path / "truncated")
  big = _data_files(truncated)[-1]
  big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
  _refused(tmp_path, lambda: ck.convert(truncated, tmp_path / "out", lw), "damaged or incomplete")

  # data that decodes cleanly but is not what was saved: another checkpoint's arrays
  other = ck.save(tmp_path / "other", _random_params(cfg, jax.random.key(123)), cfg, None)
  assert other.params["attn/wq"]["checksum"] != base["manifest"].params["attn/wq"]["checksum"]
  swapped = _copy(base["path"], tmp_path / "swapped")
  import shutil  # noqa: PLC0415
  shutil.rmtree(swapped / ck.ORBAX_DIR)
  shutil.copytree(tmp_path / "other" / ck.ORBAX_DIR, swapped / ck.ORBAX_DIR)
  doc = json.loads((swapped / ck.MANIFEST).read_text())   # the file list passes: only the
  doc["files"] = other.files                                # checksums can tell
  (swapped / ck.MANIFEST).write_text(json.dumps(doc))
  _refused(tmp_path, lambda: ck.convert(swapped, tmp_path / "out", lw),
           r"checksum mismatch.*attn/wq \(manifest")

  flipped = _copy(base["path"], tmp_path / "flipped")   # one byte: a decode error or a checksum
  big = _data_files(flipped)[-1]
  data = bytearray(big.read_bytes())
  data[len(data) // 2] ^= 0x40
  big.write_bytes(bytes(data))
  _refused(tmp_path, lambda: ck.restore(flipped, cfg, lw), "checksum mismatch|damaged")

  no_manifest = _copy(base["path"], tmp_path / "no_manifest")
  (no_manifest / ck.MANIFEST).unlink()
  _refused(tmp_path, lambda: ck.restore(no_manifest, cfg, lw), "no manifest.json")

  ck.convert(base["path"], tmp_path / "w.npz")
  npz = tmp_path / "w.npz"
  data = bytearray(npz.read_bytes())
  data[len(data) // 3] ^= 0x01
  bad_npz = tmp_path / "bad.npz"
  bad_npz.write_bytes(bytes(data))
  _refused(tmp_path, lambda: ck.convert(bad_npz, tmp_path / "out", lw), "damaged|checksum|CRC")
  (tmp_path / "cut.npz").write_bytes(npz.read_bytes()[:1000])
  _refused(tmp_path, lambda: ck.load(tmp_path / "cut.npz", cfg), "not a readable .npz")


def test_other_model_and_unsplittable_plans_are_refused(base, tmp_path, capsys):
  cfg, src = base["setup"].model, base["path"]
  small = _setup("small")
  _refused(tmp_path, lambda: ck.restore(src, small.model, None),
           r"different model: d_model = 512 \(checkpoint has 128\); head_dim = 16 "
           r"\(checkpoint has 4\); d_ff = 512 \(checkpoint has 128\)")
  out = tmp_path / "out"
  before = snapshot(tmp_path)
  cases = [
      (["--preset", "small", "--to-strategy", "layerwise", "--devices", 16], "d_model = 512"),
      (["--to-strategy", "layerwise", "--devices", 16, "--tp", 3], "tp = 3"),
      (["--to-strategy", "baseline", "--devices", 16, "--tp", 16, "--pp", 1],
       "n_heads = 8 is not divisible by tp = 16"),
      (["--to-strategy", "baseline", "--devices", 16, "--tp", 2, "--pp", 8],
       "stages = 8 exceeds layers = 4"),
      (["--to-strategy", "baseline", "--devices", 32, "--tp", 8, "--pp", 4],
       "needs 32 devices, 16 are present"),
      ([], "needs a placement"),
  ]
  for flags, match in cases:
    capsys.readouterr()
    assert _cli("convert", src, out, *flags) == 2, flags
    err = capsys.readouterr().err
    assert "jaxpart convert: error:" in err and match in err, (flags, err)
  assert snapshot(tmp_path) == before
  wrong_layers = replace(base["plans"]["lw16"], stages=2, tp=8, stage_layers=((0,), (1,)))
  with pytest.raises(PlanError, match="plan holds 2 layers"):
    ck.check_plan(cfg, wrong_layers)


def test_destination_rules(base, tmp_path):
  cfg, lw = base["setup"].model, base["plans"]["lw16"]
  dst = tmp_path / "dst"
  ck.convert(base["path"], dst, None)
  _refused(tmp_path, lambda: ck.convert(base["path"], dst, lw), "exists; pass --overwrite")
  _refused(tmp_path, lambda: ck.convert(dst, dst, lw, overwrite=True), "is the source")
  _refused(tmp_path, lambda: ck.convert(dst, dst / "sub", lw), "inside the source")
  junk = tmp_path / "junk"
  junk.mkdir()
  (junk / "notes.txt").write_text("mine")
  _refused(tmp_path, lambda: ck.convert(base["path"], junk, lw, overwrite=True),
           "not a jaxpart checkpoint; refusing")
  report = ck.convert(base["path"], dst, lw, overwrite=True)
  assert report["target_placement"] == ck.placement_name(lw)
  assert ck.read_manifest(dst).plan == lw
  assert not list(tmp_path.glob(".dst.*"))   # no partial or replaced directory left behind
  _assert_same_bits(base["params"], ck.restore(dst, cfg, lw).params)


# --- interrupted writes --------------------------------------------------------------------

def test_failure_before_commit_leaves_no_destination(base, tmp_path, monkeypatch):
  src_before = snapshot(base["path"])

  def crash(*a, **k):
    raise OSError("disk full (injected)")

  monkeypatch.setattr(orbax_io, "_write_manifest", crash)
  with pytest.raises(CheckpointError, match=r"dst: writing failed: disk full \(injected\): "
                     r".*\.dst\.partial was removed and nothing was written there"):
    ck.convert(base["path"], tmp_path / "dst", base["plans"]["lw16"])
  assert not (tmp_path / "dst").exists() and not list(tmp_path.iterdir())
  assert snapshot(base["path"]) == src_before


@pytest.mark.slow
def test_killed_conversion_leaves_nothing_valid(base, tmp_path):
  """SIGKILL a `jaxpart convert` once it is writing orbax data; then it runs clean again."""
  src, dst = base["path"], tmp_path / "dst"
  src_before = snapshot(src)
  partial = tmp_path / ".dst.partial"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=16",
             JAX_PLATFORMS="cpu")
  with subprocess.Popen([sys.executable, "-m", "jaxpart", "convert", str(src), str(dst),
                         "--to-strategy", "layerwise", "--devices", "16"], cwd=ROOT, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
    deadline = time.monotonic() + 240
    try:
      while not (partial / ck.ORBAX_DIR).exists():
        assert proc.poll() is None, f"convert ended before writing: {proc.communicate()}"
        assert time.monotonic() < deadline, "convert never started writing"
        time.sleep(0.002)
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
  assert proc.returncode == -signal.SIGKILL
  assert not dst.exists()
  with pytest.raises(CheckpointError, match="does not exist"):
    ck.restore(dst)
  with pytest.raises(CheckpointError, match="interrupted write"):
    ck.restore(partial)
  assert snapshot(src) == src_before
  ck.convert(src, dst, base["plans"]["lw16"])   # a rerun clears the stale partial write
  assert not partial.exists()
  _assert_same_bits(base["params"], ck.restore(dst, plan=base["plans"]["lw16"]).params)


# --- commands ------------------------------------------------------------------------------

def test_save_init_and_verify_commands(tmp_path, capsys):
  require_devices(16)
  dst = tmp_path / "init"
  assert _cli("save-init", dst, "--preset", "tiny", "--strategy", "baseline", "--devices", 16,
              "--tp", 8, "--pp", 2, "--seed", 3) == 0
  assert "baseline 2 stages x tp 8 (16 devices)" in capsys.readouterr().out
  assert _cli("save-init", dst, "--preset", "tiny", "--strategy", "unsharded") == 2
  assert "exists; pass --overwrite" in capsys.readouterr().err
  assert _cli("verify", dst) == 0
  out = capsys.readouterr().out
  assert "every checksum matches" in out and "P('stage', None, 'tensor')" in out
  assert re.search(r"all \d+ files under orbax/ as recorded at save", out), out
  # save-init's values are Flax's initialiser's for seed 3, whatever the placement
  init = jax.jit(model.init_params, static_argnums=0)(_setup().model, jax.random.key(3))
  assert ck.checksums(ck.flatten(init)) == {p: e["checksum"]
                                            for p, e in ck.read_manifest(dst).params.items()}


def test_convert_script_is_the_command(base, tmp_path):
  out = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"),
                        "--help"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "--to-strategy" in out.stdout and "--npz-layout" in out.stdout


def test_command_layouts_match_the_library():
  from jaxpart.commands import _ckpt  # noqa: PLC0415
  assert _ckpt.LAYOUTS == ck.LAYOUTS


def test_every_leaf_corruption_is_caught(base, tmp_path):
  """One leaf at a time: one bit of its data flipped in an exported .npz, and its checksum
  changed in a directory checkpoint's manifest. Each must be refused naming that leaf: a
  verifier that skips any leaf (the first, the last) fails here."""
  cfg = base["setup"].model
  npz = tmp_path / "w.npz"
  ck.convert(base["path"], npz)
  with np.load(npz) as f:
    arrays = {k: f[k] for k in f.files}
  leaves = list(base["manifest"].params)
  assert len(leaves) == 10
  for leaf in leaves:
    (key,) = [k for k in arrays if k == leaf or k.endswith("/" + leaf)]
    bad = dict(arrays)
    bits = _bits(bad[key]).copy()
    bits.reshape(-1)[bits.size // 2] ^= 1
    bad[key] = bits.view(arrays[key].dtype)
    path = tmp_path / f"bad_{leaf.replace('/', '_')}.npz"
    np.savez(path, **bad)
    with pytest.raises(CheckpointError, match=f"checksum mismatch.*{leaf}"):
      ck.restore(path, cfg)

  edited = _copy(base["path"], tmp_path / "edited")
  manifest = json.loads((edited / ck.MANIFEST).read_text())
  for leaf in leaves:
    doc = json.loads(json.dumps(manifest))
    entry = doc["params"][leaf]
    entry["checksum"] = entry["checksum"][:-1] + ("0" if entry["checksum"][-1] != "0" else "1")
    (edited / ck.MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=f"checksum mismatch.*{leaf}"):
      ck.restore(edited, cfg)

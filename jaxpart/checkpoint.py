"""Checkpoints for any Plan: orbax save and restore, a checked manifest, conversion between
placements, and npz import and export.

A checkpoint is a directory:
  manifest.json  model config, run shape, the Plan it was saved under (null: unsharded), the
                 layout, and per leaf its shape, dtype and checksum.
  orbax/         an orbax CheckpointManager root: step 0 with the items `params` and, when
                 saved, `opt_state`.
It is written into a hidden sibling (.NAME.partial, marked by a sentinel file) and renamed into
place at the end, so an interrupted write never leaves a directory that restores as valid.

Layout. Under every Plan the parameters are one tree whose leaves are stacked on a leading layer
axis split over the `stage` mesh axis: the stored arrays are the same global arrays whatever the
placement, and orbax (tensorstore) reads each device's shard for any target sharding without
gathering the model anywhere. The orbax layout is therefore always "stacked"; a per-stage layout
there would tie the stored shapes to one Plan's stage count. Other frameworks keep layers apart
("per_layer": layers/3/attn/wq) or grouped as pipeline stages hold them ("per_stage":
[S, L/S, ...]); split_leaf / join_leaf convert between these at the npz boundary, and the
manifest records which one a file uses.

Checksums. orbax does not check content: a flipped byte in its zstd data can restore silently
as different numbers. A leaf's checksum is a sum over its elements, modulo 2^32 in two lanes, of
a hash of (global index, bit pattern). Under jit each device sums the shard it holds and one
all-reduce (across processes too) adds the parts; the value does not depend on how the array is
split, so a converted checkpoint must carry the source's checksums exactly, and the whole model
is never gathered to compute it. It detects damage, not tampering.

bf16 in npz: numpy has no bfloat16 and np.save writes ml_dtypes.bfloat16 as an opaque |V2, so
bf16 leaves are stored as their uint16 bit patterns; the embedded manifest (entry
__jaxpart_manifest__, a JSON string) records dtype "bfloat16", stored_as "uint16", and import
views the bits back as bfloat16: exact. Foreign npz files without a manifest may hold bf16 as
uint16 bits, or as |V2, for a bfloat16 model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import PartitionSpec as P, SingleDeviceSharding

from jaxpart import config, sharding
from jaxpart.config import ConfigError, ModelConfig
from jaxpart.errors import UserError
from jaxpart.model import param_shapes
from jaxpart.plan import Plan, PlanError

FORMAT = "jaxpart-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
ORBAX_DIR = "orbax"
SENTINEL = ".jaxpart-partial"          # present only while a directory is being written
NPZ_MANIFEST_KEY = "__jaxpart_manifest__"
LAYOUTS = ("stacked", "per_layer", "per_stage")
ORBAX_LAYOUTS = ("stacked",)
CHECKSUM_ALGO = "ix64-v1"             # two uint32 lanes of sum(lowbias32(index, bits))
UNSHARDED = "unsharded"


class CheckpointError(UserError):
  """A checkpoint that cannot be read, written or converted; the message says why."""


# --- leaf paths ----------------------------------------------------------------------------

def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten(tree) -> dict[str, Any]:
  """{"attn/wq": leaf, ...} in tree order; None leaves (optax's EmptyState) are dropped."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def unflatten(template, flat: dict[str, Any]):
  paths = list(flatten(template))
  treedef = jax.tree_util.tree_structure(template)
  return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths])


def _dtype_name(dtype) -> str:
  return np.dtype(dtype).name


def _spec_table(cfg: ModelConfig) -> dict[str, dict]:
  return {p: {"shape": list(s.shape), "dtype": _dtype_name(s.dtype)}
          for p, s in flatten(param_shapes(cfg)).items()}


# --- layouts -------------------------------------------------------------------------------

def _check_layout(layout: str, allowed: Iterable[str] = LAYOUTS) -> None:
  if layout not in allowed:
    raise CheckpointError(f"layout = {layout!r}: valid layouts here are {', '.join(allowed)}")


def split_leaf(path: str, arr, layout: str, stages: int = 1) -> list[tuple[str, Any]]:
  """A stacked [L, ...] leaf as `layout` stores it: (key, array) pairs."""
  _check_layout(layout)
  if layout == "stacked":
    return [(path, arr)]
  if layout == "per_layer":
    return [(f"layers/{i}/{path}", arr[i]) for i in range(arr.shape[0])]
  layers = arr.shape[0]
  if stages <= 0 or layers % stages:
    raise CheckpointError(f"per_stage layout: stages = {stages} does not divide layers = {layers}")
  return [(path, arr.reshape((stages, layers // stages) + tuple(arr.shape[1:])))]


def stored_keys(path: str, layout: str, layers: int) -> list[str]:
  if layout == "per_layer":
    return [f"layers/{i}/{path}" for i in range(layers)]
  return [path]


def join_leaf(path: str, get: Callable[[str], np.ndarray], layout: str, layers: int,
              stages: int = 1) -> np.ndarray:
  """Inverse of split_leaf: the stacked [L, ...] leaf from `layout`'s stored arrays."""
  _check_layout(layout)
  if layout == "stacked":
    return get(path)
  if layout == "per_layer":
    parts = [get(k) for k in stored_keys(path, layout, layers)]
    shapes = {p.shape for p in parts}
    if len(shapes) != 1:
      raise CheckpointError(f"{path}: per-layer arrays differ in shape: {sorted(shapes)}")
    return np.stack(parts)
  a = get(path)
  if a.ndim < 2 or a.shape[:2] != (stages, layers // stages):
    raise CheckpointError(f"{path}: per_stage layout wants leading axes ({stages}, "
                          f"{layers // stages}) for {layers} layers in {stages} stages, found "
                          f"shape {tuple(a.shape)}")
  return a.reshape((layers,) + tuple(a.shape[2:]))


# --- checksums -----------------------------------------------------------------------------

_SEEDS = (0x9E3779B9, 0x85EBCA6B)


def _mix(h):
  """lowbias32 (C. Wellons' hash prospector): a full-avalanche 32-bit finaliser."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def _words(x):
  """The bit pattern as uint32 words; 8-byte dtypes gain a trailing axis of two words."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32)


def _leaf_sums(x):
  """Two lanes of sum over elements of hash(global index, bits), wrapping modulo 2^32.

  Written over the global array: under jit, XLA partitions the iotas and the reduction to
  match x's sharding (local sums, then one all-reduce, across processes too), and because
  wrapping integer addition is associative and commutative the result is the same bits for
  every sharding.
  """
  w = _words(x)
  out = []
  for seed in _SEEDS:
    h = jnp.uint32(seed)
    for a, n in enumerate(w.shape):   # h broadcasts up one axis at a time
      shape = [1] * w.ndim
      shape[a] = n
      i = jax.lax.broadcasted_iota(jnp.uint32, shape, a)
      h = _mix(h ^ _mix(i + jnp.uint32((seed + a * 0x632BE5AB) & 0xFFFFFFFF)))
    out.append(jnp.sum(_mix(h + _mix(w ^ jnp.uint32(seed))), dtype=jnp.uint32))
  return jnp.stack(out)


@jax.jit
def _tree_sums(leaves: list):
  return [_leaf_sums(x) for x in leaves]


def checksums(flat: dict[str, Any], progress: bool = False,
              desc: str = "checksum") -> dict[str, str]:
  """Checksum of every leaf, in one jitted call (one compile per placement of the tree)."""
  leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in flat.values()]
  with _phase(desc, progress, sum(_nbytes(x) for x in leaves)):
    sums = [_local_value(s) for s in _tree_sums(leaves)]
  return {p: f"{int(s[0]):08x}{int(s[1]):08x}" for p, s in zip(flat, sums)}


def _local_value(s: jax.Array) -> np.ndarray:
  """A (replicated) result on the host; across processes every process holds the whole of it."""
  if s.is_fully_addressable:
    return np.asarray(s)
  if not s.is_fully_replicated:
    raise CheckpointError(f"checksum result is split across processes ({s.sharding})")
  return np.asarray(s.addressable_data(0))


def checksum(x) -> str:
  return checksums({"x": x})["x"]


# --- manifest ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Manifest:
  """What a checkpoint holds; checked against the request and the data on every restore."""

  model: ModelConfig
  plan: Plan | None                        # None: unsharded, one device
  params: dict[str, dict]                  # path -> {shape, dtype, checksum[, stored_as]}
  opt_state: dict[str, dict] | None = None
  layout: str = "stacked"
  layout_stages: int = 1                   # per_stage only
  run: dict | None = None                  # {batch, seq} the Plan was made for
  hardware: str | None = None
  container: str = "orbax"                 # or "npz"
  created: str = ""

  @property
  def placement(self) -> str:
    return "npz file (unsharded)" if self.container == "npz" else placement_name(self.plan)

  @property
  def param_bytes(self) -> int:
    return sum(int(np.prod(e["shape"])) * np.dtype(_np_dtype(e["dtype"])).itemsize
               for e in self.params.values())

  def to_dict(self) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION, "container": self.container,
        "created": self.created, "layout": self.layout, "layout_stages": self.layout_stages,
        "checksum_algo": CHECKSUM_ALGO, "model": config.to_dict(self.model),
        "run": self.run, "hardware": self.hardware, "placement": self.placement,
        "plan": None if self.plan is None else self.plan.to_dict(),
        "params": self.params, "opt_state": self.opt_state,
    }

  @classmethod
  def from_dict(cls, d: Any, where: str) -> "Manifest":
    if not isinstance(d, dict) or d.get("format") != FORMAT:
      raise CheckpointError(f"{where}: not a jaxpart manifest (format is "
                            f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r}, "
                            f"expected {FORMAT!r})")
    if d.get("version") != VERSION:
      raise CheckpointError(f"{where}: manifest version {d.get('version')!r}; this jaxpart reads "
                            f"version {VERSION}")
    if d.get("checksum_algo") != CHECKSUM_ALGO:
      raise CheckpointError(f"{where}: checksum_algo {d.get('checksum_algo')!r}; this jaxpart "
                            f"computes {CHECKSUM_ALGO!r}")
    layout = d.get("layout")
    _check_layout(layout)
    try:
      model = ModelConfig(**d["model"])
      plan = None if d.get("plan") is None else Plan.from_dict(d["plan"])
      if d.get("run") is not None:
        config.RunShape(**d["run"])
    except (KeyError, TypeError, ConfigError, PlanError) as e:
      raise CheckpointError(f"{where}: manifest model/plan/run is invalid: {e}") from None
    params = d.get("params")
    if not isinstance(params, dict):
      raise CheckpointError(f"{where}: manifest has no params table")
    want = _spec_table(model)
    if set(params) != set(want):
      raise CheckpointError(f"{where}: manifest leaves {sorted(params)} are not the model's "
                            f"{sorted(want)}")
    for p, e in params.items():
      if e.get("shape") != want[p]["shape"] or e.get("dtype") != want[p]["dtype"]:
        raise CheckpointError(f"{where}: manifest says {p} is {e.get('dtype')}{e.get('shape')}, "
                              f"the model has {want[p]['dtype']}{want[p]['shape']}")
      if not isinstance(e.get("checksum"), str):
        raise CheckpointError(f"{where}: manifest has no checksum for {p}")
    return cls(model=model, plan=plan, params=params, opt_state=d.get("opt_state"),
               layout=layout, layout_stages=int(d.get("layout_stages") or 1), run=d.get("run"),
               hardware=d.get("hardware"), container=d.get("container", "orbax"),
               created=d.get("created", ""))


def placement_name(plan: Plan | None) -> str:
  if plan is None:
    return UNSHARDED
  return f"{plan.strategy} {plan.stages} stages x tp {plan.tp} ({plan.devices} devices)"


def _np_dtype(name: str):
  return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def check_model(requested: ModelConfig, manifest: Manifest, where: str) -> None:
  """Refuse a restore into a different model, naming every field that differs."""
  have, want = config.to_dict(manifest.model), config.to_dict(requested)
  diff = [f"{k} = {want[k]!r} (checkpoint has {have[k]!r})" for k in want if have[k] != want[k]]
  if diff:
    raise CheckpointError(f"{where} was saved for a different model: {'; '.join(diff)}")


def _read_json(path: Path, where: str) -> Any:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{where}: manifest.json is not valid JSON ({e}); the checkpoint is "
                          f"damaged") from None


def read_manifest(path) -> Manifest:
  """The manifest of a checkpoint directory or a jaxpart .npz file; refuses anything else."""
  path = Path(path).absolute()   # orbax wants absolute paths
  if not path.exists():
    raise CheckpointError(f"{path}: no such checkpoint (the path does not exist)")
  if path.is_file():
    if path.suffix != ".npz":
      raise CheckpointError(f"{path}: a file that is not .npz; a checkpoint is a directory or "
                            f"an .npz file")
    m = npz_manifest(path)
    if m is None:
      raise CheckpointError(f"{path}: an .npz without a jaxpart manifest; import it by naming "
                            f"the model (--preset/--config/--set)")
    return m
  if (path / SENTINEL).exists():
    raise CheckpointError(f"{path}: an interrupted write (it still holds {SENTINEL}); not a "
                          f"checkpoint")
  if not (path / MANIFEST).is_file():
    raise CheckpointError(f"{path}: no {MANIFEST}, so not a jaxpart checkpoint (a write that "
                          f"did not finish leaves none)")
  m = Manifest.from_dict(_read_json(path / MANIFEST, str(path)), str(path))
  if m.container != "orbax" or m.layout not in ORBAX_LAYOUTS:
    raise CheckpointError(f"{path}: container {m.container!r} with layout {m.layout!r}; "
                          f"checkpoint directories are orbax with layout "
                          f"{', '.join(ORBAX_LAYOUTS)}")
  if not (path / ORBAX_DIR).is_dir():
    raise CheckpointError(f"{path}: the {ORBAX_DIR}/ directory is missing; the checkpoint is "
                          f"damaged")
  return m


# --- placement -----------------------------------------------------------------------------

def check_plan(cfg: ModelConfig, plan: Plan | None) -> None:
  """A Plan this model can be split into, on devices that are present."""
  if plan is None:
    return
  if plan.layers != cfg.layers:
    raise PlanError(f"plan holds {plan.layers} layers ({plan.stage_layers}), the model has "
                    f"{cfg.layers}")
  from jaxpart import planner  # noqa: PLC0415
  planner.check_tp(cfg, plan.tp)
  sharding.mesh_for(plan)


def param_shardings(plan: Plan | None) -> dict:
  """The Plan's shardings in the params tree's shape; unsharded: this process's first device."""
  if plan is None:
    one = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: one, sharding.param_specs(),
                        is_leaf=lambda x: isinstance(x, P))
  return sharding.param_shardings(sharding.mesh_for(plan))


def param_targets(cfg: ModelConfig, plan: Plan | None) -> dict:
  """ShapeDtypeStructs carrying the target shardings: each device reads only its shard."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      param_shapes(cfg), param_shardings(plan))


def place(params, plan: Plan | None):
  return jax.device_put(params, param_shardings(plan))


def _opt_targets(cfg: ModelConfig, entries: dict[str, dict], stored_tree,
                 plan: Plan | None) -> Any:
  """Targets for stored optimizer state: a leaf whose path ends in a parameter path and has
  that parameter's shape (Adam's mu and nu) takes the parameter's sharding; others replicate."""
  shard_by_path = flatten(param_shardings(plan))
  shape_by_path = {p: tuple(s.shape) for p, s in flatten(param_shapes(cfg)).items()}
  rep = (SingleDeviceSharding(jax.local_devices()[0]) if plan is None
         else sharding.replicated(sharding.mesh_for(plan)))
  out = {}
  for path, meta in flatten(stored_tree).items():
    shape = tuple(meta.shape)
    if path not in entries or tuple(entries[path]["shape"]) != shape:
      raise CheckpointError(f"opt_state/{path}: stored as {shape}, the manifest says "
                            f"{entries.get(path, {}).get('shape')}")
    match = [p for p in shard_by_path
             if (path == p or path.endswith("/" + p)) and shape_by_path[p] == shape]
    out[path] = jax.ShapeDtypeStruct(shape, meta.dtype,
                                     sharding=shard_by_path[match[0]] if match else rep)
  return unflatten(stored_tree, out)


# --- orbax ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """orbax logs a warning for every read-only manager; keep the command output readable."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _manager(root: Path, items: tuple[str, ...], read_only: bool):
  import orbax.checkpoint as ocp  # noqa: PLC0415
  opts = ocp.CheckpointManagerOptions(
      read_only=read_only, create=not read_only, save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=False)   # no background writer thread outlives a call
  return ocp.CheckpointManager(root, item_names=items,
                               item_handlers={n: ocp.StandardCheckpointHandler() for n in items},
                               options=opts)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# --- atomic destinations -------------------------------------------------------------------

def _primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


def check_destination(dst: Path, overwrite: bool, src: Path | None = None) -> None:
  """Refuse, before any work, a destination that exists (unless overwrite) or is the source."""
  dst = Path(dst)
  if src is not None and Path(src).exists():
    if dst.exists() and os.path.samefile(src, dst):
      raise CheckpointError(f"destination {dst} is the source; write the conversion elsewhere")
    if Path(src).is_dir() and Path(dst).resolve().is_relative_to(Path(src).resolve()):
      raise CheckpointError(f"destination {dst} is inside the source {src}; the source is only "
                            f"read, write the conversion elsewhere")
  if not (dst.exists() or dst.is_symlink()):
    if dst.parent.exists() and not dst.parent.is_dir():
      raise CheckpointError(f"destination {dst}: {dst.parent} is not a directory")
    return
  if not overwrite:
    raise CheckpointError(f"destination {dst} exists; pass --overwrite (overwrite=True) to "
                          f"replace it")
  if dst.is_dir() and any(dst.iterdir()) and not (dst / MANIFEST).exists():
    raise CheckpointError(f"destination {dst} is a non-empty directory that is not a jaxpart "
                          f"checkpoint; refusing to replace it even with --overwrite")
  if dst.is_file() and dst.suffix != ".npz":
    raise CheckpointError(f"destination {dst} is a file that is not .npz; refusing to replace it")


def _partial_path(dst: Path) -> Path:
  return dst.with_name(f".{dst.name}.partial")


@contextlib.contextmanager
def _atomic_dir(dst: Path, overwrite: bool) -> Iterator[Path]:
  """Yields a fresh hidden sibling; renames it to dst only if the body finishes."""
  check_destination(dst, overwrite)
  tmp = _partial_path(dst)
  if _primary():
    dst.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
      if not (tmp / SENTINEL).exists():
        raise CheckpointError(f"{tmp} exists and is not a jaxpart partial write; remove it")
      shutil.rmtree(tmp)   # left by an interrupted write to the same destination
    tmp.mkdir()
    (tmp / SENTINEL).write_text("jaxpart: write in progress; not a checkpoint\n")
  _sync("jaxpart-checkpoint-begin")
  try:
    yield tmp
    _sync("jaxpart-checkpoint-written")
  except BaseException:
    if _primary():
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  if _primary():
    # With --overwrite the old checkpoint steps aside first: a kill between the two renames
    # leaves no destination (the old one survives as .NAME.replaced), never a mixed one.
    old = dst.with_name(f".{dst.name}.replaced")
    if dst.exists() or dst.is_symlink():
      _remove(old)
      os.rename(dst, old)
    os.rename(tmp, dst)
    (dst / SENTINEL).unlink()   # a kill before this leaves dst refused, never half-valid
    _fsync_dir(dst.parent)
    _remove(old)
  _sync("jaxpart-checkpoint-committed")


def _remove(path: Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  elif path.exists() or path.is_symlink():
    path.unlink()


def _fsync_dir(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_manifest(dirpath: Path, manifest: Manifest) -> None:
  if not _primary():
    return
  with open(dirpath / MANIFEST, "w") as f:
    json.dump(manifest.to_dict(), f, indent=1)
    f.flush()
    os.fsync(f.fileno())


# --- save / restore ------------------------------------------------------------------------

def _check_tree(flat: dict[str, Any], cfg: ModelConfig) -> None:
  want = _spec_table(cfg)
  if set(flat) != set(want):
    raise CheckpointError(f"parameter tree has leaves {sorted(flat)}, the model has "
                          f"{sorted(want)}")
  for p, x in flat.items():
    if list(x.shape) != want[p]["shape"] or _dtype_name(x.dtype) != want[p]["dtype"]:
      raise CheckpointError(f"{p} is {_dtype_name(x.dtype)}{list(x.shape)}, the model wants "
                            f"{want[p]['dtype']}{want[p]['shape']}")


def _entries(flat: dict[str, Any], sums: dict[str, str]) -> dict[str, dict]:
  return {p: {"shape": list(x.shape), "dtype": _dtype_name(x.dtype), "checksum": sums[p]}
          for p, x in flat.items()}


def save(path, params, cfg: ModelConfig, plan: Plan | None = None, *, opt_state=None,
         run: dict | None = None, hardware: str | None = None, overwrite: bool = False,
         progress: bool = False, known_checksums: dict[str, str] | None = None) -> Manifest:
  """Write params (placed as `plan` says; None: unsharded) and optionally optimizer state.

  known_checksums: the verified checksums of exactly these arrays (a conversion has them from
  its restore), to skip computing them twice.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415
  path = Path(path).absolute()   # orbax wants absolute paths
  if plan is None and jax.process_count() > 1:
    raise CheckpointError("an unsharded checkpoint is written by one process; save with a Plan")
  check_plan(cfg, plan)
  params = place(params, plan)
  flat = flatten(params)
  _check_tree(flat, cfg)
  check_destination(path, overwrite)
  with _atomic_dir(path, overwrite) as tmp:
    sums = dict(known_checksums) if known_checksums else checksums(flat, progress)
    opt_entries = None
    items = {"params": ocp.args.StandardSave(params)}
    if opt_state is not None:
      opt_flat = flatten(opt_state)
      opt_entries = _entries(opt_flat, checksums(opt_flat, progress, "checksum opt_state"))
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    nbytes = sum(_nbytes(x) for x in jax.tree.leaves((params, opt_state)))
    with _quiet_orbax(), _phase("orbax save", progress, nbytes):
      with _manager(tmp / ORBAX_DIR, tuple(items), read_only=False) as mngr:
        mngr.save(0, args=ocp.args.Composite(**items))
        mngr.wait_until_finished()
    manifest = Manifest(model=cfg, plan=plan, params=_entries(flat, sums), opt_state=opt_entries,
                        run=run, hardware=hardware, created=_now())
    _write_manifest(tmp, manifest)
  return manifest


@dataclass(frozen=True)
class Restored:
  params: dict
  opt_state: Any
  manifest: Manifest
  checksums: dict[str, str]        # recomputed from the restored arrays, equal to the manifest's


def _verify(flat: dict[str, Any], entries: dict[str, dict], where: str, progress: bool,
            prefix: str = "") -> dict[str, str]:
  if set(flat) != set(entries):
    raise CheckpointError(f"{where}: read {prefix or 'params/'}{sorted(flat)}, the manifest "
                          f"lists {sorted(entries)}")
  for p, x in flat.items():
    e = entries.get(p)
    if e is None:
      raise CheckpointError(f"{where}: {prefix}{p} is not in the manifest")
    if list(x.shape) != e["shape"] or _dtype_name(x.dtype) != e["dtype"]:
      raise CheckpointError(f"{where}: {prefix}{p} read as {_dtype_name(x.dtype)}"
                            f"{list(x.shape)}, the manifest says {e['dtype']}{e['shape']}")
  sums = checksums(flat, progress, f"verify {prefix or 'params'}".strip("/"))
  bad = [f"{prefix}{p} (manifest {entries[p]['checksum']}, data {s})"
         for p, s in sums.items() if s != entries[p]["checksum"]]
  if bad:
    raise CheckpointError(f"{where}: checksum mismatch, the array data is corrupted: "
                          f"{'; '.join(bad)}")
  return sums


def restore(path, cfg: ModelConfig | None = None, plan: Plan | None = None, *,
            opt_state: Any = False, progress: bool = False) -> Restored:
  """Read a checkpoint directory into `plan`'s shardings (None: one device) and verify it.

  opt_state: False skips it; True restores it in the stored structure with shardings derived
  from the parameters'; an abstract tree (e.g. jax.eval_shape(tx.init, params) with shardings)
  restores into that structure.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415
  path = Path(path).absolute()   # orbax wants absolute paths
  m = read_manifest(path)
  if m.container == "npz":
    return load_npz(path, cfg, plan, progress=progress)
  cfg = cfg or m.model
  check_model(cfg, m, str(path))
  check_plan(cfg, plan)
  want_opt = opt_state is not False and opt_state is not None
  if want_opt and m.opt_state is None:
    raise CheckpointError(f"{path}: holds no optimizer state")
  root = path / ORBAX_DIR
  try:
    with _quiet_orbax(), _phase("orbax restore", progress, m.param_bytes):
      names = ("params", "opt_state") if m.opt_state is not None else ("params",)
      with _manager(root, names, read_only=True) as mngr:
        if mngr.latest_step() != 0:
          raise CheckpointError(f"{path}: orbax holds steps {mngr.all_steps()}, expected [0]")
        items = {"params": ocp.args.StandardRestore(param_targets(cfg, plan))}
        if want_opt:
          if opt_state is True:
            stored = mngr.item_metadata(0)["opt_state"]
            target = _opt_targets(cfg, m.opt_state, getattr(stored, "tree", stored), plan)
          else:
            target = opt_state
          items["opt_state"] = ocp.args.StandardRestore(target)
        out = mngr.restore(0, args=ocp.args.Composite(**items))
  except CheckpointError:
    raise
  except Exception as e:  # tensorstore/orbax raise many types; all mean unreadable data
    raise CheckpointError(f"{path}: reading the array data failed, the checkpoint is damaged "
                          f"or incomplete ({_first_line(e)})") from e
  params = out["params"]
  sums = _verify(flatten(params), m.params, str(path), progress)
  opt = None
  if want_opt:
    opt = out["opt_state"]
    _verify(flatten(opt), m.opt_state, str(path), progress, prefix="opt_state/")
  return Restored(params=params, opt_state=opt, manifest=m, checksums=sums)


# --- npz -----------------------------------------------------------------------------------

def npz_manifest(path: Path) -> Manifest | None:
  try:   # our own handle: np.load leaks its file when the zip directory is unreadable
    with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
      if NPZ_MANIFEST_KEY not in z.files:
        return None
      text = str(z[NPZ_MANIFEST_KEY][()])
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise CheckpointError(f"{path}: not a readable .npz ({_first_line(e)})") from None
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: the embedded manifest is not valid JSON ({e})") from None
  m = Manifest.from_dict(d, str(path))
  if m.container != "npz":
    raise CheckpointError(f"{path}: embedded manifest says container {m.container!r}")
  return m


def _encode(a: np.ndarray) -> tuple[np.ndarray, str | None]:
  if a.dtype == ml_dtypes.bfloat16:
    return a.view(np.uint16), "uint16"
  return a, None


def _decode(a: np.ndarray, want: str, key: str, where: str) -> np.ndarray:
  if want == "bfloat16" and (a.dtype == np.uint16 or a.dtype == np.dtype("V2")):
    return a.view(ml_dtypes.bfloat16)
  if _dtype_name(a.dtype) != want:
    raise CheckpointError(f"{where}: {key} is {a.dtype}, the model wants {want}; jaxpart does "
                          f"not cast on import (it would round)")
  return a


def _write_npy(zf: zipfile.ZipFile, key: str, a: np.ndarray) -> None:
  """What np.savez does for one entry, so a large model is written one leaf at a time."""
  with zf.open(key + ".npy", "w", force_zip64=True) as f:
    np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    raise CheckpointError("npz export reads whole leaves on one host; run it as one process")
  return np.asarray(x)


def export_npz(path, params, cfg: ModelConfig, *, layout: str = "stacked", stages: int = 1,
               run: dict | None = None, hardware: str | None = None, overwrite: bool = False,
               progress: bool = False, known_checksums: dict[str, str] | None = None) -> Manifest:
  """Write params to an .npz named by parameter path; one leaf is on the host at a time."""
  path = Path(path).absolute()   # orbax wants absolute paths
  _check_layout(layout)
  if path.suffix != ".npz":
    raise CheckpointError(f"{path}: an npz export must end in .npz")
  flat = flatten(params)
  _check_tree(flat, cfg)
  if layout == "per_stage" and cfg.layers % stages:
    raise CheckpointError(f"per_stage layout: stages = {stages} does not divide layers = "
                          f"{cfg.layers}")
  check_destination(path, overwrite)
  sums = dict(known_checksums) if known_checksums else checksums(flat, progress)
  tmp = path.with_name(f".{path.name}.partial")
  entries = _entries(flat, sums)
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
      for p, x in _progress(flat.items(), "write npz", flat, progress):
        for key, a in split_leaf(p, _host(x), layout, stages):
          a, stored_as = _encode(a)
          if stored_as:
            entries[p]["stored_as"] = stored_as
          _write_npy(zf, key, a)
      manifest = Manifest(model=cfg, plan=None, params=entries, layout=layout,
                          layout_stages=stages if layout == "per_stage" else 1, run=run,
                          hardware=hardware, container="npz", created=_now())
      _write_npy(zf, NPZ_MANIFEST_KEY, np.array(json.dumps(manifest.to_dict())))
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return manifest


def infer_layout(keys: Iterable[str]) -> str:
  return "per_layer" if any(k.startswith("layers/") for k in keys) else "stacked"


def load_npz(path, cfg: ModelConfig | None = None, plan: Plan | None = None, *,
             layout: str | None = None, progress: bool = False) -> Restored:
  """Read an .npz (jaxpart's, or another framework's named by parameter path) into `plan`'s
  shardings. Each leaf is read, checked and placed shard by shard before the next is read."""
  path = Path(path).absolute()   # orbax wants absolute paths
  if not path.is_file():
    raise CheckpointError(f"{path}: no such .npz file")
  m = npz_manifest(path)
  where = str(path)
  if m is not None:
    cfg = cfg or m.model
    check_model(cfg, m, where)
    layout, stages = m.layout, m.layout_stages
  elif cfg is None:
    raise CheckpointError(f"{path}: an .npz without a jaxpart manifest; name the model "
                          f"(--preset/--config/--set) to import it")
  check_plan(cfg, plan)
  want = _spec_table(cfg)
  shardings = flatten(param_shardings(plan))
  out, sums = {}, {}
  try:
    with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
      present = {k for k in z.files if k != NPZ_MANIFEST_KEY}
      if m is None:
        layout = layout or infer_layout(present)
        stages = 1
      _check_layout(layout)
      expected = {k for p in want for k in stored_keys(p, layout, cfg.layers)}
      missing, extra = sorted(expected - present), sorted(present - expected)
      if missing or extra:
        raise CheckpointError(f"{where}: layout {layout}: missing arrays {missing or 'none'}; "
                              f"unexpected arrays {extra or 'none'}")
      for p in _progress(want, "read npz", None, progress):
        host = join_leaf(p, lambda k, p=p: _decode(z[k], want[p]["dtype"], k, where), layout,
                         cfg.layers, stages)
        if list(host.shape) != want[p]["shape"]:
          raise CheckpointError(f"{where}: {p} has shape {list(host.shape)}, the model wants "
                                f"{want[p]['shape']}")
        out[p] = jax.make_array_from_callback(host.shape, shardings[p],
                                              lambda idx, h=host: h[idx])
  except CheckpointError:
    raise
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise CheckpointError(f"{where}: reading the arrays failed, the file is damaged or "
                          f"incomplete ({_first_line(e)})") from None
  if m is not None:
    sums = _verify(out, m.params, where, progress)
  else:
    sums = checksums(out, progress)
    m = Manifest(model=cfg, plan=None, params=_entries(out, sums), layout=layout,
                 container="npz")
  return Restored(params=unflatten(param_shapes(cfg), out), opt_state=None, manifest=m,
                  checksums=sums)


# --- conversion ----------------------------------------------------------------------------

def load(path, cfg: ModelConfig | None = None, plan: Plan | None = None, *,
         opt_state: Any = False, progress: bool = False) -> Restored:
  """Restore a checkpoint directory or an .npz into `plan`'s shardings."""
  path = Path(path).absolute()   # orbax wants absolute paths
  if path.suffix == ".npz" and path.is_file():
    if opt_state not in (False, None):
      raise CheckpointError(f"{path}: an .npz holds parameters only, no optimizer state")
    return load_npz(path, cfg, plan, progress=progress)
  return restore(path, cfg, plan, opt_state=opt_state, progress=progress)


def source_plan_if_present(m: Manifest) -> Plan | None:
  """The source's own placement when this process has its devices, else unsharded."""
  if m.plan is not None and len(jax.devices()) >= m.plan.devices:
    return m.plan
  return None


def convert(src, dst, plan: Plan | None = None, *, cfg: ModelConfig | None = None,
            overwrite: bool = False, npz_layout: str = "stacked", progress: bool = False,
            run: dict | None = None, hardware: str | None = None) -> dict:
  """src (directory or .npz) -> dst (directory placed as `plan`, or .npz), verified bit-exact.

  Everything that can be refused is refused before anything is written: the source's manifest,
  the model, the target plan, the destination. The source is only read. run and hardware are
  recorded when the source has none (a foreign .npz).
  """
  t0 = time.perf_counter()
  src, dst = Path(src).absolute(), Path(dst).absolute()
  if not src.exists():
    raise CheckpointError(f"{src}: no such checkpoint (the path does not exist)")
  to_npz = dst.suffix == ".npz"
  src_m = read_manifest(src) if (src.is_dir() or npz_manifest(src) is not None) else None
  if src_m is not None:
    cfg = cfg or src_m.model
    check_model(cfg, src_m, str(src))
  elif cfg is None:
    raise CheckpointError(f"{src}: an .npz without a jaxpart manifest; name the model "
                          f"(--preset/--config/--set) to import it")
  if to_npz and plan is not None:
    raise CheckpointError(f"{dst}: an .npz is unsharded; give no target strategy (or "
                          f"'{UNSHARDED}') for an npz export")
  _check_layout(npz_layout)
  check_plan(cfg, plan)
  check_destination(dst, overwrite, src)

  read_plan = source_plan_if_present(src_m) if to_npz and src_m is not None else plan
  carry_opt = src_m is not None and src_m.opt_state is not None and not to_npz
  r = load(src, cfg, read_plan, opt_state=carry_opt, progress=progress)
  run = r.manifest.run or run
  hw = r.manifest.hardware or hardware
  stages = 1
  if to_npz:
    stages = r.manifest.plan.stages if (npz_layout == "per_stage" and r.manifest.plan) else 1
    out_m = export_npz(dst, r.params, cfg, layout=npz_layout, stages=stages, run=run, hardware=hw,
                       overwrite=overwrite, progress=progress, known_checksums=r.checksums)
  else:
    out_m = save(dst, r.params, cfg, plan, opt_state=r.opt_state, run=run, hardware=hw,
                 overwrite=overwrite, progress=progress, known_checksums=r.checksums)
  # out_m's checksums were computed on the arrays as placed for the target (in load); they
  # equal the source's, or load would have refused. `jaxpart verify DST` re-reads what was written.
  src_sums = {p: e["checksum"] for p, e in (src_m.params if src_m else {}).items()}
  return {
      "source": str(src), "destination": str(dst),
      "source_placement": src_m.placement if src_m else "npz (no manifest)",
      "source_layout": r.manifest.layout,
      "target_placement": "npz" if to_npz else placement_name(plan),
      "target_layout": out_m.layout, "layout_stages": out_m.layout_stages,
      "plan": None if plan is None else plan.to_dict(),
      "leaves": len(out_m.params), "param_bytes": out_m.param_bytes,
      "opt_state_leaves": len(out_m.opt_state or {}),
      "opt_state_dropped": bool(src_m and src_m.opt_state and to_npz),
      "checksums_verified": True,
      "bit_exact_vs_source": (not src_sums or
                              all(src_sums[p] == e["checksum"] for p, e in out_m.params.items())),
      "checksums": {p: e["checksum"] for p, e in out_m.params.items()},
      "seconds": time.perf_counter() - t0,
  }


# --- progress ------------------------------------------------------------------------------

def _nbytes(x) -> int:
  return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def _progress(items, desc: str, sized: dict | None, enabled: bool):
  """tqdm over leaves, counting bytes when sizes are known; silent unless enabled."""
  if not enabled:
    yield from items
    return
  from tqdm import tqdm  # noqa: PLC0415
  items = list(items)
  if sized is None:
    yield from tqdm(items, desc=desc, unit="leaf", leave=False)
    return
  with tqdm(total=sum(_nbytes(x) for x in sized.values()), desc=desc, unit="B",
            unit_scale=True, leave=False) as bar:
    for item in items:
      yield item
      bar.update(_nbytes(sized[item[0] if isinstance(item, tuple) else item]))


@contextlib.contextmanager
def _phase(desc: str, enabled: bool, nbytes: int) -> Iterator[None]:
  """A bar for one call that reports no progress of its own (orbax save and restore, the
  jitted checksums): it fills when the call returns and shows the bytes per second."""
  if not enabled:
    yield
    return
  from tqdm import tqdm  # noqa: PLC0415
  with tqdm(total=nbytes, desc=desc, unit="B", unit_scale=True, leave=False) as bar:
    yield
    bar.update(nbytes)


def _now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%S%z")

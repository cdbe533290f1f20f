"""What a checkpoint says it holds: leaf paths, the on-disk layouts, and the manifest.

Layout. Under every Plan the parameters are one tree whose leaves are stacked on a leading layer
axis split over the `stage` mesh axis: the stored arrays are the same global arrays whatever the
placement, and orbax (tensorstore) reads each device's shard for any target sharding without
gathering the model anywhere. The orbax layout is therefore always "stacked"; a per-stage layout
there would tie the stored shapes to one Plan's stage count. Other frameworks keep layers apart
("per_layer": layers/3/attn/wq) or grouped as pipeline stages hold them ("per_stage":
[S, L/S, ...]); split_leaf / join_leaf convert between these at the npz boundary, and the
manifest records which one a file uses.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import ml_dtypes
import numpy as np

from jaxpart import config
from jaxpart.checkpoint import schema
from jaxpart.checkpoint.schema import CheckpointError
from jaxpart.config import ConfigError, ModelConfig
from jaxpart.errors import first_line
from jaxpart.models.families import param_shapes
from jaxpart.models.llama import EDGE_KEYS
from jaxpart.placement.plan import Plan, PlanError

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


def dtype_name(dtype) -> str:
  return np.dtype(dtype).name


def spec_table(cfg: ModelConfig) -> dict[str, dict]:
  return {p: {"shape": list(s.shape), "dtype": dtype_name(s.dtype)}
          for p, s in flatten(param_shapes(cfg)).items()}


def check_tree(flat: dict[str, Any], cfg: ModelConfig) -> None:
  want = spec_table(cfg)
  if set(flat) != set(want):
    raise CheckpointError(f"parameter tree has leaves {sorted(flat)}, the model has "
                          f"{sorted(want)}")
  for p, x in flat.items():
    if list(x.shape) != want[p]["shape"] or dtype_name(x.dtype) != want[p]["dtype"]:
      raise CheckpointError(f"{p} is {dtype_name(x.dtype)}{list(x.shape)}, the model wants "
                            f"{want[p]['dtype']}{want[p]['shape']}")


def leaf_entries(flat: dict[str, Any], sums: dict[str, str]) -> dict[str, dict]:
  return {p: {"shape": list(x.shape), "dtype": dtype_name(x.dtype), "checksum": sums[p]}
          for p, x in flat.items()}


# --- layouts -------------------------------------------------------------------------------

def check_layout(layout: str, allowed: Iterable[str] = LAYOUTS) -> None:
  if layout not in allowed:
    raise CheckpointError(f"layout = {layout!r}: valid layouts here are {', '.join(allowed)}")


def _edge(path: str) -> bool:
  """Embedding, final norm and LM head: no layer axis, stored whole in every layout."""
  return path.split("/", 1)[0] in EDGE_KEYS


def split_leaf(path: str, arr, layout: str, stages: int = 1) -> list[tuple[str, Any]]:
  """A stacked [L, ...] leaf as `layout` stores it: (key, array) pairs."""
  check_layout(layout)
  if layout == "stacked" or _edge(path):
    return [(path, arr)]
  if layout == "per_layer":
    return [(f"layers/{i}/{path}", arr[i]) for i in range(arr.shape[0])]
  layers = arr.shape[0]
  if stages <= 0 or layers % stages:
    raise CheckpointError(f"per_stage layout: stages = {stages} does not divide layers = {layers}")
  return [(path, arr.reshape((stages, layers // stages) + tuple(arr.shape[1:])))]


def stored_keys(path: str, layout: str, layers: int) -> list[str]:
  if layout == "per_layer" and not _edge(path):
    return [f"layers/{i}/{path}" for i in range(layers)]
  return [path]


def join_leaf(path: str, get: Callable[[str], np.ndarray], layout: str, layers: int,
              stages: int = 1) -> np.ndarray:
  """Inverse of split_leaf: the stacked [L, ...] leaf from `layout`'s stored arrays."""
  check_layout(layout)
  if layout == "stacked" or _edge(path):
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


def infer_layout(keys: Iterable[str]) -> str:
  return "per_layer" if any(k.startswith("layers/") for k in keys) else "stacked"


# --- the manifest --------------------------------------------------------------------------

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
  files: dict[str, dict] | None = None     # orbax/ files as written (inventory.py); None: npz

  @property
  def placement(self) -> str:
    return "npz file (unsharded)" if self.container == "npz" else placement_name(self.plan)

  @property
  def param_bytes(self) -> int:
    return sum(int(np.prod(e["shape"])) * np.dtype(np_dtype(e["dtype"])).itemsize
               for e in self.params.values())

  def to_dict(self) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": VERSION, "container": self.container,
        "created": self.created, "layout": self.layout, "layout_stages": self.layout_stages,
        "checksum_algo": CHECKSUM_ALGO, "model": config.to_dict(self.model),
        "run": self.run, "hardware": self.hardware, "placement": self.placement,
        "plan": None if self.plan is None else self.plan.to_dict(),
        "params": self.params, "opt_state": self.opt_state, "files": self.files,
    }

  @classmethod
  def from_dict(cls, d: Any, where: str) -> "Manifest":
    """Structure first (schema.py: every key, one line naming a wrong one), then meaning."""
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
    container = schema.require(d, "container", where, lambda v: v in ("orbax", "npz"),
                               "'orbax' or 'npz'")
    layout = schema.require(d, "layout", where, lambda v: v in LAYOUTS,
                            f"one of {', '.join(LAYOUTS)}")
    stages = schema.optional(d, "layout_stages", where, schema.positive_int,
                             "a positive integer (the stage count of a per_stage layout)")
    created = schema.optional(d, "created", where, schema.is_str, "a time stamp (string)")
    hardware = schema.optional(d, "hardware", where, schema.is_str, "a hardware name (string)")
    params = schema.leaf_table(d, "params", where, required=True)
    opt_state = schema.leaf_table(d, "opt_state", where, required=False)
    files = schema.file_table(d, where)
    schema.optional(d, "plan", where, lambda v: isinstance(v, dict), "a Plan object or null")
    try:
      model = schema.build(ModelConfig, d, "model", where)
      plan = None if d.get("plan") is None else Plan.from_dict(d["plan"])
      if d.get("run") is not None:
        schema.build(config.RunShape, d, "run", where)
    except (TypeError, ConfigError, PlanError) as e:
      raise CheckpointError(f"{where}: manifest model/plan/run is invalid: {e}") from None
    want = spec_table(model)
    if set(params) != set(want):
      raise CheckpointError(f"{where}: manifest leaves {sorted(params)} are not the model's "
                            f"{sorted(want)}")
    for p, e in params.items():
      if e["shape"] != want[p]["shape"] or e["dtype"] != want[p]["dtype"]:
        raise CheckpointError(f"{where}: manifest says {p} is {e['dtype']}{e['shape']}, "
                              f"the model has {want[p]['dtype']}{want[p]['shape']}")
    return cls(model=model, plan=plan, params=params, opt_state=opt_state, layout=layout,
               layout_stages=stages or 1, run=d.get("run"), hardware=hardware,
               container=container, created=created or "", files=files)


@dataclass(frozen=True)
class Restored:
  params: dict
  opt_state: Any
  manifest: Manifest
  checksums: dict[str, str]        # recomputed from the restored arrays, equal to the manifest's
  nonfinite: dict[str, str] = field(default_factory=dict)   # allowed by allow_nonfinite
  files_checked: int = 0           # orbax/ files matched against the manifest's list


def placement_name(plan: Plan | None) -> str:
  if plan is None:
    return UNSHARDED
  return f"{plan.strategy} {plan.stages} stages x tp {plan.tp} ({plan.devices} devices)"


def np_dtype(name: str):
  return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def check_model(requested: ModelConfig, manifest: Manifest, where: str) -> None:
  """Refuse a restore into a different model, naming every field that differs."""
  have, want = config.to_dict(manifest.model), config.to_dict(requested)
  diff = [f"{k} = {want[k]!r} (checkpoint has {have[k]!r})" for k in want if have[k] != want[k]]
  if diff:
    raise CheckpointError(f"{where} was saved for a different model: {'; '.join(diff)}")


def _read_json(path: Path, where: str) -> Any:
  try:
    data = path.read_bytes()
  except OSError as e:
    raise CheckpointError(f"{where}: {MANIFEST} cannot be read ({e.strerror or first_line(e)}): "
                          f"expected a readable file") from None
  try:
    return json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{where}: {MANIFEST} is not UTF-8 text (byte {data[e.start]:#04x} at "
                          f"offset {e.start}): expected the JSON jaxpart writes; the checkpoint "
                          f"is damaged") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{where}: {MANIFEST} is not valid JSON ({e}): expected the JSON "
                          f"jaxpart writes; the checkpoint is damaged") from None


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


def npz_manifest(path: Path) -> Manifest | None:
  try:   # our own handle: np.load leaks its file when the zip directory is unreadable
    with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
      if NPZ_MANIFEST_KEY not in z.files:
        return None
      text = str(z[NPZ_MANIFEST_KEY][()])
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise CheckpointError(f"{path}: not a readable .npz ({first_line(e)})") from None
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: the embedded manifest is not valid JSON ({e})") from None
  m = Manifest.from_dict(d, str(path))
  if m.container != "npz":
    raise CheckpointError(f"{path}: embedded manifest says container {m.container!r}")
  return m


def now() -> str:
  return time.strftime("%Y-%m-%dT%H:%M:%S%z")

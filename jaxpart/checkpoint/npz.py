"""npz import and export, one leaf on the host at a time, in any layout.

bf16 in npz: numpy has no bfloat16 and np.save writes ml_dtypes.bfloat16 as an opaque |V2, so
bf16 leaves are stored as their uint16 bit patterns; the embedded manifest (entry
__jaxpart_manifest__, a JSON string) records dtype "bfloat16", stored_as "uint16", and import
views the bits back as bfloat16: exact. Foreign npz files without a manifest may hold bf16 as
uint16 bits, or as |V2, for a bfloat16 model.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from jaxpart.checkpoint.atomic import check_destination, write_failed
from jaxpart.checkpoint.bars import leaf_bar
from jaxpart.checkpoint.digest import check_finite, checksums, verify
from jaxpart.checkpoint.manifest import (NPZ_MANIFEST_KEY, CheckpointError, Manifest, Restored,
                                         check_layout, check_model, check_tree, dtype_name,
                                         flatten, infer_layout, join_leaf, leaf_entries,
                                         now, npz_manifest, spec_table, split_leaf,
                                         stored_keys, unflatten)
from jaxpart.checkpoint.placement import check_plan, param_shardings
from jaxpart.config import ModelConfig
from jaxpart.errors import first_line
from jaxpart.models.families import param_shapes
from jaxpart.placement.plan import Plan

def _encode(a: np.ndarray) -> tuple[np.ndarray, str | None]:
  if a.dtype == ml_dtypes.bfloat16:
    return a.view(np.uint16), "uint16"
  return a, None


def _decode(a: np.ndarray, want: str, key: str, where: str) -> np.ndarray:
  if want == "bfloat16" and (a.dtype == np.uint16 or a.dtype == np.dtype("V2")):
    return a.view(ml_dtypes.bfloat16)
  if dtype_name(a.dtype) != want:
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
  check_layout(layout)
  if path.suffix != ".npz":
    raise CheckpointError(f"{path}: an npz export must end in .npz")
  flat = flatten(params)
  check_tree(flat, cfg)
  if layout == "per_stage" and cfg.layers % stages:
    raise CheckpointError(f"per_stage layout: stages = {stages} does not divide layers = "
                          f"{cfg.layers}")
  check_destination(path, overwrite)
  sums = dict(known_checksums) if known_checksums else checksums(flat, progress)
  tmp = path.with_name(f".{path.name}.partial")
  entries = leaf_entries(flat, sums)
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
      for p, x in leaf_bar(flat.items(), "write npz", flat, progress):
        for key, a in split_leaf(p, _host(x), layout, stages):
          a, stored_as = _encode(a)
          if stored_as:
            entries[p]["stored_as"] = stored_as
          _write_npy(zf, key, a)
      manifest = Manifest(model=cfg, plan=None, params=entries, layout=layout,
                          layout_stages=stages if layout == "per_stage" else 1, run=run,
                          hardware=hardware, container="npz", created=now())
      _write_npy(zf, NPZ_MANIFEST_KEY, np.array(json.dumps(manifest.to_dict())))
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:   # a full disk, Ctrl-C: the hidden file goes, path is as it was
    tmp.unlink(missing_ok=True)
    if isinstance(e, OSError):
      raise write_failed(path, e) from e
    raise
  return manifest


def load_npz(path, cfg: ModelConfig | None = None, plan: Plan | None = None, *,
             layout: str | None = None, progress: bool = False,
             allow_nonfinite: bool = False) -> Restored:
  """Read an .npz (jaxpart's, or another framework's named by parameter path) into `plan`'s
  shardings. Each leaf is read, checked and placed shard by shard before the next is read;
  NaN or Inf anywhere is refused unless allow_nonfinite."""
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
  want = spec_table(cfg)
  shardings = flatten(param_shardings(plan, cfg))
  out, sums = {}, {}
  try:
    with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
      present = {k for k in z.files if k != NPZ_MANIFEST_KEY}
      if m is None:
        layout = layout or infer_layout(present)
        stages = 1
      check_layout(layout)
      expected = {k for p in want for k in stored_keys(p, layout, cfg.layers)}
      missing, extra = sorted(expected - present), sorted(present - expected)
      if missing or extra:
        raise CheckpointError(f"{where}: layout {layout}: missing arrays {missing or 'none'}; "
                              f"unexpected arrays {extra or 'none'}")
      for p in leaf_bar(want, "read npz", None, progress):
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
                          f"incomplete ({first_line(e)})") from None
  if m is not None:
    sums = verify(out, m.params, where, progress)
  else:
    sums = checksums(out, progress)
    m = Manifest(model=cfg, plan=None, params=leaf_entries(out, sums), layout=layout,
                 container="npz")
  bad = check_finite(out, where, allow_nonfinite, progress)
  return Restored(params=unflatten(param_shapes(cfg), out), opt_state=None, manifest=m,
                  checksums=sums, nonfinite=bad)

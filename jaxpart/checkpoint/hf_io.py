"""Hugging Face model directories in and out of jaxpart checkpoints, proven bit-exact.

Import reads config.json and the safetensors files tensor by tensor into one host tree (each
stacked [L, ...] leaf filled in place: the model is held once on the host), places it as the
Plan says and writes the checkpoint; the checksums of what was read and of what was written
must agree. Export restores a checkpoint unsharded, writes the safetensors files and reads them
back: their checksums must equal the checkpoint's.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxpart.checkpoint import hf
from jaxpart.checkpoint.atomic import check_destination, write_failed
from jaxpart.checkpoint.digest import check_finite, checksums
from jaxpart.checkpoint.manifest import CheckpointError, flatten, placement_name, read_manifest
from jaxpart.checkpoint.orbax_io import restore, save
from jaxpart.config import ModelConfig
from jaxpart.models import families
from jaxpart.placement.plan import Plan


def is_hf_dir(path) -> bool:
  """A directory with a Hugging Face config.json and no jaxpart manifest."""
  path = Path(path)
  return path.is_dir() and (path / "config.json").is_file() and not (
      path / "manifest.json").exists()


def import_hf(src, dst, plan: Plan | None, *, cfg: ModelConfig | None = None,
              overwrite: bool = False, progress: bool = False, run: dict | None = None,
              hardware: str | None = None, allow_nonfinite: bool = False) -> dict[str, Any]:
  """HF directory -> jaxpart checkpoint placed as `plan` (None: unsharded); NaN or Inf in the
  safetensors is refused before anything is written, unless allow_nonfinite."""
  t0 = time.perf_counter()
  src, dst = Path(src).absolute(), Path(dst).absolute()
  hf_cfg = hf.read_config(str(src))
  if cfg is not None and cfg != hf_cfg:
    diff = [k for k in hf_cfg.__dataclass_fields__ if getattr(cfg, k) != getattr(hf_cfg, k)]
    raise CheckpointError(f"{src}: the model flags differ from its config.json in "
                          f"{', '.join(diff)}; leave --preset/--set out to take the file's")
  check_destination(dst, overwrite)
  cfg, tree = hf.read_hf(str(src))
  check_finite(flatten(tree), str(src), allow_nonfinite, progress)
  read_sums = checksums(flatten(tree), progress, "checksum read")
  m = save(dst, tree, cfg, plan, run=run, hardware=hardware, overwrite=overwrite,
           progress=progress)
  written = {p: e["checksum"] for p, e in m.params.items()}
  return _report(src, dst, "huggingface", placement_name(plan), read_sums, written, m, t0)


def export_hf(src, dst, *, overwrite: bool = False, progress: bool = False,
              model_type: str | None = None, allow_nonfinite: bool = False) -> dict[str, Any]:
  """jaxpart checkpoint (any placement) -> HF directory, read back and checked."""
  t0 = time.perf_counter()
  src, dst = Path(src).absolute(), Path(dst).absolute()
  m = read_manifest(src)
  if families.of(m.model).hf_names is None:
    raise CheckpointError(f"{src}: model arch {m.model.arch!r}; Hugging Face export takes a "
                          f"family with a Hugging Face name map: "
                          f"{', '.join(n for n, f in families.FAMILIES.items() if f.hf_names)}")
  check_destination(dst, overwrite)
  r = restore(src, m.model, None, progress=progress,   # verified against its checksums
              allow_nonfinite=allow_nonfinite)
  tree = _host(r.params)
  # Written beside DST under a hidden name and renamed when checked: DST is never half there.
  tmp = dst.with_name(f".{dst.name}.partial")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    hf.write_hf(tree, m.model, str(tmp), model_type=model_type, overwrite=True)
    _, back = hf.read_hf(str(tmp))
    report = _report(src, dst, placement_name(m.plan), "huggingface", r.checksums,
                     checksums(flatten(back), progress, "checksum written"), m, t0)
    old = dst.with_name(f".{dst.name}.replaced")   # an old DST steps aside, then goes
    if dst.exists():
      shutil.rmtree(old, ignore_errors=True)
      os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
  except OSError as e:   # a full disk, a read-only folder: one line; finally removes the copy
    raise write_failed(dst, e) from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return report


def _host(tree):
  return {k: _host(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


def _report(src, dst, source, target, want: dict[str, str], got: dict[str, str], m,
            t0: float) -> dict[str, Any]:
  bad = sorted(p for p in want if want[p] != got.get(p))
  if bad or set(want) != set(got):
    raise CheckpointError(f"{dst}: {len(bad)} leaves differ from {src} after conversion, e.g. "
                          f"{bad[:3]}; nothing here is bit-exact")
  nbytes = sum(int(np.prod(e["shape"])) * np.dtype(e["dtype"]).itemsize
               for e in m.params.values())
  return {"source": str(src), "destination": str(dst), "source_placement": source,
          "target_placement": target, "leaves": len(want), "param_bytes": nbytes,
          "bit_exact_vs_source": True, "checksums": got, "seconds": time.perf_counter() - t0}

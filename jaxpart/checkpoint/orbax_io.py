"""Save and restore a checkpoint directory with orbax: each device writes and reads its own
shard, into any target Plan's shardings; every restore is checked against the manifest: the
files orbax wrote (inventory.py), then every leaf's checksum, then that every value is finite."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from jaxpart.checkpoint.atomic import atomic_dir, check_destination, primary, write_failed
from jaxpart.checkpoint.bars import array_bytes, phase
from jaxpart.checkpoint import inventory
from jaxpart.checkpoint.digest import check_finite, checksums, verify
from jaxpart.checkpoint.manifest import (MANIFEST, ORBAX_DIR, CheckpointError, Manifest,
                                         Restored, check_model, check_tree, flatten,
                                         leaf_entries, now, read_manifest)
from jaxpart.checkpoint.npz import load_npz
from jaxpart.checkpoint.placement import check_plan, opt_targets, param_targets, place
from jaxpart.config import ModelConfig
from jaxpart.errors import first_line
from jaxpart.placement.plan import Plan

@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """orbax logs a warning for every read-only manager, and a failed write logs its traceback
  once from each writer thread; we report the failure once, as one line, so keep them quiet."""
  _drop_closed_loop_reports()
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _orphaned_orbax_write(record: logging.LogRecord) -> bool:
  """False (drop it) for asyncio's report of an orbax write task whose failure nobody collected:
  orbax abandons its other writes once one fails, and we have reported the failure already."""
  text = record.getMessage()
  # asyncio words it "<class name> exception was never retrieved": Task, Future, _GatheringFuture
  first = text.split("\n", 1)[0]
  return not (first.endswith("exception was never retrieved") and "orbax" in text)


def _drop_closed_loop_reports() -> None:
  """After a failed write orbax closes its event loop while tensorstore still completes the
  other writes; each completion reports `RuntimeError: Event loop is closed` as unraisable, and
  each abandoned write task is logged by asyncio when collected, possibly after the save has
  returned. Those (and only those) are dropped for the process."""
  asyncio_log = logging.getLogger("asyncio")
  if _orphaned_orbax_write not in asyncio_log.filters:
    asyncio_log.addFilter(_orphaned_orbax_write)
  hook = sys.unraisablehook
  if getattr(hook, "_jaxpart_drops_closed_loop", False):
    return

  def drop(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      hook(unraisable)
  drop._jaxpart_drops_closed_loop = True
  sys.unraisablehook = drop


def _manager(root: Path, items: tuple[str, ...], read_only: bool):
  opts = ocp.CheckpointManagerOptions(
      read_only=read_only, create=not read_only, save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=False)   # no background writer thread outlives a call
  return ocp.CheckpointManager(root, item_names=items,
                               item_handlers={n: ocp.StandardCheckpointHandler() for n in items},
                               options=opts)


def _write_manifest(dirpath: Path, manifest: Manifest) -> None:
  if not primary():
    return
  with open(dirpath / MANIFEST, "w") as f:
    json.dump(manifest.to_dict(), f, indent=1)
    f.flush()
    os.fsync(f.fileno())


def save(path, params, cfg: ModelConfig, plan: Plan | None = None, *, opt_state=None,
         run: dict | None = None, hardware: str | None = None, overwrite: bool = False,
         progress: bool = False, known_checksums: dict[str, str] | None = None) -> Manifest:
  """Write params (placed as `plan` says; None: unsharded) and optionally optimizer state.

  known_checksums: the verified checksums of exactly these arrays (a conversion has them from
  its restore), to skip computing them twice.
  """
  path = Path(path).absolute()   # orbax wants absolute paths
  if plan is None and jax.process_count() > 1:
    raise CheckpointError("an unsharded checkpoint is written by one process; save with a Plan")
  check_plan(cfg, plan)
  params = place(params, plan, cfg)
  flat = flatten(params)
  check_tree(flat, cfg)
  check_destination(path, overwrite)
  with atomic_dir(path, overwrite) as tmp:
    sums = dict(known_checksums) if known_checksums else checksums(flat, progress)
    opt_entries = None
    items = {"params": ocp.args.StandardSave(params)}
    if opt_state is not None:
      opt_flat = flatten(opt_state)
      opt_entries = leaf_entries(opt_flat, checksums(opt_flat, progress, "checksum opt_state"))
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    nbytes = sum(array_bytes(x) for x in jax.tree.leaves((params, opt_state)))
    with _quiet_orbax(), phase("orbax save", progress, nbytes):
      try:
        with _manager(tmp / ORBAX_DIR, tuple(items), read_only=False) as mngr:
          mngr.save(0, args=ocp.args.Composite(**items))
          mngr.wait_until_finished()
      except OSError:
        raise                       # atomic_dir names the destination and the cause
      except Exception as e:  # tensorstore/orbax raise many types; all mean the write failed
        raise write_failed(path, e) from e   # atomic_dir removes the partial write
    files = inventory.record(tmp, ORBAX_DIR) if primary() else None
    manifest = Manifest(model=cfg, plan=plan, params=leaf_entries(flat, sums),
                        opt_state=opt_entries, run=run, hardware=hardware, created=now(),
                        files=files)
    _write_manifest(tmp, manifest)
  return manifest


def restore(path, cfg: ModelConfig | None = None, plan: Plan | None = None, *,
            opt_state: Any = False, progress: bool = False,
            allow_nonfinite: bool = False) -> Restored:
  """Read a checkpoint directory into `plan`'s shardings (None: one device) and verify it.

  opt_state: False skips it; True restores it in the stored structure with shardings derived
  from the parameters'; an abstract tree (e.g. jax.eval_shape(tx.init, params) with shardings)
  restores into that structure.
  """
  path = Path(path).absolute()   # orbax wants absolute paths
  m = read_manifest(path)
  if m.container == "npz":
    return load_npz(path, cfg, plan, progress=progress, allow_nonfinite=allow_nonfinite)
  cfg = cfg or m.model
  check_model(cfg, m, str(path))
  check_plan(cfg, plan)
  want_opt = opt_state is not False and opt_state is not None
  if want_opt and m.opt_state is None:
    raise CheckpointError(f"{path}: holds no optimizer state")
  files_checked = inventory.check(path, ORBAX_DIR, m.files, str(path))
  root = path / ORBAX_DIR
  try:
    with _quiet_orbax(), phase("orbax restore", progress, m.param_bytes):
      names = ("params", "opt_state") if m.opt_state is not None else ("params",)
      with _manager(root, names, read_only=True) as mngr:
        if mngr.latest_step() != 0:
          raise CheckpointError(f"{path}: orbax holds steps {mngr.all_steps()}, expected [0]")
        items = {"params": ocp.args.StandardRestore(param_targets(cfg, plan))}
        if want_opt:
          if opt_state is True:
            stored = mngr.item_metadata(0)["opt_state"]
            target = opt_targets(cfg, m.opt_state, getattr(stored, "tree", stored), plan)
          else:
            target = opt_state
          items["opt_state"] = ocp.args.StandardRestore(target)
        out = mngr.restore(0, args=ocp.args.Composite(**items))
  except CheckpointError:
    raise
  except Exception as e:  # tensorstore/orbax raise many types; all mean unreadable data
    raise CheckpointError(f"{path}: reading the array data failed, the checkpoint is damaged "
                          f"or incomplete ({first_line(e)})") from e
  params = out["params"]
  sums = verify(flatten(params), m.params, str(path), progress)
  bad = check_finite(flatten(params), str(path), allow_nonfinite, progress)
  opt = None
  if want_opt:
    opt = out["opt_state"]
    verify(flatten(opt), m.opt_state, str(path), progress, prefix="opt_state/")
    bad |= check_finite(flatten(opt), str(path), allow_nonfinite, progress, prefix="opt_state/")
  return Restored(params=params, opt_state=opt, manifest=m, checksums=sums, nonfinite=bad,
                  files_checked=files_checked)

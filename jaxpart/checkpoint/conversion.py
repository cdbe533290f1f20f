"""Conversion between placements and containers: read the source into the target's shardings,
write it, and prove it bit-exact by the checksums."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax

from jaxpart.checkpoint.atomic import check_destination
from jaxpart.checkpoint.manifest import (UNSHARDED, CheckpointError, Manifest, Restored,
                                         check_layout, check_model, npz_manifest,
                                         placement_name, read_manifest)
from jaxpart.checkpoint.npz import export_npz, load_npz
from jaxpart.checkpoint.orbax_io import restore, save
from jaxpart.checkpoint.placement import check_plan
from jaxpart.config import ModelConfig
from jaxpart.placement.plan import Plan

def load(path, cfg: ModelConfig | None = None, plan: Plan | None = None, *,
         opt_state: Any = False, progress: bool = False,
         allow_nonfinite: bool = False) -> Restored:
  """Restore a checkpoint directory or an .npz into `plan`'s shardings; NaN or Inf weights are
  refused unless allow_nonfinite."""
  path = Path(path).absolute()   # orbax wants absolute paths
  if path.suffix == ".npz" and path.is_file():
    if opt_state not in (False, None):
      raise CheckpointError(f"{path}: an .npz holds parameters only, no optimizer state")
    return load_npz(path, cfg, plan, progress=progress, allow_nonfinite=allow_nonfinite)
  return restore(path, cfg, plan, opt_state=opt_state, progress=progress,
                 allow_nonfinite=allow_nonfinite)


def source_plan_if_present(m: Manifest) -> Plan | None:
  """The source's own placement when this process has its devices, else unsharded."""
  if m.plan is not None and len(jax.devices()) >= m.plan.devices:
    return m.plan
  return None


def convert(src, dst, plan: Plan | None = None, *, cfg: ModelConfig | None = None,
            overwrite: bool = False, npz_layout: str = "stacked", progress: bool = False,
            run: dict | None = None, hardware: str | None = None,
            allow_nonfinite: bool = False) -> dict:
  """src (directory or .npz) -> dst (directory placed as `plan`, or .npz), verified bit-exact.

  Everything that can be refused is refused before anything is written: the source's manifest,
  the model, the target plan, the destination. The source is only read. run and hardware are
  recorded when the source has none (a foreign .npz). NaN or Inf in the source is refused
  unless allow_nonfinite.
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
  check_layout(npz_layout)
  check_plan(cfg, plan)
  check_destination(dst, overwrite, src)

  read_plan = source_plan_if_present(src_m) if to_npz and src_m is not None else plan
  carry_opt = src_m is not None and src_m.opt_state is not None and not to_npz
  r = load(src, cfg, read_plan, opt_state=carry_opt, progress=progress,
           allow_nonfinite=allow_nonfinite)
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
      "checksums_verified": True, "nonfinite": r.nonfinite,
      "bit_exact_vs_source": (not src_sums or
                              all(src_sums[p] == e["checksum"] for p, e in out_m.params.items())),
      "checksums": {p: e["checksum"] for p, e in out_m.params.items()},
      "seconds": time.perf_counter() - t0,
  }

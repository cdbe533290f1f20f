"""`jaxpart verify PATH`: read a checkpoint (or .npz) back and check it against its manifest.

Restores into the checkpoint's own Plan when its devices are present (else one device), so
every array is read the way a run would read it, then recomputes every checksum.
"""

from __future__ import annotations

from jaxpart import checkpoint, config, distributed
from jaxpart.commands import _ckpt, _common

NAME = "verify"
HELP = "check a checkpoint or .npz: manifest, model, every leaf's checksum"
DISTRIBUTED = True


def add_arguments(p):
  p.add_argument("path", help="checkpoint directory or .npz")
  _ckpt.add_progress_arg(p)
  _common.add_json_arg(p)


def run(args) -> int:
  m = checkpoint.read_manifest(args.path)
  plan = checkpoint.source_plan_if_present(m)
  r = checkpoint.load(args.path, m.model, plan, opt_state=m.opt_state is not None,
                      progress=_ckpt.progress_from(args))
  specs = {p: str(getattr(x.sharding, "spec", "one device"))
           for p, x in checkpoint.flatten(r.params).items()}
  if not distributed.is_main():
    return 0
  if args.json:
    _common.emit_json({"path": args.path, "verified": True,
                       "read_as": checkpoint.placement_name(plan), "manifest": m.to_dict()})
    return 0
  print(f"{args.path}: {m.container}, {m.placement}, layout {m.layout}; model "
        + ", ".join(f"{k}={v}" for k, v in config.to_dict(m.model).items()))
  print(f"read as {checkpoint.placement_name(plan)}: {len(m.params)} leaves, "
        f"{_common.fmt_bytes(m.param_bytes)}"
        + (f", {len(m.opt_state)} optimizer-state leaves" if m.opt_state else "")
        + "; every checksum matches")
  print(_common.table(_ckpt.leaf_rows(m, specs), ["leaf", "shape", "dtype", "spec", "checksum"]))
  return 0

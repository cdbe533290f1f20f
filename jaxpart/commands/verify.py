"""`jaxpart verify PATH`: read a checkpoint (or .npz) back and check it against its manifest.

Restores into the checkpoint's own Plan when its devices are present (else one device), so
every array is read the way a run would read it, then recomputes every checksum. Before that the
files under orbax/ are matched against the list the manifest recorded at save (a deleted
metadata file or one byte short reads back bit-exact, so only the list can tell), and after it
every value must be finite unless --allow-nonfinite.
"""

from __future__ import annotations

from jaxpart import checkpoint, config
from jaxpart.runtime import distributed
from jaxpart.commands import _ckpt, _common

NAME = "verify"
HELP = "check a checkpoint or .npz: manifest, model, every leaf's checksum"
DISTRIBUTED = True


def add_arguments(p):
  p.add_argument("path", help="checkpoint directory or .npz")
  _ckpt.add_nonfinite_arg(p)
  _ckpt.add_progress_arg(p)
  _common.add_json_arg(p)


def run(args) -> int:
  m = checkpoint.read_manifest(args.path)
  plan = checkpoint.source_plan_if_present(m)
  r = checkpoint.load(args.path, m.model, plan, opt_state=m.opt_state is not None,
                      progress=_ckpt.progress_from(args), allow_nonfinite=args.allow_nonfinite)
  specs = {p: str(getattr(x.sharding, "spec", "one device"))
           for p, x in checkpoint.flatten(r.params).items()}
  if not distributed.is_main():
    return 0
  if args.json:
    _common.emit_json({"path": args.path, "verified": True,
                       "read_as": checkpoint.placement_name(plan), "files_checked": r.files_checked,
                       "nonfinite": r.nonfinite, "manifest": m.to_dict()})
    return 0
  print(f"{args.path}: {m.container}, {m.placement}, layout {m.layout}; model "
        + ", ".join(f"{k}={v}" for k, v in config.to_dict(m.model).items()))
  print(f"read as {checkpoint.placement_name(plan)}: {len(m.params)} leaves, "
        f"{_common.fmt_bytes(m.param_bytes)}"
        + (f", {len(m.opt_state)} optimizer-state leaves" if m.opt_state else "")
        + "; every checksum matches; " + _files_line(m, r))
  if note := _ckpt.nonfinite_note(r.nonfinite):
    print(note)
  print(_common.table(_ckpt.leaf_rows(m, specs), ["leaf", "shape", "dtype", "spec", "checksum"]))
  return 0



def _files_line(m, r) -> str:
  """What was checked of the files themselves, beside the checksums of what they hold."""
  if m.container == "npz":
    return "an .npz: its zip CRCs checked on read"
  if m.files is None:
    return "files not checked (no list recorded: saved before jaxpart kept one)"
  return f"all {r.files_checked} files under orbax/ as recorded at save"

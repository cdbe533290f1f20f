"""`jaxpart convert SRC DST`: a checkpoint into another placement, or to and from .npz.

SRC is a checkpoint directory, an .npz (jaxpart's, or another framework's named by parameter
path: then name the model with --preset/--config/--set), or a Hugging Face model directory
(config.json and safetensors: the Llama family). DST is a directory, written placed as
--to-strategy says, or an .npz (unsharded; --npz-layout picks stacked, per_layer or per_stage),
or with --to-format hf a Hugging Face directory.
The source's checksums are verified on read and must come out unchanged: the conversion is
bit-exact or it fails. Nothing is written until every check has passed, and DST appears only
complete (written to a hidden sibling, then renamed): a full disk ends in one line (exit 2),
Ctrl-C in one line (exit 130), each with the hidden sibling removed and DST as it was. Weights
holding NaN or Inf are refused unless --allow-nonfinite.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxpart import checkpoint, config
from jaxpart.runtime import distributed
from jaxpart.checkpoint import hf
from jaxpart.commands import _ckpt, _common

NAME = "convert"
HELP = "convert a checkpoint between placements, or to/from .npz, verified bit-exact"
DISTRIBUTED = True


def add_arguments(p):
  p.add_argument("src", help="checkpoint directory, or .npz to import")
  p.add_argument("dst", help="checkpoint directory to write, or .npz to export")
  _ckpt.add_target_args(p, "--to-strategy", default=None)
  p.add_argument("--npz-layout", default="stacked", choices=_ckpt.LAYOUTS,
                 help="how an .npz destination stores layers: stacked [L,...] under attn/wq, "
                      "per_layer under layers/<i>/attn/wq, per_stage [S, L/S, ...] as the "
                      "source Plan's stages hold them")
  p.add_argument("--to-format", choices=("jaxpart", "hf"), default="jaxpart",
                 help="hf: write DST as a Hugging Face model directory (config.json and "
                      "safetensors) from a jaxpart checkpoint of the Llama family")
  p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  _ckpt.add_nonfinite_arg(p)
  _ckpt.add_progress_arg(p)
  _common.add_setup_args(p)
  _common.add_json_arg(p)


def interrupted(args) -> str:
  """What cli.py says after Ctrl-C: the writers have removed DST's hidden partial copy."""
  return _ckpt.interrupted(args.dst)


def run(args) -> int:
  src, dst = Path(args.src), Path(args.dst)
  if not src.exists():
    raise checkpoint.CheckpointError(f"{src}: no such checkpoint (the path does not exist)")
  if args.to_format == "hf" or checkpoint.is_hf_dir(src):
    return _huggingface(args, src, dst)
  manifest = None
  if src.is_dir() or checkpoint.npz_manifest(src) is not None:
    manifest = checkpoint.read_manifest(src)
  if dst.suffix != ".npz" and args.strategy is None:
    raise checkpoint.CheckpointError(
        f"{dst}: a checkpoint directory needs a placement: give --to-strategy (baseline, "
        f"layerwise, auto or unsharded) and --devices")
  setup = _ckpt.setup_for_target(args, manifest)
  if manifest is not None:
    checkpoint.check_model(setup.model, manifest, str(src))
  plan = _ckpt.target_plan(args, setup)
  report = checkpoint.convert(src, dst, plan, cfg=setup.model, overwrite=args.overwrite,
                              npz_layout=args.npz_layout, progress=_ckpt.progress_from(args),
                              run=config.to_dict(setup.run), hardware=setup.hardware.name,
                              allow_nonfinite=args.allow_nonfinite)
  ok = report["bit_exact_vs_source"]
  if not distributed.is_main():
    return 0 if ok else 1
  if args.json:
    _common.emit_json(report)
    return 0 if ok else 1
  out = checkpoint.read_manifest(dst)
  print(f"converted {src} -> {dst}")
  print(f"  from  {report['source_placement']}, layout {report['source_layout']}")
  print(f"  to    {report['target_placement']}, layout {report['target_layout']}"
        + (f" ({report['layout_stages']} stages)" if report["target_layout"] == "per_stage"
           else ""))
  if plan is not None:
    print(f"  plan  {plan.split}; {plan.reason}")
  print(f"  {report['leaves']} leaves, {_common.fmt_bytes(report['param_bytes'])} of parameters"
        + (f", {report['opt_state_leaves']} optimizer-state leaves" if report["opt_state_leaves"]
           else "")
        + "; checksums verified on read; bit-exact vs source: "
        + ("yes" if report["bit_exact_vs_source"] else "NO") + f"; {report['seconds']:.1f} s")
  if note := _ckpt.nonfinite_note(report["nonfinite"]):
    print(note)
  if report["opt_state_dropped"]:
    print("  note: the source's optimizer state is not exported (an .npz holds parameters only)")
  print(_common.table(_ckpt.leaf_rows(out), ["leaf", "shape", "dtype", "checksum"]))
  return 0 if ok else 1


def _no_model_flags(args, src: Path) -> None:
  """A Hugging Face source's config.json decides the model: flags naming another are refused,
  not ignored. The run shape (--set run.*) and hardware still apply: the target Plan needs them."""
  named = [f"--set {s}" for s in args.set if s.strip().startswith("model.")]
  if args.preset:
    named.insert(0, f"--preset {args.preset}")
  if args.config and config.load_setup(config_file=args.config).model != config.load_setup(
      config_file=None).model:
    named.append(f"--config {args.config} (its preset or [model] table)")
  if named:
    raise config.ConfigError(f"{', '.join(named)}: does not apply to a Hugging Face source; "
                             f"{src}/config.json decides the model (give the run shape with "
                             f"--set run.batch=... --set run.seq=...)")


def _huggingface(args, src: Path, dst: Path) -> int:
  """HF directory -> checkpoint placed as the target Plan, or checkpoint -> HF directory."""
  if args.npz_layout != "stacked" or dst.suffix == ".npz":
    raise config.ConfigError("--npz-layout and .npz destinations do not apply to Hugging Face "
                             "conversions")
  if args.to_format == "hf":
    if checkpoint.is_hf_dir(src):
      raise config.ConfigError(f"{src} is already a Hugging Face directory")
    if args.strategy is not None or _ckpt.setup_flags_given(args):
      raise config.ConfigError("--to-format hf writes the checkpoint's own model unsharded: "
                               "--to-strategy, --devices and model flags do not apply")
    report = checkpoint.export_hf(src, dst, overwrite=args.overwrite,
                                  progress=_ckpt.progress_from(args),
                                  allow_nonfinite=args.allow_nonfinite)
  else:
    if args.strategy is None:
      raise checkpoint.CheckpointError(
          f"{dst}: a checkpoint directory needs a placement: give --to-strategy (baseline, "
          f"layerwise, auto or unsharded) and --devices")
    _no_model_flags(args, src)
    hf_cfg = hf.read_config(str(src))
    base = _common.setup_from(args) if _ckpt.setup_flags_given(args) else config.load_setup(
        hardware=args.hardware)
    setup = dataclasses.replace(base, model=hf_cfg, preset="huggingface")
    plan = _ckpt.target_plan(args, setup)
    report = checkpoint.import_hf(src, dst, plan, overwrite=args.overwrite,
                                  progress=_ckpt.progress_from(args),
                                  run=config.to_dict(setup.run), hardware=setup.hardware.name,
                                  allow_nonfinite=args.allow_nonfinite)
  if not distributed.is_main():
    return 0
  if args.json:
    _common.emit_json(report)
    return 0
  print(f"converted {src} -> {dst}")
  print(f"  from  {report['source_placement']}\n  to    {report['target_placement']}")
  print(f"  {report['leaves']} leaves, {_common.fmt_bytes(report['param_bytes'])} of parameters; "
        f"checksums equal on both sides: bit-exact; {report['seconds']:.1f} s")
  return 0

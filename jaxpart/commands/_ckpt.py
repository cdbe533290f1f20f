"""What the checkpoint commands share: target placement flags and the Setup a target Plan is
made for."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxpart import config
from jaxpart.checkpoint import CheckpointError
from jaxpart.commands import _common

STRATEGIES = ("baseline", "layerwise", "auto", "unsharded")
# = checkpoint.LAYOUTS, repeated so that building the parser does not import JAX (a test checks)
LAYOUTS = ("stacked", "per_layer", "per_stage")


def add_target_args(p: argparse.ArgumentParser, flag: str, default: str | None) -> None:
  _common.add_plan_args(p, default_devices=None, default_strategy=default,
                        title="target placement", strategy_flag=flag, strategies=STRATEGIES,
                        strategy_help="placement to write (unsharded: one device, no Plan)"
                                      + (f"; default {default}" if default else ""))


def add_progress_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                 help="progress bars on stderr (default: when stderr is a terminal)")


def add_nonfinite_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--allow-nonfinite", action="store_true",
                 help="accept weights holding NaN or Inf (listed, not refused)")


def nonfinite_note(bad: dict[str, str]) -> str | None:
  """The line saying which leaves hold NaN or Inf, when --allow-nonfinite let them through."""
  if not bad:
    return None
  return (f"  note: {len(bad)} leaves hold NaN or Inf (allowed by --allow-nonfinite): "
          + "; ".join(f"{p}: {why}" for p, why in bad.items()))


def interrupted(dst) -> str:
  """The line for Ctrl-C while writing dst (cli.py prints it and exits 130). The writers have
  removed their hidden .NAME.partial by the time this runs; dst is as it was."""
  dst = Path(dst)
  kept = "it is as it was" if dst.exists() else "nothing was written there"
  return (f"{dst}: interrupted (Ctrl-C) before the write finished: .{dst.name}.partial was "
          f"removed and {kept}")


def progress_from(args) -> bool:
  return sys.stderr.isatty() if args.progress is None else args.progress


def setup_flags_given(args) -> bool:
  return bool(args.preset or args.config or args.set)


def setup_for_target(args, manifest) -> config.Setup:
  """The model comes from the flags if any were given (and must match the checkpoint's), else
  from the checkpoint; the run shape likewise, which the target Plan's split needs."""
  if setup_flags_given(args):
    return _common.setup_from(args)
  if manifest is None:
    raise CheckpointError(f"{args.src}: an .npz without a jaxpart manifest; name the model "
                          f"(--preset/--config/--set) to import it")
  if manifest.run is None:
    raise config.ConfigError("the checkpoint records no run shape for the target Plan; name it "
                             "with --preset/--config/--set run.batch=... run.seq=...")
  hw = args.hardware or manifest.hardware or "h100"
  if hw not in config.HARDWARE_PRESETS:
    raise config.ConfigError(f"hardware = {hw!r}: unknown; valid hardwares are "
                             f"{', '.join(sorted(config.HARDWARE_PRESETS))}")
  return config.Setup(model=manifest.model, run=config.RunShape(**manifest.run),
                      hardware=config.HARDWARE_PRESETS[hw], preset="checkpoint")


def target_plan(args, setup: config.Setup):
  """None for unsharded; else the planner's Plan, which refuses splits the model can't take."""
  if args.strategy in (None, "unsharded"):
    for name in ("devices", "tp", "pp", "microbatches", "chunk_tokens", "chunk_rows"):
      if getattr(args, name) is not None and not (name == "devices" and args.devices == 1):
        raise config.ConfigError(f"--{name.replace('_', '-')} applies to a sharded target; "
                                 f"the target is unsharded (give --to-strategy / --strategy)")
    return None
  if args.devices is None:
    raise config.ConfigError(f"--devices is required for a {args.strategy} target")
  return _common.plan_from(args, setup, strategy=args.strategy)


def leaf_rows(manifest, shardings: dict | None = None) -> list[list[str]]:
  rows = []
  for path, e in manifest.params.items():
    row = [path, "x".join(map(str, e["shape"])), e["dtype"] + (f" as {e['stored_as']}"
                                                              if e.get("stored_as") else "")]
    if shardings is not None:
      row.append(str(shardings.get(path, "")))
    rows.append(row + [e["checksum"]])
  return rows

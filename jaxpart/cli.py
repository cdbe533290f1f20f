"""`jaxpart` command line: each subcommand lives in jaxpart/commands/<name>.py.

A command module defines NAME, HELP, `add_arguments(parser)` and `run(args) -> int`. Modules are
found by listing the package, so adding a command touches no shared file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

DEFAULT_CPU_DEVICES = 16


def _ensure_cpu_devices(argv: list[str]) -> None:
  """Simulated CPU devices must be requested before JAX starts; GPUs ignore the flag."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    return
  want = DEFAULT_CPU_DEVICES
  for i, a in enumerate(argv):
    if a == "--devices" and i + 1 < len(argv) and argv[i + 1].isdigit():
      want = max(want, int(argv[i + 1]))
    elif a.startswith("--devices=") and a.split("=", 1)[1].isdigit():
      want = max(want, int(a.split("=", 1)[1]))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={want}".strip()


def _command_modules():
  from jaxpart import commands  # noqa: PLC0415
  for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
    if not info.name.startswith("_"):
      yield importlib.import_module(f"jaxpart.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxpart",
      description="Place a dense transformer on N accelerators, check it, predict its cost.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for mod in _command_modules():
    p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  _ensure_cpu_devices(argv)
  args = build_parser().parse_args(argv)
  from jaxpart.config import ConfigError  # noqa: PLC0415
  from jaxpart.plan import PlanError  # noqa: PLC0415
  try:
    return int(args._run(args) or 0)
  except (ConfigError, PlanError) as e:
    print(f"jaxpart {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  raise SystemExit(main())

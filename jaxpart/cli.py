"""`jaxpart` command line: each subcommand lives in jaxpart/commands/<name>.py.

A command module defines NAME, HELP, `add_arguments(parser)` and `run(args) -> int`. Modules are
found by listing the package, so adding a command touches no shared file. A module that sets
DISTRIBUTED = True gets the multi-host flags, and jax.distributed is started before its run; as
one of several processes it runs under a supervisor (runtime/supervise.py) that says how it ended.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from jaxpart import commands
from jaxpart.commands import _argcheck as argcheck
from jaxpart.runtime import distributed
from jaxpart.runtime import supervise
from jaxpart.errors import UserError, keep_interrupts

DEFAULT_CPU_DEVICES = 16


def _ensure_cpu_devices(argv: list[str]) -> None:
  """Simulated CPU devices must be requested before JAX starts; GPUs ignore the flag. One process
  gets max(16, --devices); each of N processes (--num-processes, JAX_NUM_PROCESSES, a detected
  cluster) gets --local-devices, else its share of --devices (default 16)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    return
  devices = _int_arg(argv, "--devices")
  processes = distributed.process_count_hint(argv)
  local = _int_arg(argv, "--local-devices")
  if local is not None and local < 1:
    local = None                       # the command's parser names the bad value
  if local is None:
    total = devices or DEFAULT_CPU_DEVICES
    local = -(-total // processes) if processes > 1 else max(DEFAULT_CPU_DEVICES, total)
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={local}".strip()


def _int_arg(argv: list[str], flag: str) -> int | None:
  for i, a in enumerate(argv):
    value = argv[i + 1] if a == flag and i + 1 < len(argv) else (
        a.split("=", 1)[1] if a.startswith(flag + "=") else None)
    if value is not None and value.isdigit():
      return int(value)
  return None


def _command_modules():
  for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
    if not info.name.startswith("_"):
      yield importlib.import_module(f"jaxpart.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxpart",
      description="Place a dense or Llama-family transformer on N accelerators (pipeline stages x "
                  "tensor parallelism), predict its cost, run and check it against one device, "
                  "generate text, and convert, save and verify checkpoints.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for mod in _command_modules():
    p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
    mod.add_arguments(p)
    if getattr(mod, "DISTRIBUTED", False):
      distributed.add_arguments(p)
    p.set_defaults(_run=mod.run, _distributed=getattr(mod, "DISTRIBUTED", False),
                   _interrupted=getattr(mod, "interrupted", None))
  return parser


def main(argv: list[str] | None = None) -> int:
  """Run one command. Called as the program (argv None), Ctrl-C ends the process at once after
  its line (os._exit: interpreter teardown with XLA's threads mid-compile has crashed); called
  with argv, as tests do, it returns 130."""
  as_program = argv is None
  if as_program:
    keep_interrupts()
  argv = list(sys.argv[1:] if argv is None else argv)
  _ensure_cpu_devices(argv)
  args = None
  try:
    args = build_parser().parse_args(argv)   # imports every command module: may take a while
    argcheck.check(args.command, args, argv)
    if args._distributed and supervise.needed(argv):   # one of several: a parent reports ends
      return supervise.run(args.command, argv)
    if args._distributed:
      distributed.initialize(distributed.LaunchFlags.from_flags(vars(args)))
    return int(args._run(args) or 0)
  except UserError as e:
    print(f"jaxpart {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return _interrupted(args, as_program)


def _interrupted(args, as_program: bool) -> int:
  """Ctrl-C anywhere in any command (tracing, compiling, running, writing): one line and the
  shell's status for SIGINT, 130. A command may say more (convert: what became of DST) through
  its module's `interrupted(args) -> str`; writers have cleaned up as the interrupt unwound."""
  say = args._interrupted(args) if args and args._interrupted else "interrupted (Ctrl-C)"
  print(f"jaxpart{' ' + args.command if args else ''}: error: {say}", file=sys.stderr)
  if as_program:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
  return 130


if __name__ == "__main__":
  raise SystemExit(main())

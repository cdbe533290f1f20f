"""Checks of every command's flags before it starts: numbers in range and finite, output paths
writable, and no flag the command would silently ignore. One place, so a new command gets them
by naming its flags as the others do; each failure is one line naming the flag."""

from __future__ import annotations

import math
from typing import Sequence

from jaxpart import paths
from jaxpart.config import MAX_INDEX, ConfigError

# Counts that must be at least 1 (and indexable); flags not given are None and pass.
POSITIVE_INTS = ("devices", "tp", "pp", "microbatches", "chunk_tokens", "chunk_rows", "kv_block",
                 "repeats", "top", "num_processes", "local_devices", "init_timeout",
                 "heartbeat_timeout", "shutdown_timeout")
NON_NEGATIVE_INTS = {"warmup": MAX_INDEX, "process_id": MAX_INDEX,
                     "seed": 2**63 - 1}   # jax.random.key takes a C long
POSITIVE_FLOATS = ("cache_mb", "tol")
NON_EMPTY = ("config", "coordinator", "local_device_ids", "remat", "src", "path")

# Flags a command accepts that only mean something beside another: (flag, needs, why).
NEEDS = {
    "bench": (("--jsonl", "--sweep", "--jsonl is the --sweep output file"),
              ("--device-counts", "--sweep", "--device-counts lists the --sweep points"),
              ("--chunks", "--sweep", "--chunks lists the --sweep points")),
    "experiments": (),
}
# Flags that a mode makes meaningless: (mode flag, ignored flags, why).
EXCLUDES = {
    "bench": (("--sweep", ("--json", "--memory-seqs", "--memory-only"),
               "--sweep writes one JSON line per point (--jsonl) and times every point"),),
    "experiments": (("--list", ("--only", "--results-dir", "--no-measure", "--no-progress",
                                "--json"), "--list only prints the experiment names"),),
}


def given_flags(argv: Sequence[str]) -> set[str]:
  """The long flags present on the command line (`--x v` or `--x=v`)."""
  return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def check(command: str, args, argv: Sequence[str]) -> None:
  """ConfigError (or PathError) for the first flag out of range, inapplicable or unwritable."""
  _numbers(args)
  for name in NON_EMPTY:
    value = getattr(args, name, None)
    if isinstance(value, str) and not value.strip():
      raise ConfigError(f"{_flag(name)} = '': empty; give a value or leave the flag out")
  given = given_flags(argv)
  for flag, needs, why in NEEDS.get(command, ()):
    if flag in given and needs not in given:
      raise ConfigError(f"{flag} does not apply without {needs}: {why}")
  for mode, ignored, why in EXCLUDES.get(command, ()):
    clash = [f for f in ignored if f in given]
    if mode in given and clash:
      raise ConfigError(f"{', '.join(clash)} {'does' if len(clash) == 1 else 'do'} not apply "
                        f"with {mode}: {why}")
  _command_specific(command, args, given)
  _outputs(command, args)


def _flag(name: str) -> str:
  if name in ("src", "dst", "path"):    # positional arguments, as the usage line names them
    return name.upper()
  return "--" + name.replace("_", "-")


def _numbers(args) -> None:
  for name in POSITIVE_INTS:
    v = getattr(args, name, None)
    if v is not None and not 1 <= v <= MAX_INDEX:
      raise ConfigError(f"{_flag(name)} = {v:,}: must be in 1 .. {MAX_INDEX:,}"
                        + (" (beyond that JAX cannot index)" if v > MAX_INDEX else ""))
  for name, top in NON_NEGATIVE_INTS.items():
    v = getattr(args, name, None)
    if v is not None and not 0 <= v <= top:
      raise ConfigError(f"{_flag(name)} = {v:,}: must be in 0 .. {top:,}")
  for name in POSITIVE_FLOATS:
    v = getattr(args, name, None)
    if v is not None and not (math.isfinite(v) and v > 0):
      raise ConfigError(f"{_flag(name)} = {v!r}: must be a positive finite number")


def _command_specific(command: str, args, given: set[str]) -> None:
  if command == "experiments" and "--only" in given:
    names = [n.strip() for item in args.only for n in item.split(",")]
    if not any(names) or not all(names):
      raise ConfigError(f"--only = {','.join(args.only)!r}: an empty experiment name; give one "
                        f"or more names (see --list), or leave --only out to run them all")
  if command == "convert" and "--npz-layout" in given and not str(args.dst).endswith(".npz"):
    raise ConfigError(f"--npz-layout applies to an .npz export; DST = {args.dst!r} is a "
                      f"checkpoint directory (name it DST.npz to export)")


def _outputs(command: str, args) -> None:
  """Every path the command will write, checked now rather than after the run."""
  if getattr(args, "dump", None) is not None:
    paths.check_output_file("--dump", args.dump)
  if isinstance(getattr(args, "json", None), str) and args.json != "-":
    paths.check_output_file("--json", args.json)
  if command in ("forward", "generate") and getattr(args, "out", None) is not None:
    paths.check_output_file("--out", args.out)
    if not args.out.endswith(".npy"):   # np.save would quietly write OUT.npy instead
      raise paths.PathError(f"--out = {args.out!r}: must end in .npy (the file is written in "
                            f"NumPy's .npy format, under exactly the name given)")
  if getattr(args, "jsonl", None) is not None:
    paths.check_output_file("--jsonl", args.jsonl)
  if getattr(args, "results_dir", None) is not None:
    paths.check_output_dir("--results-dir", args.results_dir, create=True)
  if command in ("save-init", "convert"):
    dst = args.dst
    if dst.endswith(".npz"):
      paths.check_output_file("DST", dst)
    else:
      paths.check_output_dir("DST", dst)

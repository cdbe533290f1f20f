"""Arguments shared by commands, and the one way each is turned into a Setup or a Plan."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from jaxpart import config
from jaxpart.commands import _modeldir
from jaxpart.cost import forward as costmodel
from jaxpart.placement import planner
from jaxpart.jsonable import jsonable


def add_setup_args(p: argparse.ArgumentParser, default_preset: str | None = None) -> None:
  g = p.add_argument_group("model and run shape")
  g.add_argument("--preset", default=None,
                 help=f"one of {', '.join(config.MODEL_PRESETS)} (default: "
                      f"{default_preset or 'small'}, or the TOML file's)")
  g.add_argument("--config", default=None, metavar="FILE.toml",
                 help="TOML file: preset, hardware, [model], [run], [hardware] tables")
  g.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                 help="override one field, e.g. --set model.layers=2 --set run.seq=300")
  g.add_argument("--hardware", default=None,
                 help=f"one of {', '.join(config.HARDWARE_PRESETS)} (default h100)")
  p.set_defaults(_default_preset=default_preset)


def setup_from(args) -> config.Setup:
  if getattr(args, "_model_dir_plans", False) and args.model_dir is not None:
    return _modeldir.setup(args)
  preset = args.preset
  if preset is None and args.config is None:
    preset = args._default_preset or "small"
  return config.load_setup(preset=preset, hardware=args.hardware, config_file=args.config,
                           overrides=config.parse_overrides(args.set))


def add_plan_args(p: argparse.ArgumentParser, default_devices: int | None = 16,
                  default_strategy: str | None = "layerwise", *, title: str = "placement",
                  strategy_flag: str = "--strategy",
                  strategies: tuple[str, ...] = ("baseline", "layerwise", "auto"),
                  strategy_help: str | None = None) -> None:
  """The placement flags every command shares; plan_from turns them into a Plan."""
  g = p.add_argument_group(title)
  g.add_argument("--devices", type=int, default=default_devices)
  g.add_argument(strategy_flag, dest="strategy", default=default_strategy, choices=strategies,
                 help=strategy_help)
  g.add_argument("--tp", type=int, default=None, help="tensor-parallel degree")
  g.add_argument("--pp", type=int, default=None, help="pipeline stages (baseline)")
  g.add_argument("--microbatches", type=int, default=None, help="baseline batch splits")
  g.add_argument("--cache-mb", type=float, default=None,
                 help="working-set budget per device in MB (default: the hardware's L2)")
  g.add_argument("--chunk-tokens", type=int, default=None, help="layer-wise chunk length")
  g.add_argument("--chunk-rows", type=int, default=None, help="layer-wise batch rows per chunk")
  g.add_argument("--kv-block", type=int, default=None, help="keys per online-softmax step")


def plan_from(args, setup: config.Setup, strategy: str | None = None, **fixed):
  kw: dict[str, Any] = dict(
      tp=args.tp, pp=args.pp, microbatches=args.microbatches,
      cache_bytes=None if args.cache_mb is None else args.cache_mb * 1e6,
      chunk_tokens=args.chunk_tokens, chunk_rows=args.chunk_rows, kv_block=args.kv_block)
  kw.update(fixed)
  return planner.make_plan(setup, args.devices, strategy or args.strategy,
                           scorer=costmodel.SCORER, **kw)


def add_json_arg(p: argparse.ArgumentParser, to_file: bool = False) -> None:
  if to_file:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="OUT.json",
                   help="write results as JSON to a file, or to stdout with no argument")
  else:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def emit_json(obj: Any, dest: str | bool = True) -> None:
  text = json.dumps(obj, indent=2, default=jsonable)
  if dest is True or dest == "-":
    print(text)
  else:
    with open(dest, "w") as f:
      f.write(text + "\n")
    print(f"wrote {dest}", file=sys.stderr)


def fmt_bytes(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:,.2f} {unit}"
  return f"{n:,.0f} B"


def table(rows: list[list[Any]], header: list[str]) -> str:
  cells = [header] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                             for i, (c, w) in enumerate(zip(r, widths)))
  return "\n".join([line(header), "  ".join("-" * w for w in widths)] +
                   [line(r) for r in cells[1:]])

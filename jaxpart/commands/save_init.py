"""`jaxpart save-init DST`: freshly initialised parameters saved placed as a Plan says.

Each device initialises only its own shard (jit with the Plan's out_shardings), so this works
for models that do not fit one device. Gives the other checkpoint commands something to read.
"""

from __future__ import annotations

from pathlib import Path

import jax

from jaxpart import checkpoint, config
from jaxpart.runtime import distributed
from jaxpart.models import families
from jaxpart.runtime import sizeguard
from jaxpart.commands import _ckpt, _common

NAME = "save-init"
HELP = "initialise parameters for a Plan and save them as a checkpoint"
DISTRIBUTED = True


def add_arguments(p):
  p.add_argument("dst", help="checkpoint directory to write")
  _ckpt.add_target_args(p, "--strategy", default="layerwise")
  p.add_argument("--seed", type=int, default=0, help="parameter initialisation seed")
  p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  _ckpt.add_progress_arg(p)
  _common.add_setup_args(p, default_preset="tiny")
  _common.add_json_arg(p)


def run(args) -> int:

  setup = _common.setup_from(args)
  plan = _ckpt.target_plan(args, setup)
  sizeguard.check_fits(setup, [plan] if plan is not None else [], "save-init")
  cfg = setup.model
  checkpoint.check_plan(cfg, plan)
  checkpoint.check_destination(Path(args.dst), args.overwrite)
  init = jax.jit(lambda k: families.of(cfg).init_params(cfg, k),
                 out_shardings=checkpoint.param_shardings(plan, cfg))
  params = init(jax.random.key(args.seed))
  m = checkpoint.save(args.dst, params, cfg, plan, run=config.to_dict(setup.run),
                      hardware=setup.hardware.name, overwrite=args.overwrite,
                      progress=_ckpt.progress_from(args))
  if not distributed.is_main():
    return 0
  if args.json:
    _common.emit_json({"destination": args.dst, "manifest": m.to_dict()})
    return 0
  print(f"saved {args.dst}: {m.placement}, model {setup.preset}, seed {args.seed}, "
        f"{len(m.params)} leaves, {_common.fmt_bytes(m.param_bytes)}")
  print(_common.table(_ckpt.leaf_rows(m), ["leaf", "shape", "dtype", "checksum"]))
  return 0

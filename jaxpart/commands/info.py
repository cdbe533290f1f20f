"""`jaxpart info`: the configuration and its exact parameter count."""

from jaxpart import config
from jaxpart.commands import _common, _modeldir

NAME = "info"
HELP = "print the model, run shape and hardware, with exact parameter counts"


def add_arguments(p):
  _common.add_setup_args(p)
  _modeldir.add_argument(p)
  _common.add_json_arg(p)


def run(args) -> int:
  s = _common.setup_from(args)
  m = s.model
  counts = {
      "projection_params_per_layer": m.projection_params_per_layer,
      "layernorm_params_per_layer": m.layernorm_params_per_layer,
      "projection_params": m.projection_params,
      "layernorm_params": m.layernorm_params,
      "total_params": m.total_params,
      "weight_bytes": m.total_params * m.dtype_bytes,
  }
  if args.json:
    _common.emit_json({"preset": s.preset, "model": config.to_dict(m), "run": config.to_dict(s.run),
                       "hardware": config.to_dict(s.hardware), "params": counts})
    return 0
  print(f"preset {s.preset}")
  for title, obj in (("model", m), ("run", s.run), ("hardware", s.hardware)):
    print(f"[{title}] " + ", ".join(f"{k}={v}" for k, v in config.to_dict(obj).items()))
  print(_common.table([[k, f"{v:,}"] for k, v in counts.items()], ["parameters", "count"]))
  return 0

"""`--model-dir DIR` for the commands that only plan and predict (plan, predict, memory, info):
the model is read from the directory's config.json (Hugging Face) or manifest.json (a jaxpart
checkpoint), never its weights, so one's own model can be planned before it is downloaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxpart import checkpoint, config
from jaxpart.checkpoint import hf

# The run shape when --set run.* does not say: the Llama presets' prefill batch, its sequence
# length capped at the model's max_position_embeddings.
DEFAULT_RUN = config.RunShape(batch=8, seq=4096)


def add_argument(p) -> None:
  p.add_argument("--model-dir", default=None, metavar="DIR",
                 help="plan a Hugging Face model from its config.json (no weights are read), "
                      "or a jaxpart checkpoint from its manifest; run shape and hardware from "
                      "--set run.* / hardware.* and --hardware (default batch "
                      f"{DEFAULT_RUN.batch} x seq {DEFAULT_RUN.seq})")
  p.set_defaults(_model_dir_plans=True)


def read_model(model_dir: str) -> config.ModelConfig:
  """The ModelConfig of DIR; unsupported Hugging Face configs are refused naming the field."""
  path = Path(model_dir)
  if not path.is_dir():
    raise config.ConfigError(f"--model-dir = {model_dir!r}: not a directory; give a Hugging "
                             f"Face model directory (config.json) or a jaxpart checkpoint")
  if (path / "config.json").is_file() and not (path / checkpoint.MANIFEST).exists():
    return hf.read_config(str(path))
  if (path / checkpoint.MANIFEST).is_file():
    return checkpoint.read_manifest(path).model
  raise config.ConfigError(f"--model-dir = {model_dir!r}: neither config.json (Hugging Face) "
                           f"nor {checkpoint.MANIFEST} (jaxpart checkpoint) is there")


def setup(args) -> config.Setup:
  """The Setup for --model-dir: the directory's model; run and hardware from the flags."""
  if args.preset or args.config:
    flag = "--preset" if args.preset else "--config"
    raise config.ConfigError(f"{flag} does not apply with --model-dir: the directory names the "
                             f"model (change the run shape with --set run.FIELD=VALUE)")
  overrides = config.parse_overrides(args.set)
  model_keys = [k for k in overrides if k.partition(".")[0] == "model"]
  if model_keys:
    raise config.ConfigError(f"--set {model_keys[0]}: does not apply with --model-dir, whose "
                             f"config.json names the model; --set run.* and hardware.* do")
  cfg = read_model(args.model_dir)
  run = DEFAULT_RUN
  if cfg.max_positions:
    run = dataclasses.replace(run, seq=min(run.seq, cfg.max_positions))
  # The preset only carries the run and hardware overrides through load_setup's checks.
  base = config.load_setup(preset="llama3-8b", hardware=args.hardware, overrides={
      **{f"run.{f.name}": getattr(run, f.name) for f in dataclasses.fields(run)}, **overrides})
  name = Path(args.model_dir).resolve().name + ("+custom" if overrides else "")
  return config.Setup(model=cfg, run=base.run, hardware=base.hardware, preset=name)

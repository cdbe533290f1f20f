"""`jaxpart forward`: logits of a real model for given token ids, through one placement.

The model is a Hugging Face directory (config.json and safetensors) or a jaxpart checkpoint of
the Llama family; the ids a .npy of B x T integers. The logits (B x T x vocab, float32) are
written to --out for anyone to compare with their own implementation.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpart import checkpoint, config, paths, validate
from jaxpart.measure import bench
from jaxpart.runtime import distributed
from jaxpart.checkpoint import hf
from jaxpart.placement import memory
from jaxpart.runtime import runs
from jaxpart.commands import _common, _ids
from jaxpart.serving.text import TextModel

NAME = "forward"
HELP = "logits of a Hugging Face model or jaxpart checkpoint for given token ids, placed"
DISTRIBUTED = True


def add_arguments(p):
  p.add_argument("--model-dir", required=True, metavar="DIR",
                 help="Hugging Face model directory, or a jaxpart checkpoint directory")
  p.add_argument("--input-ids", default=None, metavar="IDS.npy",
                 help="token ids, a batch x seq array of integers in 0 .. vocab-1")
  p.add_argument("--text", default=None, metavar="TEXT",
                 help="instead of --input-ids: one prompt, tokenized with tokenizer.json")
  p.add_argument("--out", default=None, metavar="LOGITS.npy",
                 help="write the logits (batch x seq x vocab, float32) here, a slice at a time "
                      "(a device never holds them all)")
  p.add_argument("--last-only", action="store_true",
                 help="only each row's last position: batch x vocab logits")
  _common.add_plan_args(p)
  p.add_argument("--hardware", default=None, help="the hardware the Plan is made for "
                                                  "(default h100)")
  p.add_argument("--f32", action="store_true", help="run in float32 instead of the model dtype")
  p.add_argument("--repeats", type=int, default=1, help="timed runs (median reported)")
  add_model_args(p)
  _common.add_json_arg(p)


def add_model_args(p) -> None:
  p.add_argument("--allow-nonfinite", action="store_true",
                 help="accept NaN or Inf weights (refused by default, naming the leaf)")


def load_model(model_dir: str, allow_nonfinite: bool = False):
  """(config, host parameter tree) of a Hugging Face directory or a jaxpart checkpoint; NaN or
  Inf weights are refused unless allowed."""
  path = Path(model_dir)
  if checkpoint.is_hf_dir(path):
    cfg, tree = hf.read_hf(str(path))
    validate.check_finite_tree(str(path), tree, allow_nonfinite)
    return cfg, tree
  if (path / checkpoint.MANIFEST).is_file():
    r = checkpoint.load(path, allow_nonfinite=allow_nonfinite)
    return r.manifest.model, jax.tree.map(np.asarray, r.params)
  raise config.ConfigError(f"--model-dir = {model_dir!r}: neither a Hugging Face directory "
                           f"(config.json and safetensors) nor a jaxpart checkpoint "
                           f"({checkpoint.MANIFEST})")


def _token_ids(args, vocab: int) -> np.ndarray:
  """Exactly one of --input-ids (a .npy) and --text (tokenized by the directory's tokenizer)."""
  if (args.input_ids is None) == (args.text is None):
    raise config.ConfigError("give the tokens as one of --input-ids IDS.npy or --text TEXT")
  if args.input_ids is not None:
    return _ids.load(args.input_ids, vocab)
  row = TextModel(args.model_dir).encode(args.text)
  if not row or max(row) >= vocab:
    raise config.ConfigError(f"--text {args.text!r}: encodes to {len(row)} ids" +
                             (f" up to {max(row)}; the model's vocabulary is 0 .. {vocab - 1}"
                              if row else ""))
  return np.asarray([row], np.int32)


def run(args) -> int:
  cfg, params = load_model(args.model_dir, args.allow_nonfinite)
  if not cfg.family.token_edges:
    raise config.ConfigError(f"--model-dir = {args.model_dir!r}: model arch {cfg.arch!r}; "
                             f"forward takes token ids (a family with token edges, as llama)")
  ids = _token_ids(args, cfg.vocab)
  validate.warn_past_positions(cfg, ids.shape[1], f"forward of {ids.shape[1]:,}-token rows")
  setup = config.Setup(model=cfg, run=config.RunShape(batch=ids.shape[0], seq=ids.shape[1]),
                       hardware=config.HARDWARE_PRESETS[args.hardware or "h100"],
                       preset=Path(args.model_dir).name)
  plan = _common.plan_from(args, setup)
  dtype = jnp.float32 if args.f32 else None
  # the final hidden vectors, their logits a slice at a time; whole logits only where the
  # hidden stream cannot split over the devices
  whole = args.last_only or cfg.d_model % plan.devices
  output = "last" if args.last_only else "logits" if whole else "hidden"
  placed = runs.place(setup, plan, params, ids, dtype=dtype, output=output)
  out_path = args.out if distributed.is_main() else None
  if whole:
    logits = runs.fetch(placed())
    validate.check_finite(f"logits of the {plan.strategy} placement", logits)
    shape = logits.shape
  else:
    rows, tokens = memory.logits_chunk(setup.run)
    shape = runs.write_logits(placed, cfg, rows, tokens, out_path, dtype)
  timing = bench.time_interleaved({"forward": placed}, repeats=args.repeats, warmup=0)
  if not distributed.is_main():
    return 0
  if args.out and whole:
    with paths.atomic_file("--out", args.out) as tmp:
      np.save(tmp, np.asarray(logits, np.float32))
  out = {"model_dir": args.model_dir, "model": config.to_dict(cfg), "plan": plan.to_dict(),
         "logits_shape": list(shape), "out": args.out,
         "dtype": "float32" if args.f32 else cfg.dtype,
         "median_s": timing["forward"]["median_s"]}
  if args.json:
    _common.emit_json(out)
    return 0
  print(f"{plan.strategy} on {plan.devices} devices ({plan.stages} stages x tp {plan.tp}, "
        f"{plan.split}): logits {' x '.join(map(str, shape))} in {out['dtype']}, "
        f"{out['median_s'] * 1e3:.1f} ms" + (f"; written to {args.out}" if args.out else ""))
  return 0

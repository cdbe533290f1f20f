"""`jaxpart generate`: prefill a batch of prompts, then decode new tokens through the placed
stages; reports time to first token (the batch's prefill), time per output token (the median
decode cycle, one token for every sequence) and per-device memory.

Prompts of different lengths go in one .npy, right-padded with -1. Without --model-dir it runs
the seed's dense presets: random hidden vectors as the prompt, and each decode step feeds the
last output vector back as the next position's input.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpart import config, paths, validate
from jaxpart.runtime import distributed
from jaxpart.models import families
from jaxpart.runtime import generate
from jaxpart.runtime import runs
from jaxpart.runtime import sizeguard
from jaxpart.commands import _common, _ids, _text
from jaxpart.commands.forward import add_model_args, load_model
from jaxpart.runtime.decode import Sampling

NAME = "generate"
HELP = "prefill and decode through a placement: tokens, TTFT, TPOT, per-device memory"
DISTRIBUTED = True


def add_arguments(p):
  p.add_argument("--model-dir", default=None, metavar="DIR",
                 help="Hugging Face model directory or jaxpart checkpoint (Llama family); "
                      "without it, a dense preset (--preset) with random weights and prompts")
  p.add_argument("--input-ids", default=None, metavar="IDS.npy",
                 help="prompts: batch x seq integer ids, each row right-padded with -1")
  _text.add_prompt_args(p)
  p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per prompt")
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0,
                 help="sample from the k likeliest (0: all); more than the vocabulary is "
                      "refused, not clamped")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, metavar="TOKENS.npy",
                 help="write the new tokens here (a .npy name; an existing file is replaced "
                      "only once the new one is whole)")
  p.add_argument("--f32", action="store_true", help="run in float32 instead of the model dtype")
  p.add_argument("--memory", action="store_true",
                 help="also report the compiled per-device memory of prefill and of a decode "
                      "cycle")
  add_model_args(p)
  _common.add_setup_args(p)
  _common.add_plan_args(p)
  _common.add_json_arg(p)


def _check_extremes(args, setup: config.Setup) -> None:
  """--top-k and --new-tokens beyond what the model and this machine allow, refused before any
  tracing: a top-k over the vocabulary is a mistake (refused, not clamped), and a KV cache of
  prompt + new tokens per row that cannot fit would otherwise run out of memory or run for
  days."""
  cfg, run = setup.model, setup.run
  vocab = cfg.vocab if families.of(cfg).tokens_in else 0
  if args.top_k < 0 or (vocab and args.top_k > vocab):
    top = f"{vocab:,}, the vocabulary" if vocab else "the vocabulary size"
    raise config.ConfigError(f"--top-k = {args.top_k:,}: must be in 0 .. {top} (0: all of it)")
  total = run.seq + args.new_tokens
  if total > config.MAX_INDEX:
    raise config.ConfigError(f"--new-tokens = {args.new_tokens:,}: prompt ({run.seq}) + new "
                             f"tokens must be at most {config.MAX_INDEX:,}")
  width = 4 if args.f32 else cfg.dtype_bytes
  kv = 2 * cfg.layers * run.batch * total * (cfg.n_kv_heads or cfg.n_heads) * cfg.head_dim
  sizeguard.check_bytes(kv * width, f"--new-tokens = {args.new_tokens:,}",
                        f"the KV cache of {run.batch} row(s) x {total:,} positions",
                        "generate fewer tokens or give fewer prompts")


def run(args) -> int:
  if args.new_tokens < 1:
    raise config.ConfigError(f"--new-tokens = {args.new_tokens}: must be at least 1")
  if args.model_dir:
    if args.preset or args.config or args.set:
      raise config.ConfigError("--model-dir names the model: --preset/--config/--set do not "
                               "apply")
    text = _text.prompt_ids(args)
    if not args.input_ids and text is None:
      raise config.ConfigError("--model-dir needs --input-ids, --prompt or --prompt-file "
                               "(the prompts)")
    cfg, params = load_model(args.model_dir, args.allow_nonfinite)
    raw = text[2] if text else _ids.load(args.input_ids, cfg.vocab, padded=True)
    ids, lens = generate.split_prompts(raw, cfg.vocab)
    setup = config.Setup(model=cfg, run=config.RunShape(*ids.shape),
                         hardware=config.HARDWARE_PRESETS[args.hardware or "h100"],
                         preset=Path(args.model_dir).name)
    inp = ids
  else:
    text = None
    if args.prompt or args.prompt_file:
      raise config.ConfigError("--prompt/--prompt-file need --model-dir (its tokenizer.json)")
    setup = _common.setup_from(args)
    if args.input_ids or families.of(setup.model).tokens_in:
      raise config.ConfigError("a preset without --model-dir runs the dense family on random "
                               "prompts: give --model-dir for token ids")
    params = runs.host_params(setup, args.seed)
    inp = runs.host_input(setup, args.seed)
    lens = np.full(setup.run.batch, setup.run.seq, np.int32)
  validate.check_generation_positions(setup.model, int(lens.max()), args.new_tokens)
  _check_extremes(args, setup)
  plan = _common.plan_from(args, setup)
  sampling = Sampling(args.temperature, args.top_k, args.seed)
  g = generate.generate(setup, plan, params, inp, lens, args.new_tokens, sampling,
                        dtype=jnp.float32 if args.f32 else None, memory=args.memory)
  if not distributed.is_main():
    return 0
  if args.out:
    with paths.atomic_file("--out", args.out) as tmp:
      np.save(tmp, g.tokens)
  s = g.schedule
  out = {"model": config.to_dict(setup.model), "plan": plan.to_dict(), "batch": s.batch,
         "prompt_lengths": lens.tolist(), "new_tokens": args.new_tokens,
         "ttft_s": g.ttft_s, "tpot_s": g.tpot_s, "decode_tokens_per_s": g.decode_tokens_per_s,
         "cycle_s": g.cycle_s, "decode_microbatches": s.microbatches, "rows": s.rows,
         "cycle_ticks": s.period, "cache_len": g.cache_len, "memory": g.memory,
         "platform": jax.devices()[0].platform, "out": args.out}
  if families.of(setup.model).tokens_in:
    out["tokens"] = g.tokens.tolist()
  if text:
    out["prompts"], out["text"] = text[1], _text.completions(text[0], g.tokens)
  if args.json:
    _common.emit_json(out)
    return 0
  print(f"{plan.strategy} on {plan.devices} devices ({plan.stages} stages x tp {plan.tp}); "
        f"prefill {plan.split}; decode {s.microbatches} microbatch(es) of {s.rows} row(s), "
        f"{s.period} ticks a cycle")
  print(f"measured on {out['platform']}: TTFT {g.ttft_s * 1e3:.1f} ms (prefill of the batch), "
        f"TPOT {g.tpot_s * 1e3:.2f} ms (median of {len(g.cycle_s)} decode cycles), "
        f"{g.decode_tokens_per_s:,.0f} decode tokens/s")
  for name, m in g.memory.items():
    print(f"  {name}: per device arguments {_common.fmt_bytes(m['argument_bytes'])}, temp "
          f"{_common.fmt_bytes(m['temp_bytes'])}, output {_common.fmt_bytes(m['output_bytes'])}")
  if text:
    for prompt, completion in zip(out["prompts"], out["text"]):
      print(f"  {prompt!r} -> {completion!r}")
  elif families.of(setup.model).tokens_in:
    for r, row in enumerate(g.tokens[:8]):
      print(f"  prompt {r} ({lens[r]} tokens) -> {' '.join(map(str, row.tolist()))}")
  return 0

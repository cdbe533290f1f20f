"""Build a servable model directory: a Llama preset's shape with random weights, a word-level
tokenizer and a chat template, so tests, the load test and the README have text to serve.

  python scripts/make_tiny_model.py DIR [--preset llama-tiny|llama-small] [--seed S] [--bf16]

Writes config.json + model.safetensors (jaxpart's Hugging Face writer), tokenizer.json (the
`tokenizers` library: whitespace/punctuation words, <s> prepended as Llama's tokenizer does)
and tokenizer_config.json (special tokens and a chat template), all loadable by transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from jaxpart import config
from jaxpart.checkpoint import hf
from jaxpart.models import llama

PRESETS = ("llama-tiny", "llama-small")
SPECIALS = ("<unk>", "<s>", "</s>")
WORDS = ("system user assistant : . , ? ! the a an of to and in is it you that he was for on "
         "are with as his they be at one have this from or had by hot word but what some we "
         "can out other were all there when up use your how said each she which do their time "
         "if will way about many then them write would like so these her long make thing see "
         "him two has look more day could go come did number sound no most people my over "
         "know water than call first who may down side been now find any new work part take "
         "get place made live where after back little only round man year came show every "
         "good me give our under name very through just form sentence great think say help "
         "low line differ turn cause much mean before move right boy old too same tell does "
         "set three want air well also play small end put home read hand port large spell add "
         "even land here must big high such follow act why ask men change went light kind off "
         "need house picture try us again animal point mother world near build self earth").split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}")


def vocabulary(size: int) -> list[str]:
  """size distinct words: the specials, the chat's words, English words, then made-up ones."""
  words = list(SPECIALS) + list(dict.fromkeys(WORDS))
  syll = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "pa"]
  i = 0
  while len(words) < size:
    words.append(syll[i % 10] + syll[(i // 10) % 10] + syll[(i // 100) % 10] + str(i // 1000 or ""))
    i += 1
  return words[:size]


def build_tokenizer(size: int) -> Tokenizer:
  vocab = {w: i for i, w in enumerate(vocabulary(size))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # words joined by spaces
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", vocab["<s>"])])
  tok.add_special_tokens(list(SPECIALS))
  return tok


def make(out_dir: str, preset: str = "llama-tiny", seed: int = 0, dtype: str = "float32"):
  """Write the model directory; returns its ModelConfig."""
  if preset not in config.MODEL_PRESETS:
    raise config.ConfigError(f"--preset {preset!r}: not a model preset of this jaxpart; valid: "
                             f"{', '.join(p for p in PRESETS if p in config.MODEL_PRESETS)}")
  cfg = dataclasses.replace(config.MODEL_PRESETS[preset], dtype=dtype)
  tree = jax.tree.map(lambda a: np.asarray(a, dtype=a.dtype), llama.init_params(
      cfg, jax.random.key(seed)))
  hf.write_hf(jax.tree.map(lambda a: np.asarray(a).astype(cfg.dtype), tree), cfg, out_dir)
  cfg_path = Path(out_dir) / "config.json"
  hf_cfg = json.loads(cfg_path.read_text())
  hf_cfg.update(bos_token_id=1, eos_token_id=2)
  cfg_path.write_text(json.dumps(hf_cfg, indent=2))
  build_tokenizer(cfg.vocab).save(str(Path(out_dir) / "tokenizer.json"))
  (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
      "unk_token": "<unk>", "add_bos_token": True, "model_max_length": cfg.max_positions,
      "chat_template": CHAT_TEMPLATE}, indent=2))
  return cfg


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("dir")
  p.add_argument("--preset", default="llama-tiny", choices=PRESETS)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--bf16", action="store_true", help="bfloat16 weights (default float32)")
  args = p.parse_args(argv)
  try:
    cfg = make(args.dir, args.preset, args.seed, "bfloat16" if args.bf16 else "float32")
  except config.ConfigError as e:
    print(f"make_tiny_model: error: {e}", file=sys.stderr)
    return 2
  print(f"{args.dir}: {args.preset} ({cfg.layers} layers, d_model {cfg.d_model}, vocab "
        f"{cfg.vocab}, {cfg.dtype}) with tokenizer.json and a chat template")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

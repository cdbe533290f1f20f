"""Text prompts for `generate` and `forward` (--prompt, --prompt-file, --chat, --text): the
model directory's tokenizer turns them into the right-padded id arrays those commands take, and
generated ids back into text. One home, so the two commands refuse bad text the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxpart import config
from jaxpart.runtime.generate import PAD
from jaxpart.serving.text import TextModel


def add_prompt_args(p) -> None:
  p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                 help="a text prompt (repeat for a batch); needs the directory's tokenizer.json")
  p.add_argument("--prompt-file", default=None, metavar="FILE",
                 help="text prompts, one per line (blank lines skipped)")
  p.add_argument("--chat", action="store_true",
                 help="each prompt is a user message, rendered with the chat template")


def padded(rows: list[list[int]]) -> np.ndarray:
  """Rows of ids as one batch x seq array right-padded with PAD."""
  out = np.full((len(rows), max(len(r) for r in rows)), PAD, np.int64)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def prompt_ids(args) -> tuple[TextModel, list[str], np.ndarray] | None:
  """(the tokenizer, the prompts, their ids) from --prompt / --prompt-file; None if neither."""
  texts = list(args.prompt)
  if args.prompt_file:
    try:
      texts += [ln for ln in Path(args.prompt_file).read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise config.ConfigError(f"--prompt-file = {args.prompt_file!r}: cannot be read ({e})"
                               ) from None
    if not texts:
      raise config.ConfigError(f"--prompt-file = {args.prompt_file!r}: holds no prompt")
  if not texts:
    if args.chat:
      raise config.ConfigError("--chat needs --prompt or --prompt-file")
    return None
  if args.input_ids:
    raise config.ConfigError("--input-ids and --prompt/--prompt-file both give the prompts; "
                             "give one")
  text = TextModel(args.model_dir)
  rows = [text.encode_chat([{"role": "user", "content": t}]) if args.chat else text.encode(t)
          for t in texts]
  empty = [t for t, r in zip(texts, rows) if not r]
  if empty:
    raise config.ConfigError(f"--prompt {empty[0]!r}: encodes to no tokens")
  return text, texts, padded(rows)


def completions(text: TextModel, tokens_BxN) -> list[str]:
  """Each row's generated text, cut after its first end-of-sequence token."""
  out = []
  for row in np.asarray(tokens_BxN).tolist():
    cut = next((i for i, t in enumerate(row) if t in text.eos_ids), len(row))
    out.append(text.decode(row[:cut]))
  return out

"""Text in and out of a model directory: its tokenizer.json, its chat template, streaming text.

Why not transformers: it is a test-only peer. `tokenizers` reads the same tokenizer.json, and
the chat template of tokenizer_config.json is rendered here as transformers renders it (a
sandboxed jinja2 environment with trim_blocks and lstrip_blocks, loop controls, a `tojson`
that does not escape HTML, `raise_exception`, `strftime_now`, the special tokens as variables,
and the rendered text encoded without adding special tokens), so a chat prompt gives the same
ids here as under `apply_chat_template`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from jaxpart.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class TextError(UserError):
  """The model directory's tokenizer or chat template cannot be used, or a chat is malformed."""


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
  """A chat template compiled in the environment transformers gives it."""
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                     extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  try:
    return env.from_string(source)
  except jinja2.TemplateError as e:
    raise TextError(f"{CONFIG_FILE}: chat_template does not compile ({e})") from None


def _token_text(v):
  """A special token as tokenizer_config.json gives it: a string or an AddedToken dict."""
  return v.get("content") if isinstance(v, dict) else v


class TextModel:
  """A model directory's tokenizer, special tokens and chat template."""

  def __init__(self, model_dir: str):
    path = Path(model_dir)
    if not (path / TOKENIZER_FILE).is_file():
      raise TextError(f"{path / TOKENIZER_FILE}: missing; text in and out needs the model "
                      f"directory's {TOKENIZER_FILE} (Hugging Face tokenizers format)")
    try:
      self.tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
      raise TextError(f"{path / TOKENIZER_FILE}: cannot be read ({e})") from None
    conf = {}
    if (path / CONFIG_FILE).is_file():
      try:
        conf = json.loads((path / CONFIG_FILE).read_text())
      except (OSError, ValueError) as e:
        raise TextError(f"{path / CONFIG_FILE}: not JSON ({e})") from None
    self.special = {k: _token_text(conf.get(k)) for k in SPECIAL if conf.get(k) is not None}
    source = conf.get("chat_template")
    if isinstance(source, list):     # named templates: transformers uses "default"
      source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    self.template = compile_template(source) if isinstance(source, str) else None
    eos = self.special.get("eos_token")
    eos_id = self.tokenizer.token_to_id(eos) if eos else None
    self.eos_ids = () if eos_id is None else (eos_id,)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)

  def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat as the model was trained to see it (the template's text, before encoding)."""
    if self.template is None:
      raise TextError(f"{CONFIG_FILE}: has no chat_template; use /v1/completions with a prompt")
    try:
      return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                  **self.special)
    except jinja2.TemplateError as e:
      raise TextError(f"messages: the chat template refused them ({e})") from None

  def encode_chat(self, messages: list[dict]) -> list[int]:
    return self.encode(self.render_chat(messages), add_special_tokens=False)

  def streamer(self) -> "Detokenizer":
    return Detokenizer(self)


class Detokenizer:
  """Incremental text for streaming: each new token's text, as vLLM does it. Decoding the
  window from a prefix offset and the part already shown keeps a token whose text depends on
  its neighbours (byte fallback, merged spaces) right; an incomplete character (U+FFFD at the
  end) waits for the next token."""

  def __init__(self, text: TextModel):
    self.text, self.ids = text, []
    self.prefix, self.read = 0, 0

  def add(self, token_id: int) -> str:
    self.ids.append(int(token_id))
    shown = self.text.decode(self.ids[self.prefix:self.read])
    full = self.text.decode(self.ids[self.prefix:])
    if len(full) > len(shown) and not full.endswith("\ufffd"):
      self.prefix, self.read = self.read, len(self.ids)
      return full[len(shown):]
    return ""

  def peek(self, token_id: int) -> str:
    """The text token_id would add after the tokens so far (nothing is added): a token's
    string for its log-probability, its leading space included."""
    window = self.ids[self.prefix:]
    return self.text.decode(window + [int(token_id)])[len(self.text.decode(window)):]

"""Hugging Face model directories in and out: config.json and safetensors, tensor by tensor.

Reading fills each stacked (L, ...) leaf in place from one tensor at a time, so the host holds
the model once plus one tensor. bf16 arrives as ml_dtypes.bfloat16 through safetensors' numpy
framework, bit-exact. Unsupported configs are refused naming the config.json field.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import replace
from typing import Any, Iterator

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxpart.models import families
from jaxpart.models import llama
from jaxpart.models.spec import HfEntry
from jaxpart.config import DTYPES, ModelConfig, RopeScaling
from jaxpart.errors import UserError, first_line

MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}
INDEX = "model.safetensors.index.json"
_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
             "vocab_size")
_MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok")


class HFError(UserError):
  """A Hugging Face directory or config jaxpart cannot read or write as asked."""


def _refuse(field: str, value: Any, valid: str) -> HFError:
  return HFError(f"config.json {field} = {value!r}: not supported; {valid}")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """A ModelConfig (arch llama) from a config.json dict (transformers 4.x or 5.x layout)."""
  mt = hf.get("model_type")
  if not isinstance(mt, str) or mt not in MODEL_TYPES:
    raise _refuse("model_type", mt, f"valid: {', '.join(MODEL_TYPES)}")
  if hf.get("hidden_act", "silu") != "silu":
    raise _refuse("hidden_act", hf["hidden_act"], "the Llama family's MLP is SwiGLU (silu)")
  for name in _MOE_FIELDS:
    if hf.get(name):
      raise _refuse(name, hf[name], "mixture-of-experts models are not supported")
  if mt == "mistral" and hf.get("sliding_window") is not None:
    raise _refuse("sliding_window", hf["sliding_window"], "sliding-window attention is not "
                  "supported (null: full causal attention)")
  if mt == "qwen2" and hf.get("use_sliding_window"):
    raise _refuse("use_sliding_window", hf["use_sliding_window"],
                  "sliding-window attention is not supported (false)")
  layer_types = hf.get("layer_types") or []
  if not isinstance(layer_types, list):
    raise _refuse("layer_types", layer_types, "a list of full_attention")
  kinds = {str(k) for k in layer_types} - {"full_attention"}
  if kinds:
    raise _refuse("layer_types", sorted(kinds), "only full_attention layers are supported")
  for name in ("attention_bias", "mlp_bias"):
    if hf.get(name):
      raise _refuse(name, hf[name], "only Qwen2's q/k/v biases are supported (false)")
  rope = _table(hf, "rope_parameters")
  scaling = _table(hf, "rope_scaling") or rope
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  theta = _number(rope, "rope_theta", None, "rope_parameters.rope_theta")
  theta = _number(hf, "rope_theta", 10000.0) if theta is None else theta
  if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise _refuse("partial_rotary_factor", hf.get("partial_rotary_factor"), "valid: 1.0")
  if rope_type == "default":
    rope_scaling = None
  elif rope_type == "llama3":
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if scaling.get(k) is None]
    if missing:
      raise HFError(f"config.json rope_scaling: {', '.join(missing)} missing; the llama3 rope "
                    f"type needs {', '.join(keys)}")
    f = {k: _number(scaling, k, None, f"rope_scaling.{k}") for k in keys}
    rope_scaling = RopeScaling(
        factor=f["factor"], low_freq_factor=f["low_freq_factor"],
        high_freq_factor=f["high_freq_factor"],
        original_max_position_embeddings=int(f["original_max_position_embeddings"]))
  else:
    raise _refuse("rope_scaling.rope_type", rope_type, "valid: default, llama3")
  dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  if not isinstance(dtype, str) or dtype not in DTYPES:
    raise _refuse("dtype", dtype, f"valid: {', '.join(DTYPES)}")
  missing = [k for k in _REQUIRED if not _is_int(hf.get(k))]
  if missing:
    raise HFError(f"config.json: {', '.join(missing)} missing or not an integer "
                  f"({', '.join(f'{k} = {hf.get(k)!r}' for k in missing)})")
  for k in ("head_dim", "num_key_value_heads", "max_position_embeddings"):
    if hf.get(k) is not None and not _is_int(hf[k]):
      raise HFError(f"config.json {k} = {hf[k]!r}: expected an integer")
  heads, d = hf["num_attention_heads"], hf["hidden_size"]
  return ModelConfig(
      layers=hf["num_hidden_layers"], d_model=d, n_heads=heads,
      head_dim=hf.get("head_dim") or d // heads, d_ff=hf["intermediate_size"], dtype=dtype,
      ln_eps=_number(hf, "rms_norm_eps", 1e-6), arch="llama",
      n_kv_heads=hf.get("num_key_value_heads") or heads, vocab=hf["vocab_size"],
      rope_theta=theta, rope_scaling=rope_scaling,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=mt == "qwen2",
      max_positions=hf.get("max_position_embeddings") or 0)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _table(hf: dict[str, Any], field: str) -> dict[str, Any]:
  """A nested table of config.json ({} when absent or null), refused when not an object."""
  value = hf.get(field)
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise HFError(f"config.json {field} = {value!r}: expected an object (or null), e.g. "
                  f'{{"rope_type": "llama3", "factor": 8.0, ...}}')
  return value


def _number(table: dict[str, Any], key: str, default: float | None,
            field: str | None = None) -> float | None:
  """A finite number from config.json (JSON numbers only: "1e-5" as a string is refused)."""
  value = table.get(key)
  if value is None:
    return default
  if _is_int(value) or isinstance(value, float):
    if math.isfinite(value):
      return float(value)
  raise HFError(f"config.json {field or key} = {value!r}: expected a finite number")


def default_model_type(cfg: ModelConfig) -> str:
  """qwen2 for q/k/v biases, llama otherwise (Mistral without sliding window is the same
  network as Llama)."""
  return "qwen2" if cfg.qkv_bias else "llama"


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
  """A config.json dict transformers' from_pretrained loads (4.x rope keys, which 5.x reads).
  max_position_embeddings is written as 2048 when the config states no limit."""
  llama._check_arch(cfg)
  mt = model_type or default_model_type(cfg)
  if mt not in MODEL_TYPES:
    raise HFError(f"model_type = {mt!r}: valid: {', '.join(MODEL_TYPES)}")
  if cfg.qkv_bias != (mt == "qwen2"):
    raise HFError(f"model_type = {mt!r} with ModelConfig.qkv_bias = {cfg.qkv_bias}: q/k/v "
                  f"biases are written as qwen2 and only qwen2 has them")
  rs = cfg.rope_scaling
  out = {
      "architectures": [MODEL_TYPES[mt]], "model_type": mt, "vocab_size": cfg.vocab,
      "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_positions or 2048, "rms_norm_eps": cfg.ln_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None if rs is None else {
          "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
          "high_freq_factor": rs.high_freq_factor,
          "original_max_position_embeddings": rs.original_max_position_embeddings},
      "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": cfg.dtype,
      "initializer_range": 0.02, "use_cache": True,
  }
  if mt in ("llama", "mistral"):
    out |= {"attention_bias": False, "mlp_bias": False}
  if mt == "mistral":
    out["sliding_window"] = None
  if mt == "qwen2":
    out |= {"use_sliding_window": False, "sliding_window": None}
  return out


def _safetensors_files(model_dir: str) -> list[str]:
  index = os.path.join(model_dir, INDEX)
  if os.path.exists(index):
    weight_map = _read_json(index, INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(v, str) for v in weight_map.values()):
      raise HFError(f"{index}: no weight_map (an object of tensor name -> shard file name)")
    return [_shard_path(model_dir, index, n) for n in sorted(set(weight_map.values()))]
  files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
  if not files:
    raise HFError(f"{model_dir}: no *.safetensors files (and no {INDEX})")
  return files


def _shard_path(model_dir: str, index: str, name: str) -> str:
  """A shard the index names: a file inside the model directory (no absolute path, no `..`
  leaving it), which exists."""
  rel = os.path.normpath(name)
  if os.path.isabs(name) or rel == ".." or rel.startswith(".." + os.sep):
    raise HFError(f"{index}: shard {name!r} is outside the model directory; valid: a file name "
                  f"inside {model_dir}")
  path = os.path.join(model_dir, rel)
  if not os.path.isfile(path):
    raise HFError(f"{index}: names shard {name!r}, which is not in {model_dir}")
  return path


def _read_json(path: str, what: str) -> dict[str, Any]:
  """A JSON object from a file, or one HFError naming the file and what is wrong with it."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except UnicodeDecodeError as e:
    raise HFError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); {what} must be a "
                  f"JSON object") from None
  except json.JSONDecodeError as e:
    raise HFError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                  f"{what} must be a JSON object") from None
  except OSError as e:
    raise HFError(f"{path}: cannot read it ({e.strerror or e})") from None
  if not isinstance(data, dict):
    raise HFError(f"{path}: a JSON {type(data).__name__}; {what} must be a JSON object")
  return data


def _open_error(path: str, e: Exception) -> HFError:
  return HFError(f"{path}: not a readable safetensors file ({first_line(e)}); expected the "
                 f"file as transformers writes it (it may be truncated or damaged)")


def read_config(model_dir: str) -> ModelConfig:
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise HFError(f"{model_dir}: no config.json (not a Hugging Face model directory)")
  try:
    return config_from_hf(_read_json(path, "config.json"))
  except HFError as e:   # name the file, not just config.json: several models may be in play
    msg = str(e)
    raise HFError(path + msg[len("config.json"):] if msg.startswith("config.json") else msg
                  ) from None


def iter_hf(model_dir: str, cfg: ModelConfig | None = None
            ) -> Iterator[tuple[HfEntry, np.ndarray]]:
  """(entry, array in the tree's orientation) for every tensor, one at a time, in file order.

  Refuses a tensor jaxpart does not know or of the wrong shape; `read_hf` checks none is
  missing. The array is a view of the tensor just read (transposed where HF's is [out, in]).
  """
  cfg = cfg or read_config(model_dir)
  by_name = {e.hf_name: e for e in families.of(cfg).hf_names.entries(cfg)}
  shapes = llama.param_shapes(cfg)
  for path in _safetensors_files(model_dir):
    try:
      f = safe_open(path, framework="np")
    except (SafetensorError, OSError) as e:
      raise _open_error(path, e) from None
    with f:
      for name in f.keys():
        if name not in by_name:
          if families.of(cfg).hf_names.is_ignored(name, cfg):
            continue
          raise HFError(f"{path}: tensor {name!r} is not part of a {cfg.layers}-layer Llama-"
                        f"family model with qkv_bias={cfg.qkv_bias}, "
                        f"tie_embeddings={cfg.tie_embeddings}")
        e = by_name[name]
        try:
          arr = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
          raise _open_error(path, e) from None
        arr = arr.T if e.transpose else arr
        want = tuple(_leaf(shapes, e.path).shape[1 if e.layer is not None else 0:])
        if arr.shape != want:
          flip = (lambda s: s[::-1]) if e.transpose else (lambda s: s)  # noqa: E731
          raise HFError(f"{path}: tensor {name!r} has shape {flip(arr.shape)}, the config "
                        f"needs {flip(want)}")
        yield e, arr


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def read_hf(model_dir: str) -> tuple[ModelConfig, dict]:
  """(config, tree of numpy arrays) from a Hugging Face directory, each stacked leaf filled in
  place. cfg.dtype is the tensors' dtype (they must all share one)."""
  cfg = read_config(model_dir)
  shapes = llama.param_shapes(cfg)
  tree: dict = {}
  missing = {e.hf_name for e in families.of(cfg).hf_names.entries(cfg)}
  dtype = None
  for e, arr in iter_hf(model_dir, cfg):
    if dtype is None:
      dtype = arr.dtype
    if arr.dtype != dtype:
      raise HFError(f"{model_dir}: tensor {e.hf_name!r} is {arr.dtype}, others are {dtype}; "
                    f"jaxpart keeps one dtype per model")
    node = tree
    for k in e.path[:-1]:
      node = node.setdefault(k, {})
    if e.path[-1] not in node:
      node[e.path[-1]] = np.empty(_leaf(shapes, e.path).shape, dtype)
    if e.layer is None:
      node[e.path[-1]][...] = arr
    else:
      node[e.path[-1]][e.layer] = arr
    missing.discard(e.hf_name)
  if missing:
    raise HFError(f"{model_dir}: {len(missing)} tensors missing, e.g. {sorted(missing)[:3]}")
  if np.dtype(dtype).name not in DTYPES:
    raise HFError(f"{model_dir}: tensors are {dtype}; valid: {', '.join(DTYPES)}")
  return replace(cfg, dtype=np.dtype(dtype).name), tree


def write_hf(tree: dict, cfg: ModelConfig, out_dir: str, max_shard_bytes: int = 5 * 10**9,
             model_type: str | None = None, overwrite: bool = False) -> list[str]:
  """config.json and safetensors files (model.safetensors, or model-0000K-of-0000N with the
  index when over max_shard_bytes) that transformers' from_pretrained loads. Holds at most one
  shard's tensors on the host at a time. Returns the files written."""
  entries = families.of(cfg).hf_names.entries(cfg)
  hf_config = config_to_hf(cfg, model_type)
  leaves = {e.hf_name: _leaf(tree, e.path) for e in entries}
  dtypes = {np.dtype(leaf.dtype).name for leaf in leaves.values()}
  if len(dtypes) != 1:
    raise HFError(f"tree has dtypes {sorted(dtypes)}; cast it to one before writing")
  hf_config["torch_dtype"] = dtypes.pop()
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise HFError(f"{out_dir}: exists and is not empty (pass overwrite=True to replace it)")
  os.makedirs(out_dir, exist_ok=True)
  for stale in glob.glob(os.path.join(out_dir, "*.safetensors")) + [os.path.join(out_dir, INDEX)]:
    if os.path.exists(stale):
      os.remove(stale)

  shards: list[list[HfEntry]] = [[]]
  size = 0
  for e in entries:
    leaf = leaves[e.hf_name]
    n = int(np.prod(leaf.shape[1 if e.layer is not None else 0:])) * np.dtype(leaf.dtype).itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += n
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  weight_map, total = {}, 0
  for fname, shard in zip(names, shards):
    tensors = {}
    for e in shard:
      leaf = leaves[e.hf_name]
      arr = np.asarray(leaf if e.layer is None else leaf[e.layer])
      tensors[e.hf_name] = np.ascontiguousarray(arr.T if e.transpose else arr)
      weight_map[e.hf_name] = fname
      total += tensors[e.hf_name].nbytes
    _save_shard(tensors, os.path.join(out_dir, fname))
    del tensors
  if len(shards) > 1:
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  return names + ([INDEX] if len(shards) > 1 else []) + ["config.json"]


def _save_shard(tensors: dict[str, np.ndarray], path: str) -> None:
  """safetensors' save_file, its I/O failures (a full disk) raised as the OSError they are."""
  try:
    save_file(tensors, path, metadata={"format": "pt"})
  except SafetensorError as e:
    m = re.search(r"os error (\d+)", str(e))
    if m:
      raise OSError(int(m.group(1)), os.strerror(int(m.group(1))), path) from None
    raise HFError(f"{path}: writing failed ({first_line(e)})") from None

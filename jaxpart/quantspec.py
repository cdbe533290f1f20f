"""Quantized storage formats for weights and the KV cache: what each stores and what it costs.

Jax-free, so the config validates `--quant` / `--kv-quant` against it and placement/ and cost/
count bytes from it. The numbers (values and scales) are made in jaxpart/quant/ (JAX) and
checked there against a NumPy oracle.

Weight formats act on each projection matrix W (in_features x out_features, as jaxpart stores
them: y = x @ W). "Channel" means output channel: one scale per column of W, as Hugging Face's
per-channel FP8 and int8 (rows of its out x in `weight`) store it.

The parameter tree of a quantized model (the contract runtime, checkpoint and cost share):
every per-layer projection leaf `w` (stacked L x rows x cols) keeps its name and shape and
holds the stored elements (int8, float8_e4m3fn; int4 values in [-8, 7] held in int8), and a
sibling leaf `w + "_scale"` holds float32 scales of shape `(L, *scale_shape(rows, cols))`, so
that W = w * scale broadcast (block scales repeated over their tile). Embeddings, norms,
biases and the LM head stay in the model dtype. A Hugging Face per-tensor FP8 checkpoint's
static activation scale, when present, is kept as `w + "_input_scale"` (L x 1 x 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jaxpart.errors import UserError


@dataclass(frozen=True)
class WeightFormat:
  """How one projection matrix is stored.

  element: the stored number type ("int8", "float8_e4m3fn", "int4"; "" for none)
  bits: bits per stored element (0 for none: the model dtype)
  scale: "channel" (one float32 per output column), "tensor" (one per matrix), "block"
    (one per block x block tile, DeepSeek-V3 / transformers fine-grained FP8), "group" (one per
    `block` input rows of each column: int4 group-wise) or "" for none
  block: the tile (block) or group size; 0 otherwise
  hf: True when a Hugging Face layout exists to write it in (`convert --to-format hf`)
  """

  name: str
  element: str
  bits: int
  scale: str
  block: int = 0
  hf: bool = False

  @property
  def quantized(self) -> bool:
    return self.bits > 0

  def scale_count(self, rows: int, cols: int) -> int:
    """Scales (float32 each) stored for one rows x cols matrix (rows = input features)."""
    if self.scale == "channel":
      return cols
    if self.scale == "tensor":
      return 1
    if self.scale == "block":
      return math.ceil(rows / self.block) * math.ceil(cols / self.block)
    if self.scale == "group":
      return math.ceil(rows / self.block) * cols
    return 0

  def scale_shape(self, rows: int, cols: int) -> tuple[int, int]:
    """Shape of one matrix's scales, broadcastable against (rows, cols) after block repeat."""
    if self.scale == "channel":
      return (1, cols)
    if self.scale == "tensor":
      return (1, 1)
    if self.scale == "block":
      return (math.ceil(rows / self.block), math.ceil(cols / self.block))
    if self.scale == "group":
      return (math.ceil(rows / self.block), cols)
    return (0, 0)

  def matrix_bytes(self, rows: int, cols: int, dtype_bytes: int) -> int:
    """Bytes of one rows x cols matrix with its scales; dtype_bytes when not quantized."""
    if not self.quantized:
      return rows * cols * dtype_bytes
    return math.ceil(rows * cols * self.bits / 8) + 4 * self.scale_count(rows, cols)


@dataclass(frozen=True)
class KVFormat:
  """How the KV cache stores K and V: `bits` per element plus one float32 scale per token per
  KV head (K and V each, made when the token is written: no calibration pass, and a new
  token never rescales old ones); bits 0 is the model dtype and no scales."""

  name: str
  element: str
  bits: int

  @property
  def quantized(self) -> bool:
    return self.bits > 0

  def element_bytes(self, dtype_bytes: int, head_dim: int) -> float:
    """Bytes per cached K (or V) element, the per-(token, head) scale spread over head_dim."""
    return self.bits / 8 + 4 / head_dim if self.quantized else dtype_bytes


WEIGHT_FORMATS = {f.name: f for f in (
    WeightFormat("none", "", 0, ""),
    WeightFormat("int8", "int8", 8, "channel"),
    WeightFormat("fp8", "float8_e4m3fn", 8, "channel", hf=True),
    WeightFormat("fp8-tensor", "float8_e4m3fn", 8, "tensor", hf=True),
    WeightFormat("fp8-block", "float8_e4m3fn", 8, "block", 128, hf=True),
    WeightFormat("int4", "int4", 4, "group", 128),
)}

KV_FORMATS = {f.name: f for f in (
    KVFormat("none", "", 0),
    KVFormat("int8", "int8", 8),
    KVFormat("fp8", "float8_e4m3fn", 8),
)}

# Largest finite magnitudes: what a scale maps a tensor's absolute maximum onto.
ELEMENT_MAX = {"int8": 127.0, "float8_e4m3fn": 448.0, "int4": 7.0}


def weight_format(name: str, field: str = "quant") -> WeightFormat:
  """The weight format called `name`, or a one-line error naming the field and the choices."""
  if name not in WEIGHT_FORMATS:
    raise UserError(f"{field} = {name!r}: valid weight formats are "
                    f"{', '.join(WEIGHT_FORMATS)}")
  return WEIGHT_FORMATS[name]


def kv_format(name: str, field: str = "kv_quant") -> KVFormat:
  """The KV format called `name`, or a one-line error naming the field and the choices."""
  if name not in KV_FORMATS:
    raise UserError(f"{field} = {name!r}: valid KV formats are {', '.join(KV_FORMATS)}")
  return KV_FORMATS[name]

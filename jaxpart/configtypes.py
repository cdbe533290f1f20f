"""The frozen configuration types: model, run shape, hardware, and the checks they make.

Every check raises ConfigError naming the field, the bad value and what would be valid, so a
typo in a TOML file or a flag fails loudly instead of planning a different model. Presets and
TOML loading live in jaxpart.config, which re-exports these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from jaxpart import quantspec
from jaxpart.errors import UserError
from jaxpart.models import spec as families

DTYPES = ("bfloat16", "float32", "float64")
DTYPE_BYTES = {"bfloat16": 2, "float32": 4, "float64": 8}
# JAX indexes positions and shapes with int32 unless jax_enable_x64 is on: a dimension (or a
# device count) beyond this cannot be indexed, so it is refused before any work starts.
MAX_INDEX = 2**31 - 1
# The Plan lists every layer's stage; far beyond any published transformer, and still quick.
MAX_LAYERS = 2**16


class ConfigError(UserError):
  """A configuration value is invalid; the message names field, value and what is valid."""


def _positive(obj: Any, *names: str) -> None:
  for name in names:
    value = getattr(obj, name)
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
        or not math.isfinite(value) or value <= 0):
      raise ConfigError(
          f"{type(obj).__name__}.{name} = {value!r}: must be a positive finite number")


def _non_negative(obj: Any, *names: str) -> None:
  for name in names:
    value = getattr(obj, name)
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
        or not math.isfinite(value) or value < 0):
      raise ConfigError(
          f"{type(obj).__name__}.{name} = {value!r}: must be a non-negative finite number")


def _positive_int(obj: Any, *names: str) -> None:
  for name in names:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(
          f"{type(obj).__name__}.{name} = {value!r}: must be a positive integer")
    if value > MAX_INDEX:
      raise ConfigError(
          f"{type(obj).__name__}.{name} = {value:,}: beyond what JAX indexes; at most "
          f"{MAX_INDEX:,} (2^31 - 1, int32 indices without jax_enable_x64)")


@dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1's rotary frequency scaling (Hugging Face `rope_type: "llama3"`): wavelengths
  longer than original_max_position_embeddings / low_freq_factor are divided by factor,
  shorter than .../ high_freq_factor are kept, and those between are interpolated."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int
  rope_type: str = "llama3"

  def __post_init__(self):
    if self.rope_type != "llama3":
      raise ConfigError(f"RopeScaling.rope_type = {self.rope_type!r}: only 'llama3' is supported")
    _positive(self, "factor", "low_freq_factor", "high_freq_factor")
    _positive_int(self, "original_max_position_embeddings")
    if self.high_freq_factor <= self.low_freq_factor:
      raise ConfigError(
          f"RopeScaling.high_freq_factor = {self.high_freq_factor!r}: must exceed "
          f"low_freq_factor = {self.low_freq_factor!r}")


@dataclass(frozen=True)
class ModelConfig:
  """A decoder stack. arch "dense" is the seed's pre-LN block without embeddings (input and
  output are B x T x D); arch "llama" is the Llama family (RMSNorm, RoPE, GQA, SwiGLU, token
  embedding, final norm and LM head; input token ids, output logits).

  The fields after ln_eps only mean something for a family that reads them (FamilySpec.uses,
  models/spec.py, which also lists the valid archs); others keep their defaults. ln_eps is the
  RMSNorm epsilon for "llama".
  """

  layers: int
  d_model: int
  n_heads: int
  head_dim: int
  d_ff: int
  dtype: str = "bfloat16"
  ln_eps: float = 1e-5
  arch: str = "dense"
  n_kv_heads: int = 0             # 0: as many K/V heads as query heads (no GQA)
  vocab: int = 0                  # 0 for dense (no embedding)
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_embeddings: bool = False
  qkv_bias: bool = False
  max_positions: int = 0          # 0: no stated limit
  quant: str = "none"             # weight storage format (quantspec.WEIGHT_FORMATS)
  kv_quant: str = "none"          # KV cache storage format (quantspec.KV_FORMATS)

  def __post_init__(self):
    if isinstance(self.rope_scaling, Mapping):  # from TOML or a manifest's to_dict
      try:
        object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
      except TypeError as e:
        raise ConfigError(f"ModelConfig.rope_scaling = {self.rope_scaling!r}: {e}; valid keys "
                          f"are {', '.join(f.name for f in fields(RopeScaling))}") from None
    self._check_family()
    _positive_int(self, "layers", "d_model", "n_heads", "head_dim", "d_ff")
    _positive(self, "ln_eps")
    if self.layers > MAX_LAYERS:
      raise ConfigError(f"ModelConfig.layers = {self.layers:,}: at most {MAX_LAYERS:,} (the Plan "
                        f"lists every layer's stage)")
    if self.dtype not in DTYPES:
      raise ConfigError(f"ModelConfig.dtype = {self.dtype!r}: valid dtypes are {', '.join(DTYPES)}")
    for name, formats in (("quant", quantspec.WEIGHT_FORMATS), ("kv_quant", quantspec.KV_FORMATS)):
      if getattr(self, name) not in formats:
        raise ConfigError(f"ModelConfig.{name} = {getattr(self, name)!r}: valid formats are "
                          f"{', '.join(formats)}")
    if self.n_heads * self.head_dim > self.d_model:
      raise ConfigError(
          f"ModelConfig.n_heads x head_dim = {self.n_heads} x {self.head_dim} = "
          f"{self.n_heads * self.head_dim} exceeds d_model = {self.d_model}: attention width must "
          f"be at most d_model (this family uses n_heads x head_dim = d_model / 4)")

  def _check_family(self) -> None:
    """The family fields: named, with what is valid, before any other check reads them."""
    family = families.get(self.arch) if isinstance(self.arch, str) else None
    if family is None:
      raise ConfigError(f"ModelConfig.arch = {self.arch!r}: valid archs are "
                        f"{', '.join(families.names())}")
    for name in ("tie_embeddings", "qkv_bias"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"ModelConfig.{name} = {getattr(self, name)!r}: must be true or false")
    for name in ("n_kv_heads", "vocab", "max_positions"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"ModelConfig.{name} = {value!r}: must be a non-negative integer")
    _positive(self, "rope_theta")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ConfigError(f"ModelConfig.rope_scaling = {self.rope_scaling!r}: must be None or a "
                        f"RopeScaling (factor, low_freq_factor, high_freq_factor, "
                        f"original_max_position_embeddings)")
    problem = family.config_problem(self)
    if problem:
      raise ConfigError(problem)

  @property
  def family(self) -> families.FamilySpec:
    """The family's jax-free description (models/spec.py): what differs by family."""
    return families.get(self.arch)

  @property
  def attn_dim(self) -> int:
    return self.n_heads * self.head_dim

  @property
  def kv_heads(self) -> int:
    """K/V heads: n_kv_heads, or n_heads when it is 0 (and always for dense)."""
    return self.n_kv_heads or self.n_heads

  @property
  def kv_dim(self) -> int:
    """Width of K (and of V): kv_heads x head_dim; attn_dim for dense."""
    return self.kv_heads * self.head_dim

  @property
  def dtype_bytes(self) -> int:
    return DTYPE_BYTES[self.dtype]

  @property
  def weight_format(self) -> quantspec.WeightFormat:
    """How projection matrices are stored (embeddings, norms and the head stay in dtype)."""
    return quantspec.WEIGHT_FORMATS[self.quant]

  @property
  def kv_format(self) -> quantspec.KVFormat:
    return quantspec.KV_FORMATS[self.kv_quant]

  @property
  def projection_params_per_layer(self) -> int:
    """Dense: Q, K, V (D x HDh each), O (HDh x D), MLP in and out (D x F, F x D); no biases.
    Llama: Q and O (D x HqE), K and V (D x HkvE), gate, up and down (D x F each)."""
    return self.family.projection_params_per_layer(self)

  @property
  def layernorm_params_per_layer(self) -> int:
    return self.family.layernorm_params_per_layer(self)

  @property
  def bias_params_per_layer(self) -> int:
    """Q, K and V biases (Qwen2); no other linear layer has one."""
    return self.attn_dim + 2 * self.kv_dim if self.qkv_bias else 0

  @property
  def params_per_layer(self) -> int:
    return (self.projection_params_per_layer + self.layernorm_params_per_layer
            + self.bias_params_per_layer)

  @property
  def embedding_params(self) -> int:
    """The token embedding table (V x D); 0 for dense."""
    return self.vocab * self.d_model

  @property
  def head_params(self) -> int:
    """Final RMSNorm and the LM head (D x V unless tied to the embedding); 0 for dense."""
    return self.family.head_params(self)

  @property
  def edge_params(self) -> int:
    """Parameters outside the layer stack: embedding, final norm, LM head."""
    return self.embedding_params + self.head_params

  @property
  def projection_params(self) -> int:
    return self.layers * self.projection_params_per_layer

  @property
  def layernorm_params(self) -> int:
    return self.layers * self.layernorm_params_per_layer

  @property
  def total_params(self) -> int:
    return self.layers * self.params_per_layer + self.edge_params


@dataclass(frozen=True)
class RunShape:
  """The input: batch rows of seq tokens, each a d_model vector."""

  batch: int
  seq: int

  def __post_init__(self):
    _positive_int(self, "batch", "seq")

  @property
  def tokens(self) -> int:
    return self.batch * self.seq


@dataclass(frozen=True)
class Hardware:
  """One accelerator and its links; every constant carries its source where it is defined."""

  name: str
  peak_flops: float        # dense bf16 FLOP/s
  hbm_bytes: float         # device memory capacity, bytes
  hbm_bw: float            # device memory bandwidth, bytes/s
  l2_bytes: float          # last-level on-chip cache, bytes
  l2_bw: float             # L2 read bandwidth, bytes/s
  link_bw: float           # per-direction device-to-device bandwidth, bytes/s
  link_latency: float      # per-collective latency, s
  # Simulated devices (XLA:CPU's --xla_force_host_platform_device_count) share one host's
  # cores: 0 means every device is its own chip. Measured by `jaxpart calibrate`; 0 = not
  # modelled for the costs below, which matter only where kernels are tiny.
  host_cores: int = 0
  gemm_call_s: float = 0.0        # fixed cost of one GEMM call, s
  gemm_element_s: float = 0.0     # per element of a GEMM's operands and result (converts,
                                  # packing) for an array that fits the L2, s
  gemm_spill_element_s: float = 0.0   # the same for an array larger than the L2, s
  score_element_s: float = 0.0    # attention: per score element beyond its FLOPs (mask, exp), s
  attention_visit_s: float = 0.0  # attention: per (query tile, KV block) pair visited, s

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ConfigError(f"Hardware.name = {self.name!r}: must be a non-empty string")
    _positive(self, "peak_flops", "hbm_bytes", "hbm_bw", "l2_bytes", "l2_bw", "link_bw",
              "link_latency")
    _non_negative(self, "gemm_call_s", "gemm_element_s", "gemm_spill_element_s",
                  "score_element_s", "attention_visit_s")
    if (not isinstance(self.host_cores, int) or isinstance(self.host_cores, bool)
        or self.host_cores < 0):
      raise ConfigError(f"Hardware.host_cores = {self.host_cores!r}: must be a non-negative "
                        f"integer (0: each device is its own chip)")

  @property
  def ridge_flop_per_byte(self) -> float:
    """Arithmetic intensity above which a kernel is compute- rather than HBM-bound."""
    return self.peak_flops / self.hbm_bw

"""Frozen configuration: the model, the run shape, the hardware; presets and TOML loading.

Every check raises ConfigError naming the field, the bad value and what would be valid, so a
typo in a TOML file or a flag fails loudly instead of planning a different model.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from jaxpart.errors import UserError

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
class ModelConfig:
  """A dense pre-LN transformer stack without embeddings: input and output are B x T x D."""

  layers: int
  d_model: int
  n_heads: int
  head_dim: int
  d_ff: int
  dtype: str = "bfloat16"
  ln_eps: float = 1e-5

  def __post_init__(self):
    _positive_int(self, "layers", "d_model", "n_heads", "head_dim", "d_ff")
    _positive(self, "ln_eps")
    if self.layers > MAX_LAYERS:
      raise ConfigError(f"ModelConfig.layers = {self.layers:,}: at most {MAX_LAYERS:,} (the Plan "
                        f"lists every layer's stage)")
    if self.dtype not in DTYPES:
      raise ConfigError(f"ModelConfig.dtype = {self.dtype!r}: valid dtypes are {', '.join(DTYPES)}")
    if self.n_heads * self.head_dim > self.d_model:
      raise ConfigError(
          f"ModelConfig.n_heads x head_dim = {self.n_heads} x {self.head_dim} = "
          f"{self.n_heads * self.head_dim} exceeds d_model = {self.d_model}: attention width must "
          f"be at most d_model (this family uses n_heads x head_dim = d_model / 4)")

  @property
  def attn_dim(self) -> int:
    return self.n_heads * self.head_dim

  @property
  def dtype_bytes(self) -> int:
    return DTYPE_BYTES[self.dtype]

  @property
  def projection_params_per_layer(self) -> int:
    """Q, K, V (D x HDh each), O (HDh x D), MLP in and out (D x F, F x D); no biases."""
    return 4 * self.d_model * self.attn_dim + 2 * self.d_model * self.d_ff

  @property
  def layernorm_params_per_layer(self) -> int:
    return 2 * 2 * self.d_model  # two LayerNorms, scale and bias each

  @property
  def params_per_layer(self) -> int:
    return self.projection_params_per_layer + self.layernorm_params_per_layer

  @property
  def projection_params(self) -> int:
    return self.layers * self.projection_params_per_layer

  @property
  def layernorm_params(self) -> int:
    return self.layers * self.layernorm_params_per_layer

  @property
  def total_params(self) -> int:
    return self.layers * self.params_per_layer


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

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ConfigError(f"Hardware.name = {self.name!r}: must be a non-empty string")
    _positive(self, "peak_flops", "hbm_bytes", "hbm_bw", "l2_bytes", "l2_bw", "link_bw",
              "link_latency")

  @property
  def ridge_flop_per_byte(self) -> float:
    """Arithmetic intensity above which a kernel is compute- rather than HBM-bound."""
    return self.peak_flops / self.hbm_bw


# --- presets -------------------------------------------------------------------------------

MODEL_PRESETS: dict[str, ModelConfig] = {
    # The seed's model exactly (seed section 1.2). 805,306,368 projection weights per layer.
    "paper": ModelConfig(layers=4, d_model=16384, n_heads=32, head_dim=128, d_ff=16384),
    # The seed claims 30B weights; with its other dimensions that needs d_ff ~ 220,690
    # (design.md section 2). 220,672 = 431 x 512 is the nearest value that tensor parallelism up
    # to 512 divides: 4 x 7,499,415,552 = 29,997,662,208 projection weights.
    "paper-30b": ModelConfig(layers=4, d_model=16384, n_heads=32, head_dim=128, d_ff=220672),
    # Same shape family (d_ff = d_model, n_heads x head_dim = d_model / 4, 4 layers), sized for
    # 2 CPU cores. 8 heads so that tp 8 (the seed's baseline) divides them.
    "small": ModelConfig(layers=4, d_model=512, n_heads=8, head_dim=16, d_ff=512),
    "tiny": ModelConfig(layers=4, d_model=128, n_heads=8, head_dim=4, d_ff=128),
}

RUN_PRESETS: dict[str, RunShape] = {
    "paper": RunShape(batch=128, seq=10000),   # seed section 1.3
    "paper-30b": RunShape(batch=128, seq=10000),
    "small": RunShape(batch=4, seq=1000),      # 1000 is not a multiple of 64: ragged chunks
    "tiny": RunShape(batch=2, seq=100),        # 100 is not a multiple of 64 either
}

HARDWARE_PRESETS: dict[str, Hardware] = {
    "h100": Hardware(
        name="h100",
        peak_flops=989e12,      # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16 tensor core
        hbm_bytes=80e9,         # datasheet: 80 GB HBM3
        hbm_bw=3.35e12,         # datasheet: 3.35 TB/s
        l2_bytes=50e6,          # H100 SXM L2 cache: 50 MB (Hopper architecture whitepaper)
        l2_bw=12e12,            # ~12 TB/s: order of published L2 microbenchmarks (Chips and
                                # Cheese, "Nvidia's H100", 2023); a modelling assumption
        link_bw=450e9,          # NVLink 4: 900 GB/s bidirectional = 450 GB/s per direction
        link_latency=5e-6,      # ~5 us per NCCL collective step on NVLink (nccl-tests small
                                # message latency); a modelling assumption
    ),
    "h200": Hardware(
        name="h200",
        peak_flops=989e12,      # NVIDIA H200 SXM datasheet: same compute as H100 SXM
        hbm_bytes=141e9,        # datasheet: 141 GB HBM3e
        hbm_bw=4.8e12,          # datasheet: 4.8 TB/s
        l2_bytes=50e6,          # same Hopper die as H100: 50 MB L2
        l2_bw=12e12,            # as h100 (same die); a modelling assumption
        link_bw=450e9,          # NVLink 4, as h100
        link_latency=5e-6,      # as h100; a modelling assumption
    ),
    "cpu": Hardware(
        name="cpu",
        peak_flops=1.0e11,      # nominal: 2 x86 cores x ~2.5 GHz x 2 FMA x 8 f32 lanes x 2;
                                # bf16 runs no faster on these CPUs. Order of magnitude only.
        hbm_bytes=24e9,         # this CI machine's RAM (env: 24 GiB)
        hbm_bw=2.0e10,          # nominal DDR bandwidth for 2 cores; order of magnitude only
        l2_bytes=2e6,           # nominal per-core L2 of a current x86 server core
        l2_bw=2.0e11,           # nominal; order of magnitude only
        link_bw=1.0e10,         # simulated devices share memory: a memcpy, nominal
        link_latency=2e-6,      # nominal host-side collective overhead; order of magnitude
    ),
}


@dataclass(frozen=True)
class Setup:
  """What a command works on: model, run shape and hardware."""

  model: ModelConfig
  run: RunShape
  hardware: Hardware
  preset: str = "custom"


def _check_name(kind: str, name: str, table: Mapping[str, Any]) -> None:
  if name not in table:
    raise ConfigError(f"{kind} = {name!r}: unknown; valid {kind}s are {', '.join(sorted(table))}")


def load_setup(preset: str | None = "small", hardware: str | None = None,
               config_file: str | None = None,
               overrides: Mapping[str, Any] | None = None) -> Setup:
  """Preset, then TOML file, then `section.field=value` overrides, each checked by name.

  TOML layout: optional top-level `preset = "small"` and `hardware = "h100"`, then tables
  `[model]`, `[run]`, `[hardware]` whose keys are the dataclass fields.
  """
  doc: dict[str, Any] = {}
  if config_file is not None:
    doc = _read_toml(config_file)
  preset = doc.get("preset", preset) if preset is None else preset
  preset = preset or "small"
  _check_name("preset", preset, MODEL_PRESETS)
  hw_value = doc.get("hardware")
  hw_table = hw_value if isinstance(hw_value, dict) else {}
  hw_name = hardware or (hw_value if isinstance(hw_value, str) else None) or hw_table.get(
      "name", "h100")
  _check_name("hardware", hw_name, HARDWARE_PRESETS)

  sections = {
      "model": [MODEL_PRESETS[preset], dict(doc.get("model", {}))],
      "run": [RUN_PRESETS[preset], dict(doc.get("run", {}))],
      "hardware": [HARDWARE_PRESETS[hw_name], {k: v for k, v in hw_table.items() if k != "name"}],
  }
  for key, value in (overrides or {}).items():
    section, _, name = key.partition(".")
    if section not in sections or not name:
      raise ConfigError(f"override {key!r}: write it as section.field with section one of "
                        f"model, run, hardware (for example model.d_ff=1024)")
    sections[section][1][name] = value

  built = {}
  for section, (base, changes) in sections.items():
    valid = {f.name: f for f in fields(base)}
    for name, value in changes.items():
      if name not in valid:
        raise ConfigError(f"{section}.{name}: unknown field; valid fields are "
                          f"{', '.join(valid)}")
      changes[name] = _coerce(section, name, value, type(getattr(base, name)))
    built[section] = replace(base, **changes)
  custom = any(changes for _, changes in sections.values())
  return Setup(model=built["model"], run=built["run"], hardware=built["hardware"],
               preset=preset if not custom else f"{preset}+custom")


_TOP_KEYS = {"preset": "a preset name (string)",
             "hardware": "a hardware name (string) or a [hardware] table",
             "model": "a [model] table", "run": "a [run] table"}


def _read_toml(path: str) -> dict[str, Any]:
  """The TOML document, its top level checked for known keys of the right kind; every OS or
  decoding failure is one line naming the file and the cause."""
  try:
    with open(path, "rb") as f:
      doc = tomllib.load(f)
  except FileNotFoundError:
    raise ConfigError(f"--config = {path!r}: no such file") from None
  except IsADirectoryError:
    raise ConfigError(f"--config = {path!r}: is a directory, not a TOML file") from None
  except PermissionError:
    raise ConfigError(f"--config = {path!r}: permission denied (not readable)") from None
  except OSError as e:
    raise ConfigError(f"--config = {path!r}: cannot read ({e.strerror or e})") from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"--config = {path!r}: not UTF-8 text (byte {e.start}): a TOML file is "
                      f"UTF-8") from None
  except tomllib.TOMLDecodeError as e:
    raise ConfigError(f"--config = {path!r}: not valid TOML ({e})") from None
  for key, value in doc.items():
    if key not in _TOP_KEYS:
      raise ConfigError(f"{path}: unknown key {key!r}; valid top-level keys are "
                        f"{', '.join(sorted(_TOP_KEYS))}")
    ok = (isinstance(value, str) if key == "preset" else
          isinstance(value, (str, dict)) if key == "hardware" else isinstance(value, dict))
    if not ok:
      raise ConfigError(f"{path}: {key} = {value!r}: expected {_TOP_KEYS[key]}")
  return doc


def _coerce(section: str, name: str, value: Any, kind: type) -> Any:
  """Command-line overrides arrive as strings; TOML values arrive typed."""
  if isinstance(value, str) and kind is not str:
    try:
      return int(value) if kind is int else float(value)
    except ValueError:
      raise ConfigError(f"{section}.{name} = {value!r}: must be a {kind.__name__}") from None
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def parse_overrides(items: list[str] | None) -> dict[str, str]:
  out = {}
  for item in items or []:
    key, eq, value = item.partition("=")
    if not eq:
      raise ConfigError(f"--set {item!r}: write it as section.field=value, for example "
                        f"model.layers=2")
    out[key.strip()] = value.strip()
  return out


def to_dict(obj: Any) -> dict[str, Any]:
  return dataclasses.asdict(obj)

"""Configuration: presets of the model, run shape and hardware, and TOML/flag loading.

config is the public home of the config types: they are defined in jaxpart.configtypes (split
off to keep each module small) and their public names are re-exported here, so callers name
everything config.X and one import gives the types with their presets. Private helpers are not
re-exported. Every check raises ConfigError naming the field, the bad value and what would be
valid.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from jaxpart.configtypes import (  # noqa: F401  (re-exported: config.X is the public name)
    DTYPE_BYTES, DTYPES, MAX_INDEX, MAX_LAYERS, ConfigError, Hardware, ModelConfig,
    RopeScaling, RunShape)


# --- presets -------------------------------------------------------------------------------

_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)

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
    # The Llama family, real shapes from each model's config.json (no weights needed to plan).
    # llama3-*: the Llama-3.1 configs (rope theta 500000 with llama3 frequency scaling, 131072
    # positions); Llama-3.0 has the same shapes and parameter counts but no scaling and 8192
    # positions. 8,030,261,248 and 70,553,706,496 parameters.
    "llama3-8b": ModelConfig(
        layers=32, d_model=4096, n_heads=32, head_dim=128, d_ff=14336, arch="llama",
        n_kv_heads=8, vocab=128256, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
        max_positions=131072),
    "llama3-70b": ModelConfig(
        layers=80, d_model=8192, n_heads=64, head_dim=128, d_ff=28672, arch="llama",
        n_kv_heads=8, vocab=128256, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
        max_positions=131072),
    # Mistral-7B-v0.3 (sliding window off, vocab 32768): 7,248,023,552 parameters.
    "mistral-7b": ModelConfig(
        layers=32, d_model=4096, n_heads=32, head_dim=128, d_ff=14336, arch="llama",
        n_kv_heads=8, vocab=32768, rope_theta=1000000.0, max_positions=32768),
    # Qwen2.5-7B: q/k/v biases, 28 heads over 4 K/V heads, untied: 7,615,616,512 parameters.
    "qwen2.5-7b": ModelConfig(
        layers=28, d_model=3584, n_heads=28, head_dim=128, d_ff=18944, ln_eps=1e-6,
        arch="llama", n_kv_heads=4, vocab=152064, rope_theta=1000000.0, qkv_bias=True,
        max_positions=32768),
    # Tests: GQA 8 query heads over 2 K/V heads (tp 2 splits them, tp 4 replicates them),
    # vocab 256 divisible by 16, untied head.
    "llama-tiny": ModelConfig(
        layers=4, d_model=64, n_heads=8, head_dim=8, d_ff=128, arch="llama", n_kv_heads=2,
        vocab=256, rope_theta=10000.0, max_positions=2048),
    # Serving benchmarks on CPU (serve-bench): wide enough that a step's matmuls are well above
    # the collectives' latency on 16 simulated devices, small enough for 2 cores. GQA 8 query
    # heads over 2 K/V heads; vocab 4096 splits over tp 16. 28,320,256 parameters.
    "llama-small": ModelConfig(
        layers=8, d_model=512, n_heads=8, head_dim=64, d_ff=1536, arch="llama", n_kv_heads=2,
        vocab=4096, rope_theta=10000.0, max_positions=2048),
}

RUN_PRESETS: dict[str, RunShape] = {
    "paper": RunShape(batch=128, seq=10000),   # seed section 1.3
    "paper-30b": RunShape(batch=128, seq=10000),
    "small": RunShape(batch=4, seq=1000),      # 1000 is not a multiple of 64: ragged chunks
    "tiny": RunShape(batch=2, seq=100),        # 100 is not a multiple of 64 either
    # Llama family: 8 sequences of 4096 tokens (a prefill batch; B x T x V float32 logits are
    # 16.8 GB at vocab 128256, split over the tensor axis).
    "llama3-8b": RunShape(batch=8, seq=4096),
    "llama3-70b": RunShape(batch=8, seq=4096),
    "mistral-7b": RunShape(batch=8, seq=4096),
    "qwen2.5-7b": RunShape(batch=8, seq=4096),
    "llama-tiny": RunShape(batch=2, seq=50),   # not a multiple of 64: ragged chunks
    "llama-small": RunShape(batch=4, seq=512),
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
        # This CI machine with XLA:CPU's simulated devices: 2 cores (Xeon VM, AVX-512), 24 GiB.
        # The rates are `jaxpart calibrate` on it, 2026-12-01 18:47 UTC, load 0.5, 16 simulated
        # devices, bf16, process CPU time (experiments/results/calibrate-cpu.toml); on another
        # machine run calibrate and load the file it writes with --config.
        name="cpu",
        peak_flops=1.91e11,     # fitted GEMM rate 1.43e11 FLOP/s / gemm_fraction
        hbm_bytes=24e9,         # this CI machine's RAM (env: 24 GiB)
        hbm_bw=1.34e10,         # bf16 elementwise pass over 16.8 MB (8 x the L2, with its
                                # float32 converts), read + write, / hbm_fraction
        l2_bytes=2097152.0,     # the per-core L2 Linux reports (2048K)
        l2_bw=1.70e10,          # the same pass over 128 kB, in the L2
        link_bw=6.03e9,         # ppermute among 16 devices: a device's share of the cores'
                                # time per byte, / link_fraction
        link_latency=4.5e-4,    # ppermute wall time's intercept
        host_cores=2,           # the simulated devices share this machine's 2 cores
        gemm_call_s=0.0,        # the fit's per-call term came out 0 (kernels in a loop)
        gemm_element_s=4.37e-10,       # per GEMM operand/result element, in the L2
        gemm_spill_element_s=6.16e-10,  # the same beyond the L2
        score_element_s=2.14e-9,       # attention: per score element beyond its FLOPs
        attention_visit_s=2.17e-6,     # attention: per (query tile, KV block) visited
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

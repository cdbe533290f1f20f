"""Presets, TOML loading, overrides, and that every bad value is refused by name."""

import pytest

from jaxpart import config
from jaxpart.models import dense as model
from jaxpart.config import ConfigError


def test_paper_preset_is_the_seed_model():
  s = config.load_setup("paper")
  m = s.model
  assert (m.layers, m.d_model, m.n_heads, m.head_dim, m.d_ff, m.dtype) == (
      4, 16384, 32, 128, 16384, "bfloat16")
  assert (s.run.batch, s.run.seq) == (128, 10000)
  # QKV 16384 x 3 x 4096 + O 4096 x 16384 + MLP 2 x 16384 x 16384 (design.md section 2)
  assert m.projection_params_per_layer == 805_306_368
  assert m.projection_params == 3_221_225_472


def test_paper_30b_is_about_30b():
  m = config.MODEL_PRESETS["paper-30b"]
  assert abs(m.projection_params - 30e9) / 30e9 < 0.001
  assert m.d_ff % 512 == 0


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_small_presets_keep_the_shape_family(name):
  m = config.MODEL_PRESETS[name]
  assert m.d_ff == m.d_model and m.attn_dim * 4 == m.d_model and m.layers == 4
  assert m.n_heads % 8 == 0  # the seed's baseline is tp 8


def test_some_small_preset_seq_is_ragged():
  assert any(config.RUN_PRESETS[n].seq % 64 for n in ("tiny", "small"))


@pytest.mark.parametrize("name", sorted(n for n, m in config.MODEL_PRESETS.items()
                                         if m.arch == "dense"))
def test_param_count_matches_formula(name):
  cfg = config.MODEL_PRESETS[name]
  shapes = model.param_shapes(cfg)
  counted = model.param_count(shapes)
  L, D, A, F = cfg.layers, cfg.d_model, cfg.attn_dim, cfg.d_ff
  assert counted == L * (3 * D * A + A * D + 2 * D * F + 4 * D)
  assert counted == cfg.total_params


def test_hardware_presets():
  h100, h200 = config.HARDWARE_PRESETS["h100"], config.HARDWARE_PRESETS["h200"]
  assert h100.peak_flops == 989e12 and h100.l2_bytes == 50e6 and h100.hbm_bw == 3.35e12
  assert h200.hbm_bw == 4.8e12 and h200.peak_flops == h100.peak_flops
  assert 290 < h100.ridge_flop_per_byte < 300 and 200 < h200.ridge_flop_per_byte < 210
  assert "cpu" in config.HARDWARE_PRESETS


def test_toml_and_overrides(tmp_path):
  f = tmp_path / "c.toml"
  f.write_text('preset = "tiny"\nhardware = "h200"\n[model]\nd_ff = 256\n[run]\nseq = 77\n')
  s = config.load_setup(preset=None, config_file=str(f), overrides={"model.layers": "2"})
  assert (s.model.d_ff, s.model.layers, s.run.seq, s.hardware.name) == (256, 2, 77, "h200")
  assert s.model.d_model == config.MODEL_PRESETS["tiny"].d_model


@pytest.mark.parametrize("overrides, needle", [
    ({"model.d_model": "0"}, "ModelConfig.d_model = 0"),
    ({"model.layers": "-1"}, "ModelConfig.layers = -1"),
    ({"run.seq": "0"}, "RunShape.seq = 0"),
    ({"model.head_dim": "64"}, "exceeds d_model"),
    ({"model.dtype": "float16"}, "valid dtypes are bfloat16, float32, float64"),
    ({"model.widht": "3"}, "model.widht: unknown field; valid fields are layers"),
    ({"nope.x": "3"}, "section.field"),
    ({"model.d_ff": "abc"}, "model.d_ff = 'abc': must be a int"),
    ({"hardware.l2_bytes": "-5"}, "Hardware.l2_bytes = -5.0"),
])
def test_bad_values_are_named(overrides, needle):
  with pytest.raises(ConfigError, match=None) as e:
    config.load_setup("tiny", overrides=overrides)
  assert needle in str(e.value)


def test_unknown_preset_and_hardware():
  with pytest.raises(ConfigError, match="valid presets are llama-small, llama-tiny, llama3-70b, llama3-8b, mistral-7b, "
                     "paper, paper-30b, qwen2.5-7b, small, tiny"):
    config.load_setup("huge")
  with pytest.raises(ConfigError, match="valid hardwares are cpu, h100, h200"):
    config.load_setup("tiny", hardware="tpu")


def test_unknown_toml_keys(tmp_path):
  f = tmp_path / "c.toml"
  f.write_text('[modle]\nlayers = 2\n')
  with pytest.raises(ConfigError, match="unknown key 'modle'"):
    config.load_setup(preset=None, config_file=str(f))
  f.write_text('[model]\nlayerz = 2\n')
  with pytest.raises(ConfigError, match="model.layerz: unknown field"):
    config.load_setup(preset=None, config_file=str(f))
  with pytest.raises(ConfigError, match="no such file"):
    config.load_setup(preset=None, config_file=str(tmp_path / "missing.toml"))


def test_override_syntax():
  with pytest.raises(ConfigError, match="section.field=value"):
    config.parse_overrides(["model.layers"])
  assert config.parse_overrides(["model.layers = 2"]) == {"model.layers": "2"}

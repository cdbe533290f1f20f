"""experiments/plots.py renders PNGs from the experiments' JSON (needs the `plot` extra)."""

import shutil
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is not installed

from experiments import common, plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_render_pngs_from_the_committed_json(tmp_path):
  pytest.importorskip("matplotlib")
  for name in plots.NEEDS:
    shutil.copy(common.RESULTS_DIR / f"{name}.json", tmp_path)
  ctx = common.Context(results_dir=tmp_path, measure=False, progress=False)
  res = plots.run(ctx)
  assert res.plots == [name for name, _ in plots.PLOTS]
  for name in res.plots:
    raw = (tmp_path / name).read_bytes()
    assert raw[:8] == PNG_MAGIC, name
    width, height = struct.unpack(">II", raw[16:24])   # the IHDR chunk
    assert (width, height) == (1200, 504), name        # 10 x 4.2 inches at 120 dpi
    assert len(raw) > 20_000, f"{name}: {len(raw)} bytes, a blank figure?"
  assert all(f"![{n}]({n})" in res.markdown() for n in res.plots)


def test_plots_name_the_missing_inputs(tmp_path):
  ctx = common.Context(results_dir=tmp_path, measure=False, progress=False)
  with pytest.raises(RuntimeError, match="chunk_sweep.json"):
    plots.run(ctx)

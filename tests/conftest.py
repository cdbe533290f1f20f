"""16 simulated CPU devices for every test; set before JAX is imported anywhere."""

import hashlib
import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=16").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


def require_devices(n: int) -> None:
  have = len(jax.devices())
  if have < n:
    pytest.skip(f"needs {n} devices, {have} present")


@pytest.fixture
def fresh_key(request):
  """A key that differs per test (and per run) so inputs are fresh, printed for replay."""
  import time  # noqa: PLC0415
  seed = int(os.environ.get("JAXPART_TEST_SEED", time.time_ns() % 2**31))
  print(f"{request.node.name}: JAXPART_TEST_SEED={seed}")
  return jax.random.key(seed)


def snapshot(root: Path) -> dict[str, str]:
  """Every file (hidden ones too) under root with its content hash: 'changes nothing' = equal."""
  out = {}
  for dirpath, dirnames, files in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
    for f in files:
      full = os.path.join(dirpath, f)
      out[os.path.relpath(full, root)] = hashlib.sha256(Path(full).read_bytes()).hexdigest()
  return out


def one_error(capsys, argv, needle, code=2):
  """Run the CLI in-process: exactly one `error:` line containing `needle`, exit status `code`,
  no traceback. Returns the line."""
  from jaxpart import cli  # noqa: PLC0415  (after XLA_FLAGS above; cli imports jax)
  rc = cli.main(argv)
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if "error:" in line]
  assert rc == code, err[-2000:]
  assert len(lines) == 1, err[-2000:]
  assert needle in lines[0], lines[0]
  assert "Traceback" not in err
  return lines[0]


def safetensors_dir(folder: Path) -> dict:
  """Every tensor of every .safetensors file in a folder, by name."""
  import safetensors.numpy as st  # noqa: PLC0415  (only the HF tests need it)
  out = {}
  for f in sorted(Path(folder).glob("*.safetensors")):
    out |= st.load_file(str(f))
  return out

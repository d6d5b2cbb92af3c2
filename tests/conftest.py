"""Shared fixtures: golden references of the original PyTorch UniFormerV2."""

import json
import os
import pathlib
import tempfile

# One persistent XLA compilation cache for the whole run, shared by pytest-xdist workers and
# by the subprocesses tests launch (they inherit the environment): identical computations
# (the same tiny models in many tests, relaunched training processes) compile once. Every
# executable is kept, however quick to compile: the float64 golden tests run eagerly, one small
# executable per operation, and sharing those between the two workers cut a cold run of
# test_model.py and test_layers.py from 302 to 256 s (114 s once the cache is warm).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "uniformerv2_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax
import numpy as np
import pytest

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "golden"


def golden_case(name: str):
  """(arrays, upstream constructor config) of a golden case."""
  z = np.load(GOLDEN / f"{name}.npz")
  arrays = {k: z[k] for k in z.files if k != "config_json"}
  return arrays, json.loads(str(z["config_json"]))["config"]


def torch_input_to_jax(x: np.ndarray) -> np.ndarray:
  """(N, C, T, H, W) PyTorch layout -> (N, T, H, W, C)."""
  return np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))


def rel_err(actual, expected) -> float:
  """max |a - e| / max |e|: the golden README's notion of relative error."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture
def x64():
  """float64 for the duration of one test (golden comparisons)."""
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="session")
def golden_dir():
  return GOLDEN


@pytest.fixture(scope="session")
def k400_dir(tmp_path_factory):
  """tiny_k400.pyth converted by the command line, with class names: a model directory."""
  from convert_cli import config_file, run_cli
  tmp = tmp_path_factory.mktemp("k400")
  names = tmp / "names.txt"
  names.write_text("".join(f"class {i}\n" for i in range(10)))
  code, out = run_cli("uniformerv2", "--input", GOLDEN / "tiny_k400.pyth",
                      "--model", config_file(tmp, "tiny_k400"), "--class-names", names,
                      "--output", tmp / "model")
  assert code == 0, out
  return tmp / "model"

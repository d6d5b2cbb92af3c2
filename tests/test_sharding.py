"""Mesh layout across hosts: a batch shard (a row along the `model` axis) must be fed by one
host, or each host would feed its own rows into replicas that silently diverge."""

import dataclasses

import numpy as np
import pytest

from uniformerv2_jax.sharding import model_axis_within_hosts


@dataclasses.dataclass(frozen=True)
class Device:  # what the layout check reads of a jax.Device
  id: int
  process_index: int


def _devices(hosts, per_host):
  return [Device(h * per_host + i, h) for h in range(hosts) for i in range(per_host)]


def test_model_axis_that_spans_hosts_is_laid_out_host_major():
  devices = _devices(2, 4)
  torus = np.array([devices[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)], dtype=object).reshape(2, 1, 4)
  grid = model_axis_within_hosts(torus, devices)  # each model row had both hosts' devices
  assert grid.shape == (2, 1, 4)
  assert [{d.process_index for d in row} for row in grid.reshape(-1, 4)] == [{0}, {1}]
  fine = np.array(devices, dtype=object).reshape(4, 1, 2)
  assert model_axis_within_hosts(fine, devices) is fine  # already within hosts: untouched


@dataclasses.dataclass(frozen=True)
class SliceDevice:  # a multislice job's device, as mesh_utils reads it (CPU: no torus)
  id: int
  process_index: int
  slice_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


def test_slices_are_stacked_along_data_only():
  """Two slices of 4 devices, listed interleaved: fsdp and model rows stay in one slice (their
  collectives ride the slice's own network) and the data axis holds one slice per half."""
  from uniformerv2_jax.sharding import device_grid
  devices = [SliceDevice(i, i // 2, i % 2) for i in range(8)]
  grid = device_grid([4, 2, 1], devices)
  assert grid.shape == (4, 2, 1) and sorted(d.id for d in grid.ravel()) == list(range(8))
  assert [{d.slice_index for d in grid[i].ravel()} for i in range(4)] == [{0}, {0}, {1}, {1}]
  as_given = device_grid([3, 1, 1], devices[:3])  # 2 slices do not divide 3 rows
  assert [d.id for d in as_given.ravel()] == [0, 1, 2] and as_given.shape == (3, 1, 1)


def test_model_axis_larger_than_a_host_is_refused():
  devices = _devices(2, 4)
  grid = np.array(devices, dtype=object).reshape(1, 1, 8)
  with pytest.raises(ValueError, match="model axis must lie within one host .*4 devices"):
    model_axis_within_hosts(grid, devices)


MICROBATCH_SCRIPT = """
import jax, numpy as np
from uniformerv2_jax import sharding as shd
from uniformerv2_jax.training.step import _microbatches
mesh = shd.make_mesh({"data": 2, "fsdp": 2, "model": 1})
x = jax.device_put(np.arange(16), shd.batch_sharding(mesh))
split = jax.jit(lambda v: _microbatches(v, 2, mesh, shd.BATCH_AXES))
print(np.asarray(split(x)).tolist())
hlo = split.lower(x).compile().as_text()
print([op for op in ("all-to-all", "collective-permute", "all-gather", "all-reduce") if op in hlo])
"""


def test_microbatches_are_contiguous_runs_of_each_device_rows():
  """Gradient accumulation's microbatch j is the j-th contiguous run of every device's rows:
  neighbouring rows (SSv2's two samples of a video, one upstream GPU's clips) stay together,
  and no row leaves its device."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", MICROBATCH_SCRIPT], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=root,
                                             XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  assert out.returncode == 0, out.stderr[-2000:]
  rows, collectives = out.stdout.split("\n")[:2]
  assert rows == str([[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]])
  assert collectives == "[]"  # the compiled split moves no data between devices

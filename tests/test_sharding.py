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


def test_model_axis_larger_than_a_host_is_refused():
  devices = _devices(2, 4)
  grid = np.array(devices, dtype=object).reshape(1, 1, 8)
  with pytest.raises(ValueError, match="model axis must lie within one host .*4 devices"):
    model_axis_within_hosts(grid, devices)

"""Device mesh and partition rules from the model's logical axis names.

Parameters carry `logical_axes` metadata (see `layers.py`): one name per dimension.
Rules map logical names to mesh axes. A dimension is sharded only if the mesh axis
divides it, and the FSDP rule applies only to tensors large enough to be worth it;
everything else is replicated. The same code serves 1 CPU, 8 GPUs and a TPU pod.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or None). "embed" is the FSDP axis of every weight matrix;
# "mlp"/"heads" are tensor-parallel axes (a `model` mesh axis of size 1 turns them off).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("classes", "model"),
    ("layers", None),
)
MIN_FSDP_SIZE = 2 ** 18  # tensors with fewer elements stay replicated


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, model) mesh; one entry may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [shape[a] for a in MESH_AXES] if isinstance(shape, Mapping) else list(shape)
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"found {len(devices)}")
  return Mesh(model_axis_within_hosts(device_grid(sizes, devices), devices), MESH_AXES)


def device_grid(sizes: Sequence[int], devices: Sequence) -> np.ndarray:
  """The devices laid out as the mesh: within a slice along its physical torus (splitting a
  physical axis where no other layout fits); several slices (multislice) stacked along
  `data`, so that only its gradient all-reduce crosses the slower data-centre network; in the
  given order where JAX knows no layout (CPU, or a data axis the slices do not divide)."""
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  for split in (False, True):
    try:
      if slices > 1:
        return mesh_utils.create_hybrid_device_mesh(
            [sizes[0] // slices, *sizes[1:]], [slices] + [1] * (len(sizes) - 1), devices,
            allow_split_physical_axes=split)
      return mesh_utils.create_device_mesh(sizes, devices=devices,
                                           allow_split_physical_axes=split)
    except (ValueError, NotImplementedError, AssertionError):
      continue
  return np.asarray(devices, dtype=object).reshape(sizes)


def model_axis_within_hosts(grid: np.ndarray, devices: Sequence) -> np.ndarray:
  """``grid`` if every batch shard's devices (a row along the last, ``model``, axis) belong to
  one host, else the devices in host-major order (a batch shard is fed by one host: spread
  over several, each would feed its own rows and the replicas would silently diverge)."""
  def within(g):
    rows = g.reshape(-1, g.shape[-1])
    return all(len({d.process_index for d in row}) == 1 for row in rows)

  if within(grid):
    return grid
  ordered = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id)),
                       dtype=object).reshape(grid.shape)
  if within(ordered):
    return ordered
  per_host = len(devices) // len({d.process_index for d in devices})
  raise ValueError(f"mesh model={grid.shape[-1]}: the model axis must lie within one host "
                   f"(each host has {per_host} devices); use a model size that divides it")


def spec_for(logical_axes, shape, mesh: Mesh, rules=DEFAULT_RULES,
             min_fsdp_size: int = MIN_FSDP_SIZE) -> P:
  """PartitionSpec for one array given its logical axis names."""
  if not logical_axes:
    return P()
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(logical_axes, shape):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    if "fsdp" in axes and math.prod(shape) < min_fsdp_size:
      axes = tuple(a for a in axes if a != "fsdp")
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def _logical_axes(var) -> tuple | None:
  if isinstance(var, nnx.Variable):
    return var.get_metadata().get("logical_axes")
  return None


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES, min_fsdp_size=MIN_FSDP_SIZE):
  """NamedShardings for an nnx.State (Variables with logical_axes metadata) or abstract one."""
  def one(var):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    axes = _logical_axes(var)
    if axes is None or not hasattr(value, "shape") or len(axes) != len(value.shape):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, spec_for(axes, value.shape, mesh, rules, min_fsdp_size))
  is_var = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(one, state, is_leaf=is_var)


def model_shardings(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES,
                    min_fsdp_size=MIN_FSDP_SIZE):
  """nnx.State of NamedSharding mirroring nnx.state(model)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules, min_fsdp_size)
  return jax.tree.map(lambda var, s: s, state, shardings,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

"""Pod sizing without a pod: compile the real train step for a Cloud TPU topology on a CPU host.

    python train.py --config=configs/k710_l14.py --aot_topology=v5p:4x4x4

needs `libtpu` (pip install "libtpu==0.0.42.*" for jax 0.10.2, i.e. `pip install jax[tpu]`'s pin).
Prints per-chip memory (`compiled.memory_analysis()`) and XLA's cost estimates.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from uniformerv2_jax import sharding as shd
from uniformerv2_jax.flops import device_peak_flops, train_flops_per_clip
from uniformerv2_jax.training import config_check, optim
from uniformerv2_jax.training.state import abstract_state, state_shapes
from uniformerv2_jax.training.step import setup_training


# Generations whose chips hold two TensorCores that JAX runs as one device (megacore), as on
# a real slice; libtpu's description of a v4 slice otherwise makes each TensorCore a device.
MEGACORE = ("v4", "v5p")


def topology_devices(topology: str):
  from jax.experimental import topologies
  kwargs = {"chip_config_name": "megacore"} if topology.split(":")[0] in MEGACORE else {}
  try:
    return topologies.get_topology_desc(topology, "tpu", **kwargs).devices
  except Exception as e:  # noqa: BLE001
    raise config_check.ConfigError(
        f"--aot_topology={topology}: cannot describe this TPU topology ({type(e).__name__}: {e}). "
        "Install the TPU compiler: pip install 'libtpu==0.0.42.*' (the pin of jax[tpu] 0.10.2); "
        "names look like v5p:4x4x4, v4:4x4x4, v5e:4x4.") from None


def _chips(topology: str) -> int | None:
  """64 for 'v4:4x4x4' (chips in the slice), None when the name has no shape."""
  try:
    return math.prod(int(d) for d in topology.split(":")[1].split("x"))
  except (IndexError, ValueError):
    return None


def compile_for_topology(config, topology: str) -> dict:
  devices = topology_devices(topology)
  hosts = len({d.process_index for d in devices})
  with config.unlocked():
    config.dataset.name = "fake"  # no data is read: shapes only
    config.init_from = None  # nor weights
    if config.model.attention in (None, "auto"):
      config.model.attention = "xla"  # what "auto" picks on a TPU (not on this host's device)
  cfg = config_check.check(config, n_devices=len(devices), n_processes=hosts)
  mesh = shd.make_mesh({a: config.mesh[a] for a in shd.MESH_AXES}, devices)
  tc = config.train
  steps_per_epoch = tc.steps_per_epoch or 1000
  setup = setup_training(config, cfg, mesh, optim.total_steps(tc, steps_per_epoch),
                         steps_per_epoch)
  state = abstract_state(state_shapes(setup.mdef, setup.tx, cfg.frozen), setup.shardings)
  b, t, s = tc.global_batch_size, config.input.clip_len, config.input.crop_size
  batch = {"video": jax.ShapeDtypeStruct((b, t, s, s, 3), jnp.uint8,
                                         sharding=setup.batch_shardings["video"]),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32,
                                         sharding=setup.batch_shardings["label"])}
  step = setup.train_step
  t0 = time.time()
  try:
    compiled = step.lower(state, batch).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise config_check.ConfigError(
        f"--aot_topology={topology}: the train step does not fit one chip's memory "
        f"({str(e).split('RESOURCE_EXHAUSTED: ')[-1].splitlines()[0]}). Try "
        "--config.model.remat=full (on all blocks: remat_blocks=-1), a larger "
        "--config.train.grad_accum_steps, or more fsdp "
        "(--config.mesh.fsdp=...).") from None
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = 2 ** 30
  out = {"topology": topology, "chips": len(devices), "hosts": hosts,
         "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
         "global_batch": b, "compile_seconds": seconds}
  if mem is not None:
    out.update(argument_gib=mem.argument_size_in_bytes / gib,
               output_gib=mem.output_size_in_bytes / gib, temp_gib=mem.temp_size_in_bytes / gib,
               alias_gib=mem.alias_size_in_bytes / gib,
               code_gib=mem.generated_code_size_in_bytes / gib)
    out["total_gib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                        + mem.temp_size_in_bytes - mem.alias_size_in_bytes
                        + mem.generated_code_size_in_bytes) / gib
  analytic = train_flops_per_clip(cfg) * b / len(devices)
  out["analytic_tflop_per_chip"] = analytic / 1e12
  peak = device_peak_flops(devices[0])  # per chip
  chips = _chips(topology)
  if peak and chips and chips < len(devices):
    peak *= chips / len(devices)  # each TensorCore a device (a generation not in MEGACORE)
  if peak:
    out["ideal_step_ms"] = analytic / peak * 1e3  # at 100% MFU: divide by the MFU you expect
  if cost:
    out["flops_per_chip"] = float(cost.get("flops", 0.0))
    for key in ("optimal_seconds", "utilization", "bytes accessed"):
      if key in cost:
        out[key.replace(" ", "_")] = float(cost[key])
  print(f"AOT {topology}: {out['chips']} x {out['device_kind']} ({hosts} hosts), mesh "
        f"{out['mesh']}, global batch {b}, compiled in {seconds:.0f}s")
  if mem is not None:
    print(f"  per-chip memory: {out['total_gib']:.2f} GiB (arguments {out['argument_gib']:.2f}, "
          f"outputs {out['output_gib']:.2f}, temporaries {out['temp_gib']:.2f}, aliased "
          f"{out['alias_gib']:.2f}, code {out['code_gib']:.3f}); the chip's HBM must hold "
          "it all (libtpu refuses a step only when the temporaries alone exceed it)")
  if cost:
    print(f"  XLA estimate per chip: {out['flops_per_chip'] / 1e12:.1f} TFLOP per step"
          + (f", step time {out['optimal_seconds'] * 1e3:.0f} ms"
             if out.get("optimal_seconds", -1) > 0
             else " (this compiler gave no valid step-time estimate)")
          + ("; scanned layers are counted once, not per layer" if cfg.scan_layers else ""))
  if peak:
    print(f"  analytic: {out['analytic_tflop_per_chip']:.1f} TFLOP per chip per step -> "
          f"{out['ideal_step_ms']:.0f} ms at 100% MFU, {out['ideal_step_ms'] / 0.5:.0f} ms at 50%")
  return out

"""Multi-host start-up shared by train.py and eval.py (`jax.distributed`)."""

from __future__ import annotations

import os

from absl import flags


def define_flags() -> None:
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  flags.DEFINE_string("cpu_collectives", None, "CPU cross-process collectives (gloo|mpi).")


def maybe_initialize(values=None) -> None:
  """jax.distributed.initialize() from explicit flags, or auto-detected on Cloud TPU / SLURM."""
  import jax
  values = values or flags.FLAGS
  if values.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", values.cpu_collectives)
  if values.coordinator_address or values.num_processes:
    jax.distributed.initialize(coordinator_address=values.coordinator_address,
                               num_processes=values.num_processes, process_id=values.process_id)
  elif any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                     "MEGASCALE_COORDINATOR_ADDRESS")) and \
      os.environ.get("SLURM_NTASKS", "2") != "1":
    jax.distributed.initialize()  # cluster auto-detection (Cloud TPU, SLURM)

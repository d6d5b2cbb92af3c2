"""Multi-host start-up shared by train.py and eval.py (`jax.distributed`).

`jax.distributed.initialize()` finds its peers by itself on a Cloud TPU VM (GCE metadata), on
GKE TPU nodes and multislice (TPU_* / MEGASCALE_* variables) and inside a SLURM step that srun
started with several tasks. Elsewhere (several GPU hosts, CPU hosts) the flags name them. A
single process, a lone GPU machine, or an sbatch shell without srun runs without it (a
single-host TPU VM starts it for one process, which is harmless).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

from absl import flags

# What srun sets in each task of a step (JAX's SLURM detection reads these).
SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                   "SLURM_LOCALID")
TPU_CLUSTER_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                    "MEGASCALE_COORDINATOR_ADDRESS")


class DistributedError(RuntimeError):
  """The processes of a multi-host run could not find each other."""


def process_0_value(value: int) -> int:
  """Process 0's integer `value` on every process, so that all hosts take the same branch,
  e.g. the same checkpoint step or the same error; `value` itself on a single process."""
  return int(process_0_floats([value])[0])


def process_0_floats(values) -> list[float]:
  """Process 0's float `values` on every process, bit for bit (each float64 travels as two
  int32 words: a float32 collective would round them); `values` itself on a single process."""
  import jax
  import numpy as np
  words = np.asarray(values, np.float64).view(np.int32)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    words = np.asarray(multihost_utils.broadcast_one_to_all(words), np.int32)
  return [float(v) for v in words.view(np.float64)]


def on_process_0(fn, error_elsewhere: Exception):
  """`fn()` on process 0 alone (work meant once, e.g. on a shared disk): its value there, None
  on the others. If it raises, every process raises (process 0 its own error, the others
  `error_elsewhere`), instead of the others waiting at a collective process 0 never joins."""
  import jax
  value = error = None
  if jax.process_index() == 0:
    try:
      value = fn()
    except Exception as e:  # noqa: BLE001 -- re-raised below, after the others know
      error = e
  if process_0_value(error is not None) and error is None:
    raise error_elsewhere
  if error is not None:
    raise error
  return value


def define_flags() -> None:
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  flags.DEFINE_string("cpu_collectives", None, "CPU cross-process collectives (gloo|mpi).")


def tpu_vm() -> bool:
  """TPU chips attached to this machine (libtpu installed and TPU chips on the PCI bus, JAX's
  own test; libtpu alone, as on a CPU host that compiles ahead of time for a TPU topology, is
  not a TPU VM)."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  try:
    from jax._src import hardware_utils  # private: guarded, with the device nodes as fallback
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, AttributeError, OSError):
    return bool(glob.glob("/dev/accel*"))


def cluster(environ=None, on_tpu_vm=None) -> str | None:
  """Which cluster jax.distributed can detect by itself here, or None."""
  env = os.environ if environ is None else environ
  if any(k in env for k in TPU_CLUSTER_VARS):
    return "Cloud TPU (GKE or multislice)"
  if all(k in env for k in SLURM_STEP_VARS):
    return "SLURM" if env["SLURM_NTASKS"] != "1" else None
  if on_tpu_vm if on_tpu_vm is not None else tpu_vm():
    return "Cloud TPU VM"
  return None


def _tasks_per_node(env) -> int | None:
  """Tasks of this srun step on each node, when every node runs the same number (srun's
  compressed form, e.g. "8(x2)"); None when they differ or srun did not say."""
  counts = set()
  for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
    match = re.fullmatch(r"(\d+)(?:\(x\d+\))?", part.strip())
    if match is None:
      return None
    counts.add(int(match.group(1)))
  return counts.pop() if len(counts) == 1 else None


def _visible_gpus(env) -> int | None:
  """GPUs this process may use: CUDA_VISIBLE_DEVICES's entries (what SLURM's gres sets), else
  the node's NVIDIA device nodes; None when it has none."""
  listed = env.get("CUDA_VISIBLE_DEVICES")
  if listed is not None:
    count = len([d for d in listed.split(",") if d.strip()])
  else:
    count = len([d for d in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", d)])
  return count or None


def slurm_local_device_ids(env) -> list[int] | None:
  """The GPUs (indices among those the task sees) this srun task drives, or None to leave the
  choice to JAX. JAX alone gives each task the one GPU of its SLURM_LOCALID: right for one
  task per GPU, but one task per node would drive one GPU of eight, and a task that srun bound
  to its own GPU (--gpus-per-task, --gpu-bind) sees one GPU 0, not GPU SLURM_LOCALID.
  A step with different task counts on its nodes is left to JAX."""
  gpus, tasks = _visible_gpus(env), _tasks_per_node(env)
  if gpus is None or tasks is None or "SLURM_LOCALID" not in env:
    return None
  if tasks == 1:
    return list(range(gpus))
  per_task = env.get("SLURM_GPUS_PER_TASK", "").rpartition(":")[2]  # "2" or "h100:2"
  on_node = env.get("SLURM_GPUS_ON_NODE", "")
  on_node = int(on_node) if on_node.isdigit() else None
  if gpus == 1 or (per_task.isdigit() and int(per_task) == gpus) or gpus * tasks == on_node:
    return list(range(gpus))  # bound: what it sees is its own
  if gpus % tasks or on_node not in (None, gpus):
    raise DistributedError(
        f"srun started {tasks} tasks on this node and this one sees {gpus} GPUs"
        f"{f' of its {on_node}' if on_node else ''}: neither its own share nor all of them to "
        "divide. Start one task per GPU or one per node (srun --ntasks-per-node), or bind GPUs "
        "to tasks (srun --gpus-per-task)")
  first = int(env["SLURM_LOCALID"]) * (gpus // tasks)  # all tasks see all: each takes a share
  return list(range(first, first + gpus // tasks))


def maybe_initialize(values=None, environ=None, on_tpu_vm=None) -> None:
  """jax.distributed.initialize() from explicit flags or JAX_COORDINATOR_ADDRESS, or auto-detected
  on Cloud TPU and in a multi-task SLURM step; nothing for a single process."""
  import jax
  values = values or flags.FLAGS
  env = os.environ if environ is None else environ
  if values.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", values.cpu_collectives)
  explicit = (values.coordinator_address or values.num_processes
              or "JAX_COORDINATOR_ADDRESS" in env)
  where = "the given coordinator" if explicit else cluster(env, on_tpu_vm)
  if where is None:
    return
  # In an srun step JAX would give each task the GPU of its SLURM_LOCALID, coordinator given
  # or not: the GPUs of this task instead
  own_ids = all(k in env for k in SLURM_STEP_VARS) and "JAX_LOCAL_DEVICE_IDS" not in env
  local_device_ids = slurm_local_device_ids(env) if own_ids else None
  gpus = {} if local_device_ids is None else {"local_device_ids": local_device_ids}
  try:
    if explicit:
      jax.distributed.initialize(coordinator_address=values.coordinator_address,
                                 num_processes=values.num_processes, process_id=values.process_id,
                                 **gpus)
    else:
      jax.distributed.initialize(**gpus)  # JAX's own cluster detection
  except (ValueError, RuntimeError) as e:
    todo = ("check that HOST:PORT is process 0's and reachable from every host, and that "
            "--num_processes and --process_id are set on each" if explicit else
            "Pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I to name the "
            "peers (under SLURM, start one process per task with srun)")
    raise DistributedError(f"multi-host start-up on {where} failed: "
                           f"{str(e).splitlines()[0].rstrip('.')}. {todo}.") from None

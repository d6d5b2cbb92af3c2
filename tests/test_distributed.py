"""Multi-host start-up: when jax.distributed.initialize() is called, and with what."""

import os
import types

import jax
import pytest

from uniformerv2_jax import distributed

SRUN = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
NO_FLAGS = types.SimpleNamespace(coordinator_address=None, num_processes=None, process_id=None,
                                 cpu_collectives=None)


@pytest.fixture
def calls(monkeypatch):
  made = []

  def initialize(**kwargs):
    made.append(kwargs)
  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  return made


@pytest.mark.parametrize("environ, on_tpu_vm, expected", [
    ({}, False, None),                                    # a lone process, a GPU machine
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, False, None),  # an sbatch shell, no srun
    (dict(SRUN, SLURM_NTASKS="1"), False, None),          # srun with one task
    (SRUN, False, "SLURM"),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, False, "Cloud TPU (GKE or multislice)"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "a"}, False, "Cloud TPU (GKE or multislice)"),
    ({}, True, "Cloud TPU VM"),                            # gcloud ... tpu-vm ssh --worker=all
])
def test_cluster_detection(environ, on_tpu_vm, expected, calls):
  assert distributed.cluster(environ, on_tpu_vm) == expected
  distributed.maybe_initialize(NO_FLAGS, environ, on_tpu_vm)
  assert calls == ([] if expected is None else [{}])


GRES8 = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_GPUS_ON_NODE": "8"}


@pytest.mark.parametrize("step, expected", [
    # one task per GPU, each seeing the node's 8: JAX's own choice (the GPU of SLURM_LOCALID)
    (dict(GRES8, SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_LOCALID="3"), [3]),
    # one task per node: all 8, not GPU 0 alone
    (dict(GRES8, SLURM_STEP_TASKS_PER_NODE="1(x4)", SLURM_LOCALID="0"), list(range(8))),
    # two tasks per node: four each, in SLURM_LOCALID's order
    (dict(GRES8, SLURM_STEP_TASKS_PER_NODE="2", SLURM_LOCALID="1"), [4, 5, 6, 7]),
    # srun bound each task to its GPU (--gpus-per-task=1): it sees one, as its GPU 0
    ({"CUDA_VISIBLE_DEVICES": "5", "SLURM_GPUS_PER_TASK": "1", "SLURM_GPUS_ON_NODE": "8",
      "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_LOCALID": "5"}, [0]),
    # bound to two each (--gpus-per-task=h100:2, 2 tasks per node): both of its own
    ({"CUDA_VISIBLE_DEVICES": "2,3", "SLURM_GPUS_PER_TASK": "h100:2",
      "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_LOCALID": "1"}, [0, 1]),
    ({"CUDA_VISIBLE_DEVICES": "2,3", "SLURM_GPUS_ON_NODE": "4",   # bound by --gpu-bind
      "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_LOCALID": "1"}, [0, 1]),
    # no GPU (a CPU cluster), uneven tasks per node: JAX decides
    ({"CUDA_VISIBLE_DEVICES": "", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_LOCALID": "0"}, None),
    (dict(GRES8, SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_LOCALID="0"), None),
])
def test_each_srun_task_drives_its_own_gpus(step, expected, calls):
  assert distributed.slurm_local_device_ids(step) == expected
  distributed.maybe_initialize(NO_FLAGS, dict(SRUN, **step), False)
  assert calls == [{} if expected is None else {"local_device_ids": expected}]
  calls.clear()  # JAX_LOCAL_DEVICE_IDS, JAX's own override, wins
  distributed.maybe_initialize(NO_FLAGS, dict(SRUN, **step, JAX_LOCAL_DEVICE_IDS="0"), False)
  assert calls == [{}]


@pytest.mark.parametrize("step, message", [
    (dict(CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", SLURM_STEP_TASKS_PER_NODE="3"),
     "srun started 3 tasks on this node and this one sees 8 GPUs: neither"),
    # --gpu-bind=closest: 8 tasks, each seeing its socket's 4 of the node's 8
    (dict(CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_GPUS_ON_NODE="8",
          SLURM_STEP_TASKS_PER_NODE="8"), "8 tasks on this node and this one sees 4 GPUs of its 8"),
])
def test_gpus_neither_bound_nor_divisible_are_one_message(step, message, calls):
  with pytest.raises(distributed.DistributedError, match=message):
    distributed.maybe_initialize(NO_FLAGS, dict(SRUN, **step), False)
  assert calls == []


def test_a_coordinator_given_under_srun_still_gets_the_tasks_gpus(calls):
  """JAX fills in what the flags leave out from SLURM, the GPU of SLURM_LOCALID included."""
  values = types.SimpleNamespace(coordinator_address="h:1234", num_processes=2, process_id=0,
                                 cpu_collectives=None)
  distributed.maybe_initialize(values, dict(SRUN, **GRES8, SLURM_STEP_TASKS_PER_NODE="1(x2)"),
                               False)
  assert calls == [dict(coordinator_address="h:1234", num_processes=2, process_id=0,
                        local_device_ids=list(range(8)))]


def test_flags_and_coordinator_variable_win(calls):
  values = types.SimpleNamespace(coordinator_address="h:1234", num_processes=2, process_id=1,
                                 cpu_collectives=None)
  distributed.maybe_initialize(values, {}, False)
  distributed.maybe_initialize(NO_FLAGS, {"JAX_COORDINATOR_ADDRESS": "h:1"}, False)
  assert calls == [dict(coordinator_address="h:1234", num_processes=2, process_id=1),
                   dict(coordinator_address=None, num_processes=None, process_id=None)]


def test_detection_that_fails_says_what_to_pass(monkeypatch):
  def initialize():
    raise ValueError("coordinator_address should be defined.\nmore")
  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  with pytest.raises(distributed.DistributedError,
                     match=r"multi-host start-up on Cloud TPU VM failed: coordinator_address "
                     r"should be defined\. Pass --coordinator_address=HOST:PORT"):
    distributed.maybe_initialize(NO_FLAGS, {}, True)


@pytest.mark.parametrize("libtpu, chips, expected", [
    (False, 4, False), (True, 0, False), (True, 4, True)])
def test_a_tpu_vm_has_libtpu_and_tpu_chips(monkeypatch, libtpu, chips, expected):
  """libtpu alone (a CPU host compiling ahead of time for a TPU topology) is no TPU VM."""
  import importlib.util

  from jax._src import hardware_utils
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: (object() if libtpu else None) if name == "libtpu"
                      else find_spec(name, *a))
  monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id",
                      lambda: (chips, None))
  assert distributed.tpu_vm() is expected


TWO_HOSTS = r'''
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from uniformerv2_jax import storage

def refuse(directory):
  raise PermissionError(f"{directory}: cannot write there (simulated)")
if jax.process_index() == 0:
  storage.ensure_writable = refuse
try:
  storage.ensure_writable_by_process_0(sys.argv[3])
except PermissionError as e:
  print("refused:", e, flush=True)

# The synthetic (demo) dataset on a disk both share: process 0 alone renders it.
from types import SimpleNamespace
from uniformerv2_jax.data import synthetic
from uniformerv2_jax.training import data_io
def rendered(*args, **kwargs):
  raise AssertionError("process 1 rendered the synthetic videos too")
if jax.process_index() == 1:
  synthetic.write_synthetic_videos = rendered
d = SimpleNamespace(name="synthetic", data_dir=sys.argv[4], num_train=4, num_val=2,
                    synthetic_size=32, synthetic_frames=8, synthetic_radius=synthetic.RADIUS,
                    synthetic_speed=synthetic.SPEED)
builder = data_io.source(SimpleNamespace(dataset=d))
print("train examples:", builder.info.splits["train"].num_examples, flush=True)

# A rerun of a finished run takes its last evaluation from summary.json, as process 0 reads it
# (here only process 0's folder has one): a host that evaluated alone would hang the others.
from uniformerv2_jax.training.loop import _summary_eval
print("summary eval:", repr(_summary_eval(sys.argv[5 + jax.process_index()], 4)), flush=True)
'''


def test_two_hosts_unwritable_workdir_and_shared_synthetic_dataset(tmp_path):
  """train.py and eval.py check the workdir on process 0; the other hosts must stop too,
  not wait at the first collective until the coordination service times out. Then both
  build the synthetic dataset on their shared disk: process 0 renders it, 1 finds it. Both
  take process 0's reading of summary.json, bit for bit."""
  import json
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  runs = [tmp_path / "run0", tmp_path / "run1"]
  for run in runs:
    run.mkdir()
  history = [{"step": 4, "top1": 0.1 + 0.2, "loss": 1 / 3, "count": 64.0}]  # not float32s
  (runs[0] / "summary.json").write_text(json.dumps({"history": history}))
  procs = [subprocess.Popen([sys.executable, "-c", TWO_HOSTS, f"127.0.0.1:{port}", str(i),
                             str(tmp_path / "work"), str(tmp_path / "tfds"), *map(str, runs)],
                            env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:  # a hang (the bug this guards against) must not leave them running
    for p in procs:
      p.kill()
  assert f"refused: {tmp_path / 'work'}: cannot write there (simulated)" in outs[0], outs[0]
  assert (f"refused: {tmp_path / 'work'}: process 0 cannot write there (its log says why)"
          in outs[1]), outs[1]
  for out in outs:
    assert "train examples: 4" in out, out
    assert f"summary eval: {dict(top1=0.1 + 0.2, loss=1 / 3, count=64.0)!r}" in out, out


def test_an_incomplete_explicit_setup_is_one_message():
  """(JAX's reason: the missing process count, or, in a test process whose backends already
  run, that initialize() comes too late: either way one line.)"""
  values = types.SimpleNamespace(coordinator_address="127.0.0.1:1", num_processes=None,
                                 process_id=None, cpu_collectives=None)
  with pytest.raises(distributed.DistributedError,
                     match=r"^multi-host start-up on the given coordinator failed: [^\n]+\. "
                     r"check that HOST:PORT is process 0's and reachable from every host"):
    distributed.maybe_initialize(values, {}, False)


SRUN_TASK = r'''
import sys, types
from uniformerv2_jax import distributed
distributed.maybe_initialize(types.SimpleNamespace(
    coordinator_address=None, num_processes=None, process_id=None, cpu_collectives="gloo"))
import jax
import numpy as np
from jax.experimental import multihost_utils
ids = multihost_utils.process_allgather(np.array([jax.process_index()]))
print("process", jax.process_index(), "of", jax.process_count(), "saw", ids.ravel().tolist(),
      flush=True)
'''


def test_two_srun_tasks_find_each_other_by_themselves(tmp_path):
  """What srun sets in each task of a 2-task step on one node: the processes start
  jax.distributed with no flag but --cpu_collectives (JAX's SLURM detection: the
  coordinator is the step's first node, its port derived from the job id) and meet."""
  import socket
  import subprocess
  import sys
  with socket.socket() as s:  # a free port in the range JAX derives from the job id
    for port in range(65535 - 2 ** 12 + 1 + 1234, 65536):
      try:
        s.bind(("", port))
        break
      except OSError:
        continue
    else:
      pytest.skip("no free port in JAX's SLURM range")
  job = port - (65535 - 2 ** 12 + 1)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # only srun's variables: none of a cluster this test may itself run in
  env = {k: v for k, v in os.environ.items() if not k.startswith(
      ("SLURM_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "CLOUD_TPU", "OMPI_"))}
  logs = [tmp_path / f"task{i}.log" for i in range(2)]  # files: a full pipe cannot stall them
  files = [open(log, "w") for log in logs]
  procs = [subprocess.Popen(
      [sys.executable, "-c", SRUN_TASK], cwd=tmp_path, stdout=files[i],
      stderr=subprocess.STDOUT,
      env=dict(env, PYTHONPATH=root, JAX_PLATFORMS="cpu", SLURM_JOB_ID=str(job),
               SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1", SLURM_NTASKS="2",
               SLURM_PROCID=str(i), SLURM_LOCALID=str(i))) for i in range(2)]
  try:
    procs[0].wait(timeout=120)
    procs[1].wait(timeout=30)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p, f in zip(procs, files):
      p.kill()
      p.wait()
      f.close()
  outs = [log.read_text() for log in logs]  # both, whichever hung
  for i, out in enumerate(outs):
    assert f"process {i} of 2 saw [0, 1]" in out, out[-2000:]

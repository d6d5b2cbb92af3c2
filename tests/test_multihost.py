"""Two processes on 127.0.0.1 (CPU, gloo): train, SIGKILL mid-run, resume == uninterrupted."""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "train_helper.py")
OVERRIDES = {"train.steps_per_epoch": 6, "train.checkpoint_every_steps": 2,
             "train.eval_every_epochs": 1.0}


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, mode="train", extra=None):
  port = free_port()
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return [subprocess.Popen(
      [sys.executable, HELPER, mode, str(workdir),
       json.dumps(dict(OVERRIDES, coordinator=f"127.0.0.1:{port}", num_processes=2,
                       process_id=i, **(extra or {})))],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def finish(procs):
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def test_two_processes_killed_and_resumed_match_uninterrupted(tmp_path):
  full, killed = tmp_path / "full", tmp_path / "killed"
  # The uninterrupted run goes first: later launches reuse its compiled steps (XLA cache).
  finish(launch(full))
  victims = launch(killed)
  # Kill both processes once step 5 is logged: step 4's save began only after step 2's had
  # finished (one async save at a time), so step 2 is on disk and the rerun must resume.
  for line in victims[0].stdout:
    if line.startswith("step 5/"):
      break
  for p in victims:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert "2" in os.listdir(killed / "checkpoints") and not (killed / "params.npz").exists()
  out = finish(launch(killed))[0]
  assert "Resumed from" in out, out[-3000:]
  a, b = np.load(full / "params.npz"), np.load(killed / "params.npz")
  assert int(a["step"]) == int(b["step"]) == 6
  for k in a.files:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)

  # The run the two hosts wrote reads as a model on one process (convert, eval on a
  # workstation) and on two, sharded over fsdp (eval.py or init_from on the same pod), even
  # when the second host lists a newer step than the first (a save landing in between).
  sys.path.insert(0, os.path.dirname(HELPER))
  from train_helper import flat_weights
  from uniformerv2_jax.checkpoint import load_weights_tree
  finish(launch(full, "load", {"mesh.data": 1, "mesh.fsdp": 2, "phantom_step_on_process": 1}))
  for loaded in (flat_weights(load_weights_tree(full)[1]), np.load(full / "loaded_2.npz")):
    assert sorted(loaded) == sorted(k for k in a.files if k != "step")
    for k in loaded:
      np.testing.assert_array_equal(loaded[k], a[k], err_msg=k)

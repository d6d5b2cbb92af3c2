"""Datasets, workdirs, model directories and evaluation output in a gs:// bucket.

A local Cloud Storage emulator (gcp-storage-emulator, tests/gcs_emulator.py) stands in for the
bucket; every client the product uses is pointed at it: etils.epath through fsspec/gcsfs
(EPATH_USE_TF=false: in production epath reaches gs:// through tf.io.gfile, whose endpoint
cannot be redirected), tensorstore (Orbax's arrays) and ArrayRecord's Cloud Storage client.
TensorBoard events go through TensorFlow's own GCS client, so the runs write them locally.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "uv2-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs_env(tmp_path_factory):
  port = _free_port()
  log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
  server = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "gcs_emulator.py"), "start", "--host=127.0.0.1",
       f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}"],
      stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      if server.poll() is not None or time.time() > deadline:
        server.kill()
        pytest.fail(f"the storage emulator did not start; see {log.name}")
      time.sleep(0.2)
  url = f"http://127.0.0.1:{port}"
  yield dict(os.environ, STORAGE_EMULATOR_HOST=url, CLOUD_STORAGE_EMULATOR_ENDPOINT=url,
             TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
             GOOGLE_CLOUD_PROJECT="test", EPATH_USE_TF="false", PYTHONPATH=ROOT)
  server.terminate()
  server.wait(timeout=30)
  log.close()


def test_whole_job_in_a_bucket(gcs_env, tmp_path):
  """Dataset read, training preempted and resumed, run read as a model, a model directory
  written and read, evaluation written: all in the bucket, all equal to the local run."""
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "object_store_helper.py"), f"gs://{BUCKET}",
       str(tmp_path)], env=gcs_env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
  assert "object store run: OK" in out.stdout


def _helper(gcs_env, mode, workdir, overrides, processes):
  env = dict(gcs_env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  if processes > 1:
    port = _free_port()
    runs = [dict(overrides, coordinator=f"127.0.0.1:{port}", num_processes=processes,
                 process_id=i) for i in range(processes)]
  else:
    runs = [overrides]
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "train_helper.py"), mode,
                             workdir, json.dumps(o)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for o in runs]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def test_two_hosts_share_a_bucket_workdir(gcs_env, tmp_path):
  """Two processes (fsdp 2: each host writes its half of the sharded arrays) train into one
  gs:// workdir; the run reads back on one process with exactly the state they restore."""
  workdir = f"gs://{BUCKET}/runs/two_hosts"
  common = {"train.steps_per_epoch": 4, "train.checkpoint_every_steps": 2, "out_dir": str(tmp_path),
            "train.tensorboard_dir": str(tmp_path / "tb")}
  out = _helper(gcs_env, "train", workdir, dict(common, **{"mesh.data": 1, "mesh.fsdp": 2}), 2)
  assert "SHARDING P('fsdp', None)" in out[0]  # the head kernel really is split over hosts
  _helper(gcs_env, "load", workdir, common, 1)
  trained, loaded = np.load(tmp_path / "params.npz"), np.load(tmp_path / "loaded_1.npz")
  assert int(trained["step"]) == 4
  assert sorted(loaded.files) == sorted(k for k in trained.files if k != "step")
  for k in loaded.files:
    np.testing.assert_array_equal(loaded[k], trained[k], err_msg=k)

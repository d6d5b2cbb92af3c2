"""Padding and sharding: 5 videos x 3 views on 1 device, on 8 simulated devices and on 2
processes x 4 devices (gloo collectives; also with the hosts' devices interleaved along the
mesh, as a TPU torus lays them out) give the same per-video scores, each view once."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r'''
import sys
import jax
mode, out = sys.argv[1], sys.argv[2]
if mode.startswith("multi"):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=sys.argv[3], num_processes=2,
                             process_id=int(sys.argv[4]))
import numpy as np
from flax import nnx
from uniformerv2_jax import UniFormerV2, model_config
from uniformerv2_jax.evaluation import Evaluator, array_batches, evaluate
from uniformerv2_jax.sharding import make_mesh

cfg = model_config(None, input_resolution=16, patch_size=8, width=32, layers=2, heads=2,
                   return_list=(0, 1), n_head=2, num_classes=5, t_size=2)
model = UniFormerV2(cfg, rngs=nnx.Rngs(0))
videos = np.random.default_rng(0).integers(0, 256, (5, 3, 2, 16, 16, 3), dtype=np.uint8)
per_host = 2 if jax.device_count() == 1 else jax.local_device_count()  # 15 rows: padding
batches = array_batches(videos, [4, 1, 2, 3, 4], per_host, video_ids=[10, 11, 12, 13, 14],
                        process_index=jax.process_index(), process_count=jax.process_count())
mesh = make_mesh({"data": -1, "fsdp": 1, "model": 1})
if mode == "multi_interleaved":  # hosts' devices alternate along the mesh, as on a TPU torus
  from jax.sharding import Mesh
  order = sorted(jax.devices(), key=lambda d: (d.id % jax.local_device_count(), d.process_index))
  mesh = Mesh(np.array(order).reshape(-1, 1, 1), mesh.axis_names)
evaluator = Evaluator(model, mesh)
res = evaluate(evaluator, batches, num_views=3, per_host_batch=per_host, log_every=0)
np.savez(out, ids=res.video_ids, labels=res.labels, scores=res.scores,
         devices=jax.device_count(), processes=jax.process_count())
'''


def _run(tmp_path, name, mode, devices, extra=()):
  script = tmp_path / "run_eval.py"
  if not script.exists():  # once: rewriting it while a started process reads it races
    script.write_text(SCRIPT)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  out = tmp_path / f"{name}.npz"
  return subprocess.Popen([sys.executable, str(script), mode, str(out), *extra], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out


def _wait(procs):
  for p, _ in procs:
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-3000:]
  return [dict(np.load(out)) for _, out in procs]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_same_scores_on_1_device_8_devices_and_2_hosts(tmp_path):
  addr = f"localhost:{_free_port()}"
  procs = [_run(tmp_path, "one", "single", 1), _run(tmp_path, "eight", "single", 8),
           _run(tmp_path, "host0", "multi", 4, (addr, "0")),
           _run(tmp_path, "host1", "multi", 4, (addr, "1"))]
  one, eight, host0, host1 = _wait(procs)
  addr = f"localhost:{_free_port()}"
  inter = _wait([_run(tmp_path, f"inter{i}", "multi_interleaved", 4, (addr, str(i)))
                 for i in range(2)])
  assert int(eight["devices"]) == 8 and int(host0["processes"]) == 2
  np.testing.assert_array_equal(one["ids"], [10, 11, 12, 13, 14])
  np.testing.assert_array_equal(one["labels"], [4, 1, 2, 3, 4])
  np.testing.assert_allclose(one["scores"].sum(-1), 1.0, rtol=1e-5)
  for other in (eight, host0, host1, *inter):
    np.testing.assert_array_equal(other["ids"], one["ids"])
    np.testing.assert_array_equal(other["labels"], one["labels"])
    np.testing.assert_allclose(other["scores"], one["scores"], rtol=1e-5, atol=1e-7)


def test_the_next_batch_runs_while_the_last_is_collected(monkeypatch):
  """One batch in flight: batch i+1 is dispatched before batch i is fetched and gathered, and
  every batch is still collected once, in order."""
  import jax.numpy as jnp

  from uniformerv2_jax.evaluation import array_batches, evaluate, runner
  events = []

  class Recording:
    def dispatch(self, video):
      i = int(video[0, 0, 0, 0, 0])
      events.append(f"dispatch {i}")
      return jnp.tile(jnp.eye(3, dtype=jnp.float32)[i % 3], (len(video), 1))

  fetch = runner.host_rows
  monkeypatch.setattr(runner, "host_rows", lambda a: events.append("fetch") or fetch(a))
  videos = np.broadcast_to(np.arange(4, dtype=np.uint8).reshape(4, 1, 1, 1, 1, 1),
                           (4, 1, 2, 2, 2, 3))  # video i's frames hold the value i
  res = evaluate(Recording(), array_batches(videos, [0, 1, 2, 0], 1), num_views=1,
                 per_host_batch=1, log_every=0)
  assert events == ["dispatch 0", "dispatch 1", "fetch", "dispatch 2", "fetch", "dispatch 3",
                    "fetch", "fetch"]
  np.testing.assert_array_equal(res.video_ids, [0, 1, 2, 3])
  np.testing.assert_array_equal(res.scores.argmax(-1), [0, 1, 2, 0])  # each its own batch's

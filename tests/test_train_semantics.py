"""What training promises beyond running: gradient accumulation is the step of one big batch,
and a non-finite loss stops the run and leaves a checkpoint to resume from (the analytic FLOPs
behind MFU: test_flops.py).

Every reference is computed independently of the code under test: the same global batch as one
microbatch, the checkpoint's own weights run through the loop's own step.
"""

import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)
from train_helper import restore, tiny_config  # noqa: E402

# One worker runs the module (--dist loadgroup), so its module fixtures run once.
pytestmark = pytest.mark.xdist_group("train_semantics")

# ---------------------------------------------------------------------------------------
# Gradient accumulation (config.train.grad_accum_steps, training/step.py)

# What may legitimately differ between one batch of 16 and microbatches of it is switched off:
# no Local MHRA, hence no BatchNorm (its batch statistics are per microbatch; the test with it
# sets replica_batch to the microbatch, where they are not); dropout and drop path are 0 and
# RandAugment is off in the tiny config (asserted in _train). Adam's eps is raised as in
# test_train.py: the key part of the qkv bias has an exactly-zero true gradient (softmax ignores
# it), so its float32 gradient is rounding noise that eps=1e-8 turns into +-lr updates of random
# sign (measured: 1.7e-4).
ACCUM = {"model.no_lmhra": True, "train.warmup_epochs": 0.0, "train.base_lr": 1e-3,
         "train.eps": 1e-3, "train.steps_per_epoch": 4}
ACCUM_STEPS = 2
MESH_RUN = {"train.grad_accum_steps": 4, "mesh.data": 2, "mesh.fsdp": 2}  # 4 clips a microbatch
# float32 tolerances. Adam's moments are the (averaged) gradients: sums over the same 16 clips
# grouped differently, equal up to a few float32 ulps of a leaf's largest entry (measured:
# 2.2e-6 of it, accum 2 and the mesh alike). Parameters move by ~2e-3 in two steps at lr 1e-3;
# with eps=1e-3 an update is close to linear in the gradient, and the parameters agree to an ulp
# or so (measured: 1.5e-8 with accum 2, 6e-8 on the mesh).
MOMENT_RTOL = 2e-5
STATS_RTOL = 1e-6  # BatchNorm running statistics, of their largest entry (measured: 1.2e-7)
PARAM_ATOL = 1e-6


def _jitted_step(config):
  """(model def, mesh, optimiser, state shardings, train step) built as the training loop builds
  them: the same program, so a second build is read from the persistent compilation cache."""
  from uniformerv2_jax.training.loop import build_model_config, make_mesh
  from uniformerv2_jax.training.step import setup_training
  cfg = build_model_config(config)
  mesh = make_mesh(config)
  tc = config.train
  setup = setup_training(config, cfg, mesh, int(round(tc.epochs * tc.steps_per_epoch)),
                         tc.steps_per_epoch)
  return setup.mdef, mesh, setup.tx, setup.shardings, setup.train_step


def _initial_state(overrides=None) -> dict:
  """The train state the loop starts from (seeded initialisation), flat, as numpy."""
  from uniformerv2_jax.training.state import create_train_state
  config = tiny_config({**ACCUM, **(overrides or {})})
  mdef, mesh, tx, _, _ = _jitted_step(config)
  state, _ = create_train_state(mdef, tx, mesh, seed=config.train.seed, frozen=mdef.cfg.frozen)
  return _flat(state)


def _train(accum: int, initial: dict, overrides=None, steps: int = 2):
  """(final state, metrics of each step) of `steps` train steps from `initial`, as numpy."""
  from uniformerv2_jax.training import config_check, data_io
  from uniformerv2_jax.training.state import state_shapes
  config = tiny_config({**ACCUM, "train.grad_accum_steps": accum, **(overrides or {})})
  config_check.check(config)
  mdef, mesh, tx, shardings, step = _jitted_step(config)
  cfg = mdef.cfg
  assert cfg.no_lmhra or cfg.replica_batch == config.train.global_batch_size // ACCUM_STEPS
  assert cfg.drop_path_rate == cfg.backbone_drop_path_rate == 0
  assert cfg.cls_dropout == 0 and not any(cfg.mlp_dropout) and not config.input.randaugment
  state = jax.tree_util.tree_map_with_path(
      lambda path, _, sharding: jax.device_put(initial[jax.tree_util.keystr(path)], sharding),
      state_shapes(mdef, tx, cfg.frozen), shardings)
  batches = data_io.train_batches(config, None, config.train.global_batch_size, 0)
  metrics = []
  for _ in range(steps):
    state, m = step(state, data_io.to_global(next(batches), mesh))
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  return _flat(state), metrics


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(jax.device_get(v))
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_step(got, want, what):
  """Final train states and per-step metrics of two runs agree up to float32 reassociation."""
  (g_state, g_metrics), (w_state, w_metrics) = got, want
  assert sorted(g_state) == sorted(w_state)
  checked = {"params": 0, "moments": 0, "stats": 0}
  for k, w in w_state.items():
    g = g_state[k]
    assert g.shape == w.shape and g.dtype == w.dtype, k
    if k.startswith("['params']"):
      np.testing.assert_allclose(g, w, rtol=0, atol=PARAM_ATOL, err_msg=f"{what}: {k}")
      checked["params"] += 1
    elif ".mu[" in k or ".nu[" in k:
      np.testing.assert_allclose(g, w, rtol=0, atol=MOMENT_RTOL * np.abs(w).max(),
                                 err_msg=f"{what}: {k}")
      checked["moments"] += 1
    elif k.startswith("['batch_stats']"):  # means of the same statistics, summed otherwise
      np.testing.assert_allclose(g, w, rtol=0, atol=STATS_RTOL * np.abs(w).max(),
                                 err_msg=f"{what}: {k}")
      checked["stats"] += 1
    else:  # step, RNG, Adam's count
      np.testing.assert_array_equal(g, w, err_msg=f"{what}: {k}")
  assert checked["params"] > 40 and checked["moments"] == 2 * checked["params"], checked
  assert len(g_metrics) == len(w_metrics) == 2
  for i, (g, w) in enumerate(zip(g_metrics, w_metrics)):
    assert g["top1"] == w["top1"] and g["lr"] == w["lr"], (what, i, g, w)
    np.testing.assert_allclose([g["loss"], g["grad_norm"]], [w["loss"], w["grad_norm"]],
                               rtol=1e-5, err_msg=f"{what}: loss, grad norm of step {i + 1}")


@pytest.fixture(scope="module")
def accum_runs(tmp_path_factory):
  """{"initial": state, "accum A": (final state, metrics)}: two steps on one device from the
  loop's initial state; "mesh": (subprocess, output) of the same with accum=4 on a 2 x 2
  (data x fsdp) mesh of simulated CPU devices, read by the file's last test (it overlaps)."""
  tmp = tmp_path_factory.mktemp("accum")
  initial = _initial_state()
  np.savez(tmp / "initial.npz", **initial)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(tmp / "initial.npz"),
                           str(tmp / "mesh.npz")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    yield {"initial": initial, "accum 1": _train(1, initial),
           f"accum {ACCUM_STEPS}": _train(ACCUM_STEPS, initial), "mesh": (proc, tmp / "mesh.npz")}
  finally:
    proc.kill()
    proc.communicate()


def test_grad_accumulation_is_one_big_batch(accum_runs):
  """accum=2 (two microbatches of 8, gradients summed by a lax.scan and halved) gives the
  parameters, Adam moments and metrics of the 16-clip batch, two steps in a row."""
  want = accum_runs["accum 1"]
  moved = max(np.abs(want[0][k] - accum_runs["initial"][k]).max()
              for k in want[0] if k.startswith("['params']"))
  assert moved > 1000 * PARAM_ATOL  # two states that really moved
  _assert_same_step(accum_runs[f"accum {ACCUM_STEPS}"], want, f"accum {ACCUM_STEPS}")


def test_grad_accumulation_with_batchnorm_is_one_big_batch():
  """With Local MHRA (BatchNorm) and replica_batch = the microbatch (8 clips, as on two upstream
  GPUs), accum=2 is the 16-clip step: the same per-group batch statistics in the forward, and
  the running statistics moved once per step by their mean (as the upstream's one forward per
  step), not once per microbatch."""
  overrides = {"model.no_lmhra": False, "model.replica_batch": 8}
  initial = _initial_state(overrides)
  assert any(k.startswith("['batch_stats']") for k in initial)
  want = _train(1, initial, overrides)
  moved = max(np.abs(want[0][k] - initial[k]).max() for k in want[0]
              if k.startswith("['batch_stats']"))
  assert moved > 1000 * STATS_RTOL  # running statistics that really moved
  _assert_same_step(_train(ACCUM_STEPS, initial, overrides), want, "accum with BatchNorm")


def test_grad_accumulation_traces_under_x64(x64):
  """With jax_enable_x64 (what a float64 model needs) the accumulating step has the outputs
  (structure, shapes, dtypes) of the plain one. Traced only, nothing compiled."""
  from uniformerv2_jax.training.loop import build_model_config, make_mesh
  from uniformerv2_jax.training.optim import make_optimizer
  from uniformerv2_jax.training.state import model_def, state_shapes
  from uniformerv2_jax.training.step import make_train_step
  outs = []
  for accum in (1, ACCUM_STEPS):
    config = tiny_config({**ACCUM, "train.grad_accum_steps": accum, "model.dtype": "float64",
                          "model.param_dtype": "float64"})
    cfg = build_model_config(config)
    mesh = make_mesh(config)
    tx, schedule = make_optimizer(config.train, 4, 4)
    mdef = model_def(cfg, mesh)
    step = make_train_step(mdef, tx, schedule, config, mesh)
    batch = {"video": jax.ShapeDtypeStruct((16, 4, 16, 16, 3), jnp.uint8),
             "label": jax.ShapeDtypeStruct((16,), jnp.int32)}
    outs.append(jax.eval_shape(step, state_shapes(mdef, tx, cfg.frozen), batch))
  assert jax.tree.structure(outs[1]) == jax.tree.structure(outs[0])
  assert jax.tree.leaves(outs[1]) == jax.tree.leaves(outs[0])
  assert jax.tree.leaves(outs[0][0]["params"])[0].dtype == jnp.float64


# ---------------------------------------------------------------------------------------
# Divergence: "A NaN or infinite loss stops the run, keeping the last good checkpoint" (README)

# A real divergence: step 1 runs at lr 1e-3 (warmup_start_lr), step 2 at 5e9 (half-way through
# a 2-step warm-up to 1e10). Adam moves every weight by ~lr, so the weights after step 2 are
# ~5e9 and the loss computed from them (reported as step 3's) is NaN. A checkpoint after every
# step; logging off, so the check that runs is the one guarding the checkpoints.
DIVERGE = {**ACCUM, "train.steps_per_epoch": 8, "train.warmup_epochs": 0.25,
           "train.warmup_start_lr": 1e-3, "train.base_lr": 1e10,
           "train.checkpoint_every_steps": 1, "train.log_every_steps": 100,
           "train.keep_checkpoints": 1}  # keeps 2: the newest is not yet known good
MESSAGE = (r"Loss became (?P<loss>\S+) \(grad norm \S+\) at step (?P<bad>\d+); stopped\. The last "
           r"good checkpoint is step (?P<good>\d+) in (?P<dir>\S+); a rerun resumes from it\. "
           r"Steps \[(?P<aside>[\d, ]+)\], saved after the last finite loss, may hold the "
           r"diverging weights: moved to (?P<to>\S+) \(to resume from one, move it back into "
           r"(?P=dir) under its step number\)\. "
           r"Lower train\.base_lr or check the data, then rerun\.")


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
  """(config, workdir, match of the error message) of a run of train_and_evaluate that diverged."""
  from uniformerv2_jax.training import loop
  workdir = tmp_path_factory.mktemp("diverged")
  config = tiny_config(DIVERGE)
  with pytest.raises(loop.TrainingDiverged) as info:
    loop.train_and_evaluate(config, str(workdir))
  match = re.fullmatch(MESSAGE, str(info.value))
  assert match, str(info.value)
  return config, workdir, match


def _saved_steps(workdir):
  return sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())


def test_nonfinite_loss_stops_before_saving(diverged):
  """The run stops at the first non-finite loss (step 3) with the documented message; nothing
  from that step on is saved; step 2, saved after the last finite loss (step 2's, from step 1's
  weights), is set aside, not deleted; the step it names is the latest on disk (what a rerun
  resumes from) and holds finite weights and optimiser state."""
  config, workdir, m = diverged
  bad, good = int(m["bad"]), int(m["good"])
  assert not math.isfinite(float(m["loss"]))
  assert bad == 3  # the first loss computed from weights moved at the 5e9 learning rate
  assert m["dir"] == str(workdir / "checkpoints")
  assert _saved_steps(workdir) and max(_saved_steps(workdir)) == good == 1
  assert m["aside"] == "2" and m["to"] == str(workdir / "diverged")
  assert os.listdir(workdir / "diverged") == ["2"]
  state, meta = restore(config, str(workdir))
  assert int(meta["step"]) == int(state["step"]) == good
  for name in ("params", "opt_state"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(state[name])[0]:
      assert np.isfinite(np.asarray(leaf)).all(), (name, jax.tree_util.keystr(path))


def test_a_resumed_checkpoint_is_not_vouched_for_before_its_loss(tmp_path):
  """A run preempted right after saving step 2 never computed a loss from step 2's weights: when
  the rerun's first loss (step 3's) is NaN, step 2 is set aside and step 1 named, as in an
  uninterrupted run."""
  from uniformerv2_jax.training import loop

  class PreemptedAfterStep2(loop.PreemptionWatcher):
    def reached(self, step):
      return step == 2

  config = tiny_config(DIVERGE)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(loop, "PreemptionWatcher", PreemptedAfterStep2)
    summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary["preempted"] and _saved_steps(tmp_path) == [1, 2]
  with pytest.raises(loop.TrainingDiverged) as info:
    loop.train_and_evaluate(config, str(tmp_path))
  m = re.fullmatch(MESSAGE, str(info.value))
  assert m, str(info.value)
  assert (int(m["bad"]), int(m["good"]), m["aside"]) == (3, 1, "2")
  assert _saved_steps(tmp_path) == [1] and os.listdir(tmp_path / "diverged") == ["2"]


def test_last_good_checkpoint_resumes_with_a_finite_loss(diverged):
  """"a rerun resumes from it": the first thing the rerun computes is the loss of that
  checkpoint's weights on its next batch (here: the loop's own step on the restored state),
  and a good checkpoint's is finite.

  The loss reported for step s is computed from the weights *before* step s's update, those
  saved at step s - 1: a finite loss at step s vouches for checkpoint s - 1, not for s.
  """
  from uniformerv2_jax.training import data_io
  config, workdir, m = diverged
  state, meta = restore(config, str(workdir))
  good = int(meta["step"])
  _, mesh, _, _, step = _jitted_step(config)  # the program the loop compiled
  batch = next(data_io.train_batches(config, None, config.train.global_batch_size, good))
  _, metrics = step(state, data_io.to_global(batch, mesh))
  loss = float(metrics["loss"])
  assert math.isfinite(loss), (
      f"the 'last good checkpoint' (step {good}) resumes with loss {loss} at step {good + 1}; "
      f"the run stopped at step {m['bad']} because of these very weights")


def test_grad_accumulation_on_a_mesh(accum_runs):
  """accum=4 on 4 simulated devices (parameters and moments sharded over fsdp, each microbatch
  of 4 clips split over data x fsdp) is still the 1-device step of the 16-clip batch.
  Last in the file: its subprocess ran alongside everything above."""
  proc, out = accum_runs["mesh"]
  log, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, log[-3000:]
  z = np.load(out)
  state = {k[len("state/"):]: z[k] for k in z.files if k.startswith("state/")}
  metrics = [dict(zip(("loss", "grad_norm", "top1", "lr"), map(float, row)))
             for row in z["metrics"]]
  _assert_same_step((state, metrics), accum_runs["accum 1"], "accum 4 on a 2x2 mesh")


# ---------------------------------------------------------------------------------------
# The fake dataset's validation split (training/data_io.py)

@pytest.mark.parametrize("num_val,per_host", [(10, 3), (12, 3), (5, 4)])
def test_fake_validation_counts_each_clip_once(num_val, per_host, monkeypatch):
  """Over all hosts, the masked-in rows of the fake validation batches are num_val clips,
  whatever the batch (the last batch is padding past them)."""
  from uniformerv2_jax.training import data_io
  config = tiny_config({"dataset.num_val": num_val})
  counts = []
  for host in range(2):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda host=host: host)
    batches = list(data_io.eval_batches(config, None, per_host))
    assert all(b["video"].shape[0] == per_host == len(b["mask"]) for b in batches)
    counts.append(sum(int(b["mask"].sum()) for b in batches))
  assert sum(counts) == num_val, counts


BARE_MACHINE = r"""
import sys
for name in ("av", "tensorflow", "tensorflow_datasets"):
  sys.modules[name] = None  # any import of them raises ImportError
sys.path.insert(0, sys.argv[1])
import jax
import jax.numpy as jnp
from train_helper import tiny_config
from uniformerv2_jax.training.loop import build_model_config, make_mesh
from uniformerv2_jax.training.state import abstract_state, state_shapes
from uniformerv2_jax.training.step import setup_training
config = tiny_config({"input.randaugment_on": "crops"})
cfg, mesh = build_model_config(config), make_mesh(config)
setup = setup_training(config, cfg, mesh, 4, 4)
state = abstract_state(state_shapes(setup.mdef, setup.tx, cfg.frozen), setup.shardings)
b, t, s = 16, config.input.clip_len, config.input.crop_size
batch = {"video": jax.ShapeDtypeStruct((b, t, s, s, 3), jnp.uint8),
         "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
print("lowered:", type(setup.train_step.lower(state, batch)).__name__)
"""


def test_the_train_step_needs_neither_pyav_nor_tensorflow():
  """An accelerator machine without them (the GPU image of benchmarks/gpu_session.sh) builds
  train.py's step, on-device normalisation and RandAugment included."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", BARE_MACHINE, TESTS], env=env, capture_output=True,
                       text=True, timeout=300)
  assert "lowered: Lowered" in out.stdout, out.stdout + out.stderr


if __name__ == "__main__":  # accum_runs' subprocess: 4 CPU devices
  assert jax.device_count() == 4, jax.devices()
  start = dict(np.load(sys.argv[1]))
  final, per_step = _train(MESH_RUN["train.grad_accum_steps"], start, MESH_RUN)
  np.savez(sys.argv[2], metrics=np.array([[m[k] for k in ("loss", "grad_norm", "top1", "lr")]
                                          for m in per_step]),
           **{"state/" + k: v for k, v in final.items()})


"""Training end to end on simulated devices: sharding equivalence, preemption, re-meshing."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "train_helper.py")
# One worker runs the module (--dist loadgroup), so its module fixture runs once.
pytestmark = pytest.mark.xdist_group("train")


def run_helper(mode, workdir, overrides, devices=1, wait=True):
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.Popen([sys.executable, HELPER, mode, str(workdir), json.dumps(overrides)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same 4 steps on 1 device and on 8 (data=4, fsdp=2), run in parallel."""
  d1, d8 = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("eight")
  # Adam divides by sqrt(v) + eps: where a gradient is ~1e-8, a one-ulp change of reduction
  # order flips the sign of a whole lr-sized update. A larger eps keeps updates linear in
  # small gradients, so the comparison tests the sharding, not Adam's conditioning.
  adam = {"train.eps": 1e-3}
  p1 = run_helper("train", d1, adam, 1, wait=False)
  p8 = run_helper("train", d8, dict(adam, **{"mesh.data": 4, "mesh.fsdp": 2}), 8, wait=False)
  outs = []
  for p in (p1, p8):
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    outs.append(out)
  return d1, d8, outs


def losses(out):
  return [float(line.split(" loss ")[1].split()[0]) for line in out.splitlines()
          if line.startswith("step ")]


def test_eight_devices_match_one(runs):
  d1, d8, (out1, out8) = runs
  assert "SHARDING P('fsdp', None)" in out8  # the head kernel really is split over fsdp
  np.testing.assert_allclose(losses(out8), losses(out1), rtol=1e-5)
  a, b = np.load(d1 / "params.npz"), np.load(d8 / "params.npz")
  assert int(a["step"]) == int(b["step"]) == 4
  for k in a.files:
    # Adam with lr 1e-3: a different reduction order moves a parameter by << one update
    np.testing.assert_allclose(b[k], a[k], atol=1e-4, rtol=0, err_msg=k)
  summary = json.loads((d8 / "summary.json").read_text())
  assert summary["steps"] == 4 and 0 <= summary["final_top1"] <= 1
  assert os.listdir(d8 / "tensorboard")


@pytest.mark.parametrize("devices,mesh", [(1, {}), (4, {"mesh.data": 2, "mesh.fsdp": 2})])
def test_checkpoint_from_8_devices_restores_elsewhere(runs, devices, mesh):
  _, d8, _ = runs
  run_helper("restore", d8, mesh, devices)
  saved, restored = np.load(d8 / "params.npz"), np.load(d8 / f"restored_{devices}.npz")
  for k in saved.files:
    np.testing.assert_array_equal(restored[k], saved[k], err_msg=k)


def test_sigterm_saves_and_exits_zero(tmp_path):
  proc = run_helper("train", tmp_path, {"train.steps_per_epoch": 400,
                                        "train.checkpoint_every_steps": 1000}, wait=False)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
  out = "".join(lines) + proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "Preemption signal: saved step" in out
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["preempted"] and 3 <= summary["steps"] < 400
  assert str(summary["steps"]) in os.listdir(tmp_path / "checkpoints")


def test_a_first_ctrl_c_saves_like_sigterm_a_second_stops_at_once(capfd):
  """Ctrl-C on a workstation: the first sets the flag SIGTERM sets (save after this step, then
  stop; the loop's side is the SIGTERM test above), the second raises KeyboardInterrupt; after
  the loop the handlers are what they were."""
  from uniformerv2_jax.training.checkpointing import PreemptionWatcher
  inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
  try:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as watcher:
      assert not watcher.reached(1)
      os.kill(os.getpid(), signal.SIGINT)
      assert watcher.reached(2)
      assert "Interrupted (Ctrl-C): the run saves after this step" in capfd.readouterr().err
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    # A job started with Ctrl-C ignored (in the background) keeps ignoring it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with PreemptionWatcher() as watcher:
      os.kill(os.getpid(), signal.SIGINT)
      assert not watcher.reached(3)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, inherited)


def test_preemption_at_an_eval_step_saves_first_and_evaluates_on_resume(tmp_path, capsys,
                                                                         monkeypatch):
  """A grace period is short: the save comes before a (long) evaluation, which the resumed
  run makes up before training on."""
  sys.path.insert(0, os.path.dirname(HELPER))
  from train_helper import tiny_config
  from uniformerv2_jax.training.checkpointing import PreemptionWatcher
  from uniformerv2_jax.training.loop import train_and_evaluate
  config = tiny_config({"train.epochs": 2, "train.checkpoint_every_steps": 100})
  monkeypatch.setattr(PreemptionWatcher, "reached", lambda self, step: step == 4)  # an eval step
  first = train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert first["preempted"] and first["steps"] == 4 and first["history"] == [], out
  assert "Preemption signal: saving step 4 first; its evaluation runs on resume" in out
  assert "eval step" not in out and os.listdir(tmp_path / "checkpoints") == ["4"]
  monkeypatch.setattr(PreemptionWatcher, "reached", lambda self, step: False)
  second = train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  assert [h["step"] for h in second["history"]] == [4, 8], out
  assert out.index("eval step 4:") < out.index("step 5/8"), out


def test_an_evaluation_made_up_on_resume_counts_as_any_other(tmp_path, capsys, monkeypatch):
  """The made-up evaluation can make its step the best: that checkpoint is kept beside the
  latest ones (Orbax's own BestN never saw a metric for it). A run preempted at its last step
  makes it up once: a later rerun reads it back from summary.json, says the run is complete and
  keeps the training run's time and final loss there."""
  import jax
  sys.path.insert(0, os.path.dirname(HELPER))
  from train_helper import tiny_config
  from uniformerv2_jax.training import loop
  from uniformerv2_jax.training.checkpointing import PreemptionWatcher
  evaluate, evaluated = loop.evaluate, []

  def scored(p_eval, state, *args):  # step 4 scores best (a stand-in metric)
    step = int(jax.device_get(state["step"]))
    evaluated.append(step)
    ev = evaluate(p_eval, state, *args)
    return dict(ev, top1=2.0) if step == 4 else ev
  monkeypatch.setattr(loop, "evaluate", scored)
  config = tiny_config({"train.epochs": 4, "train.checkpoint_every_steps": 100,
                        "train.keep_checkpoints": 2})
  monkeypatch.setattr(PreemptionWatcher, "reached", lambda self, step: step == 4)
  loop.train_and_evaluate(config, str(tmp_path / "a"))
  monkeypatch.setattr(PreemptionWatcher, "reached", lambda self, step: False)
  summary = loop.train_and_evaluate(config, str(tmp_path / "a"))
  assert evaluated == [4, 8, 12, 16] and summary["best_step"] == 4
  assert sorted(os.listdir(tmp_path / "a" / "checkpoints"), key=int) == ["4", "12", "16"]
  capsys.readouterr()
  shorter = tiny_config({"train.epochs": 2, "train.checkpoint_every_steps": 100,
                         "train.keep_checkpoints": 2})
  loop.train_and_evaluate(shorter, str(tmp_path / "a"))
  assert "(step 16) is past this config's 8 steps: nothing to train" in capsys.readouterr().out
  assert evaluated == [4, 8, 12, 16]

  config = tiny_config({"train.epochs": 1, "train.checkpoint_every_steps": 100})
  monkeypatch.setattr(PreemptionWatcher, "reached", lambda self, step: step == 4)  # the last
  trained = loop.train_and_evaluate(config, str(tmp_path / "b"))
  monkeypatch.setattr(PreemptionWatcher, "reached", lambda self, step: False)
  evaluated.clear()
  capsys.readouterr()
  runs = [loop.train_and_evaluate(config, str(tmp_path / "b")) for _ in range(2)]
  assert evaluated == [4]  # once, not on every rerun
  assert runs[0]["history"] == runs[1]["history"] and runs[1]["final_top1"] == 2.0
  assert capsys.readouterr().out.count("is complete (step 4 of 4): nothing to train") == 2
  written = json.loads((tmp_path / "b" / "summary.json").read_text())
  assert trained["final_train_loss"] is not None
  for k in ("wall_seconds", "final_train_loss"):
    assert runs[1][k] == written[k] == trained[k], k


def test_train_step_with_on_device_randaugment(tmp_path, monkeypatch):
  """randaugment_on="crops": uint8 clips, RandAugment (the config's m and n) + normalisation in
  the step; without RandAugment the step has none."""
  sys.path.insert(0, os.path.dirname(HELPER))
  from train_helper import tiny_config
  from uniformerv2_jax.training import step
  from uniformerv2_jax.training.loop import train_and_evaluate
  calls, data_fns = [], step._data_fns

  def spying():
    normalize, randaugment = data_fns()
    def spy(key, videos, **kw):
      calls.append((videos.dtype, kw))
      return randaugment(key, videos, **kw)
    return normalize, spy

  monkeypatch.setattr(step, "_data_fns", spying)
  for on in (True, False):
    config = tiny_config({"input.randaugment": on, "input.randaugment_on": "crops",
                          "input.magnitude": 9, "input.num_layers": 2,
                          "train.steps_per_epoch": 2, "train.checkpoint_every_steps": 100})
    summary = train_and_evaluate(config, str(tmp_path / str(on)))
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
    # traced once into the jitted step, on the uint8 crops, with the config's policy
    assert calls == ([(np.dtype(np.uint8), dict(magnitude=9, num_layers=2))] if on else []), calls
    calls.clear()


def test_recipe_input_path_end_to_end(tmp_path, capsys, monkeypatch):
  """The recipes' default input: RandAugment of the whole frames on the host, through a real
  (synthetic) dataset, into the jitted step, on one CPU. Frames stored below the crop size
  (the @336 recipes on a short-side-320 build; here pretended) are noted once."""
  from configs import demo
  from uniformerv2_jax.training import data_io
  from uniformerv2_jax.training.loop import train_and_evaluate
  c = demo.get_config()
  c.dataset.update(data_dir=str(tmp_path / "data"), num_train=16, num_val=8)
  c.input.update(randaugment=True, randaugment_on="frames")
  c.train.update(global_batch_size=8, epochs=1, eval_every_epochs=1, checkpoint_every_steps=100)
  monkeypatch.setattr(data_io, "stored_short_side", lambda builder: 24)
  summary = train_and_evaluate(c, str(tmp_path / "work"))
  assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
  out = capsys.readouterr().out
  assert out.count("train: note: the frames are stored at short side 24, so the 32-pixel crops "
                   "are upscaled from them") == 1, out
  assert "data.build --short_side 32 or --keep_size" in out
  assert "earlier data.build" not in out  # train.py's own fresh build records its frames


def test_slow_input_is_reported(tmp_path, capsys, monkeypatch):
  """Each progress line says how much of the interval went to waiting for input batches, and a
  run that mostly waits says once where the bottleneck is and what to turn."""
  import time
  sys.path.insert(0, os.path.dirname(HELPER))
  from train_helper import tiny_config
  from uniformerv2_jax.training import data_io
  from uniformerv2_jax.training.loop import train_and_evaluate
  batches = data_io.train_batches

  def slow(*args, **kwargs):
    for batch in batches(*args, **kwargs):
      time.sleep(1.5)  # a tiny CPU step takes ~10 ms (~100 ms under a loaded CI)
      yield batch

  monkeypatch.setattr(data_io, "train_batches", slow)
  config = tiny_config({"train.steps_per_epoch": 4, "train.checkpoint_every_steps": 100,
                        "input.randaugment": True})  # fake data: RandAugment on the device
  train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  waits = [int(line.split(" input wait ")[1].split("%")[0]) for line in out.splitlines()
           if " input wait " in line]
  assert waits and min(waits) > 80 and max(waits) <= 100, out  # ~99% on an idle machine
  assert out.count("the host's input pipeline limits this run") == 1, out
  assert "randaugment_on=crops" not in out  # no host RandAugment to move


def test_run_reads_as_a_model(runs, tmp_path):
  """eval.py, init_from and the exporters take a run's checkpoint: its weights (saved sharded
  over 8 devices), its model config, never its optimiser state."""
  from uniformerv2_jax.checkpoint import CheckpointError, load_pretrained, load_weights_tree
  sys.path.insert(0, os.path.dirname(HELPER))
  from train_helper import flat_weights
  _, d8, _ = runs
  saved = np.load(d8 / "params.npz")

  def assert_saved(tree):
    flat = flat_weights(tree)
    assert sorted(flat) == sorted(k for k in saved.files if k != "step")
    for k, v in flat.items():
      np.testing.assert_array_equal(v, saved[k], err_msg=k)

  cfg, tree, names = load_weights_tree(d8)  # WORKDIR: its latest step, 4
  assert_saved(tree)
  assert_saved(load_weights_tree(d8 / "checkpoints")[1])
  assert (cfg.width, cfg.layers, cfg.num_classes, cfg.scan_layers) == (32, 2, 5, False)
  assert names is None  # fake data has no class names

  out = subprocess.run([sys.executable, "-m", "convert", "checkpoint", "--input",
                        str(d8 / "checkpoints" / "4"), "--output", str(tmp_path / "model")],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stderr
  from flax import nnx
  from uniformerv2_jax.checkpoint import WEIGHTS
  model = load_pretrained(tmp_path / "model", scan_layers=True)  # a model directory now
  from uniformerv2_jax.weights import unstack_layers
  assert_saved(unstack_layers(nnx.to_pure_dict(nnx.state(model, WEIGHTS))))

  empty = tmp_path / "fresh"
  (empty / "checkpoints").mkdir(parents=True)
  with pytest.raises(CheckpointError, match="without a finished checkpoint"):
    load_pretrained(empty)


def test_a_step_saved_while_reading_a_run_is_not_mixed_in(runs, tmp_path, monkeypatch):
  """A reader of a live training run (eval.py, init_from, convert) takes its latest step once:
  a step landing after the config was read must not supply the weights."""
  import shutil

  from uniformerv2_jax import checkpoint
  _, d8, _ = runs
  work = tmp_path / "run"
  shutil.copytree(d8 / "checkpoints", work / "checkpoints")
  assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"]
  read_config = checkpoint.read_config

  def read_then_save(directory):
    cfg = read_config(directory)
    if not (work / "checkpoints" / "6").exists():  # the run saves (other weights) meanwhile
      shutil.copytree(work / "checkpoints" / "2", work / "checkpoints" / "6")
    return cfg
  monkeypatch.setattr(checkpoint, "read_config", read_then_save)
  saved = np.load(d8 / "params.npz")  # step 4's
  sys.path.insert(0, os.path.dirname(HELPER))
  from train_helper import flat_weights
  flat = flat_weights(checkpoint.load_weights_tree(work)[1])
  for k, v in flat.items():
    np.testing.assert_array_equal(v, saved[k], err_msg=k)
  assert checkpoint.resolve(work).endswith(os.path.join("checkpoints", "6"))  # it did land
  step2 = flat_weights(checkpoint.load_weights_tree(work / "checkpoints" / "2")[1])
  assert any(not np.array_equal(step2[k], saved[k]) for k in flat)  # and holds other weights


def test_damaged_step_is_named_with_what_to_do(runs, tmp_path):
  import shutil

  from uniformerv2_jax.checkpoint import CheckpointError, load_weights_tree
  run = tmp_path / "run"
  shutil.copytree(runs[0], run)
  for data in (run / "checkpoints" / "4" / "state").rglob("d/*"):  # the array data files
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  with pytest.raises(CheckpointError, match=r"checkpoints/4: unreadable or incomplete weights "
                     r"\(.*\); the step is damaged: move its folder out of checkpoints/"):
    load_weights_tree(run)
  # its meta missing or cut short: read as a model or resumed, the same advice
  from train_helper import tiny_config
  from uniformerv2_jax.training.loop import train_and_evaluate
  for damage in ("remove", "truncate"):
    shutil.rmtree(run)
    shutil.copytree(runs[0], run)
    meta = run / "checkpoints" / "4" / "meta"
    shutil.rmtree(meta) if damage == "remove" else (meta / "metadata").write_bytes(b"{")
    for read in (lambda: load_weights_tree(run), lambda: train_and_evaluate(tiny_config({}), str(run))):
      with pytest.raises(CheckpointError, match=r"checkpoints/4/meta: unreadable \(.*\); the "
                         r"step is damaged: move its folder out of checkpoints/"):
        read()


def test_resume_with_another_model_is_named_as_such(runs, tmp_path):
  """Not as a damaged step: moving good checkpoints aside would not help."""
  import shutil

  from train_helper import tiny_config
  from uniformerv2_jax.training.config_check import ConfigError
  from uniformerv2_jax.training.loop import train_and_evaluate
  run = tmp_path / "run"
  shutil.copytree(runs[0], run)
  config = tiny_config({"model.num_classes": 6, "dataset.num_classes": 6})
  with pytest.raises(ConfigError, match=r"checkpoints/4 was trained with another model config "
                     r"\(num_classes: 5 -> 6\)\. Resume it with the config it was started with"):
    train_and_evaluate(config, str(run))


def test_resume_with_another_input_stream_is_refused(runs, tmp_path):
  """The data position and the schedule count in steps of the saved run's batches: resuming
  with another batch size (or seed, dataset) would replay or skip videos, so it stops."""
  import shutil

  from train_helper import tiny_config
  from uniformerv2_jax.training.config_check import ConfigError
  from uniformerv2_jax.training.loop import train_and_evaluate
  run = tmp_path / "run"
  shutil.copytree(runs[0], run)
  stream = r"another input stream \("
  counted = r"; the data position and the schedule are counted in its steps\)\. Resume it"
  for change, named in (
      ({"train.global_batch_size": 8}, stream + "global_batch_size: 16 -> 8" + counted),
      ({"train.seed": 1}, stream + "seed: 0 -> 1" + counted),
      ({"train.seed": 1, "model.num_classes": 6, "dataset.num_classes": 6},
       r"another model config \(num_classes: 5 -> 6\) and " + stream + "seed: 0 -> 1" + counted)):
    with pytest.raises(ConfigError, match=r"checkpoints/4 was trained with " + named):
      train_and_evaluate(tiny_config(change), str(run))
  # a checkpoint from before the stream was recorded: its steps_per_epoch still counts
  meta_file = run / "checkpoints" / "4" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  del meta["input_stream"]
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ConfigError, match=stream + "steps_per_epoch: 4 -> 8"):
    train_and_evaluate(tiny_config({"train.steps_per_epoch": 8}), str(run))


def test_resume_onto_other_classes_is_refused(runs, tmp_path, monkeypatch):
  """A dataset rebuilt with its classes in another order: the head's rows would change meaning
  halfway through the run (and evaluation by name would trust the new order)."""
  import shutil

  from train_helper import tiny_config
  from uniformerv2_jax.training import data_io
  from uniformerv2_jax.training.config_check import ConfigError
  from uniformerv2_jax.training.loop import train_and_evaluate
  run = tmp_path / "run"
  shutil.copytree(runs[0], run)
  meta_file = run / "checkpoints" / "4" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta_file.write_text(json.dumps(dict(meta, class_names=list("abcde"))))
  monkeypatch.setattr(data_io, "class_names", lambda builder: list("bacde"))
  with pytest.raises(ConfigError, match=r"checkpoints/4 was trained with another class list "
                     r"\(class 0 was 'a', now 'b'; 2 of 5 differ\)\. Resume it"):
    train_and_evaluate(tiny_config({}), str(run))
  monkeypatch.setattr(data_io, "class_names", lambda builder: list("abcde"))
  assert train_and_evaluate(tiny_config({}), str(run))["steps"] == 4  # the same: resumes


def test_meta_that_cannot_be_read_now_is_not_called_damaged(runs, monkeypatch):
  """No access or a network error: the step may be fine, so no advice to move it away."""
  from uniformerv2_jax.checkpoint import CheckpointError
  from uniformerv2_jax.training import checkpointing

  def unreachable(self, *args, **kwargs):
    raise ConnectionResetError("connection reset by peer")

  monkeypatch.setattr(checkpointing.ocp.Checkpointer, "restore", unreachable)
  with pytest.raises(CheckpointError, match=r"checkpoints/4/meta: could not be read "
                     r"\(ConnectionResetError: .*\); check that it can be read from here and "
                     r"retry$"):
    checkpointing.read_meta(runs[0] / "checkpoints" / "4")


def test_meta_is_read_afresh(tmp_path):
  """A step number written again (a workdir deleted and rerun) reads as what it holds now."""
  from uniformerv2_jax.training.checkpointing import Checkpointer, read_meta
  for run in ("A", "B"):
    ckpt = Checkpointer(str(tmp_path / "w"), async_save=False)
    ckpt.save(1, {"x": np.zeros(2)}, {"run": run})
    ckpt.close()
    assert read_meta(tmp_path / "w" / "checkpoints" / "1")["run"] == run
    import shutil
    shutil.rmtree(tmp_path / "w")


def _started_weights(config, cfg):
  """The unscanned weights of the train state a run of `config` starts from (new head)."""
  from uniformerv2_jax.training.loop import init_weights, make_mesh
  from uniformerv2_jax.training.optim import make_optimizer
  from uniformerv2_jax.training.state import create_train_state, model_def, unscanned_weights
  mesh = make_mesh(config)
  tx, _ = make_optimizer(config.train, 4, 4)
  state, _ = create_train_state(model_def(cfg, mesh), tx, mesh, seed=config.train.seed,
                                frozen=cfg.frozen, init_weights=init_weights(config, cfg, mesh),
                                new_head=True)
  return unscanned_weights(state)


def test_new_head_over_another_label_space(tmp_path):
  """MiT from a K400 model, every recipe from CLIP: the classifier starts from the seed (the
  upstream's loader skips the mismatched head); every other weight is init_from's."""
  import jax
  from flax import nnx

  sys.path.insert(0, os.path.dirname(HELPER))
  from train_helper import tiny_config
  from uniformerv2_jax.checkpoint import load_weights_tree, save_pretrained
  from uniformerv2_jax.model import UniFormerV2
  from uniformerv2_jax.training.config_check import ConfigError, check
  from uniformerv2_jax.training.loop import build_model_config
  from uniformerv2_jax.training.state import random_weights
  config = tiny_config({})
  cfg = build_model_config(config)
  save_pretrained(str(tmp_path / "k7"), UniFormerV2(cfg.replace(num_classes=7), rngs=nnx.Rngs(3)))
  config.init_from = str(tmp_path / "k7")
  with pytest.raises(ConfigError, match=r"head\.fc.*init_new_head=True"):
    check(config, n_devices=1)
  config.head_map, config.init_new_head = "k400", True
  with pytest.raises(ConfigError, match="set one of them"):
    check(config, n_devices=1)
  config.head_map = None
  check(config, n_devices=1)

  got = jax.tree_util.tree_flatten_with_path(_started_weights(config, cfg))[0]
  source = dict(jax.tree_util.tree_flatten_with_path(load_weights_tree(tmp_path / "k7")[1])[0])
  fresh = jax.jit(lambda: random_weights(cfg, config.train.seed)[0]["head"]["fc"])()
  for path, value in got:
    key = jax.tree_util.keystr(path)
    if key.startswith("['head']['fc']"):
      want = fresh[path[-1].key]
      assert value.shape == want.shape == ((cfg.width, 5) if path[-1].key == "kernel" else (5,))
    else:
      want = source[path]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want), err_msg=key)


def test_frozen_recipe_starts_from_an_unfrozen_conversion(tmp_path):
  """The frozen-from-CLIP recipes point at the CLIP conversion, which (like any unfrozen model)
  has `temporal.balance`; the frozen model has none and drops it. The reverse stays refused."""
  import jax
  from flax import nnx

  sys.path.insert(0, os.path.dirname(HELPER))
  from train_helper import tiny_config
  from uniformerv2_jax.checkpoint import load_weights_tree, save_pretrained
  from uniformerv2_jax.model import UniFormerV2
  from uniformerv2_jax.training.config_check import ConfigError, check
  from uniformerv2_jax.training.loop import build_model_config
  config = tiny_config({"model.frozen": True})
  cfg = build_model_config(config)
  save_pretrained(str(tmp_path / "clip"), UniFormerV2(cfg.replace(frozen=False),
                                                      rngs=nnx.Rngs(3)))
  config.init_from, config.init_new_head = str(tmp_path / "clip"), True
  check(config, n_devices=1)
  got = dict(jax.tree_util.tree_flatten_with_path(_started_weights(config, cfg))[0])
  source = dict(jax.tree_util.tree_flatten_with_path(load_weights_tree(tmp_path / "clip")[1])[0])
  assert {jax.tree_util.keystr(p) for p in set(source) - set(got)} == {"['temporal']['balance']"}
  for path, value in got.items():
    if jax.tree_util.keystr(path).startswith("['head']['fc']"):
      continue
    np.testing.assert_array_equal(np.asarray(value), np.asarray(source[path]))

  save_pretrained(str(tmp_path / "frozen"), UniFormerV2(cfg, rngs=nnx.Rngs(3)))
  unfrozen = tiny_config({})
  unfrozen.init_from, unfrozen.init_new_head = str(tmp_path / "frozen"), True
  with pytest.raises(ConfigError, match=r"temporal\.balance: checkpoint missing"):
    check(unfrozen, n_devices=1)


def test_a_dataset_folder_without_a_built_dataset_is_a_config_error(tmp_path):
  """A folder a failed build left behind: train.py's one-line config error, not a traceback."""
  from train_helper import tiny_config
  from uniformerv2_jax.training.config_check import ConfigError
  from uniformerv2_jax.training.loop import train_and_evaluate
  (tmp_path / "tfds" / "video_classification" / "halfbuilt" / "1.0.0").mkdir(parents=True)
  config = tiny_config({"dataset.name": "halfbuilt", "dataset.data_dir": str(tmp_path / "tfds")})
  with pytest.raises(ConfigError, match=r"config.dataset: .*halfbuilt: no built dataset there"):
    train_and_evaluate(config, str(tmp_path / "run"))


def test_resume_with_other_optimiser_settings_says_what_changes(runs, tmp_path, capsys,
                                                                monkeypatch):
  """The upstream takes a resumed run's new learning rate or length silently; here the run
  trains on with them and says which changed and what the rate of its next step becomes.
  (Its progress lines also check MFU = clips/s x the analytic train FLOPs per clip / (peak x
  devices): a CPU has no known peak, so one is given; on GPUs and TPUs XLA's cost analysis,
  used before, gave nothing.)"""
  import re
  import shutil

  import jax
  from train_helper import tiny_config
  from uniformerv2_jax.flops import train_flops_per_clip
  from uniformerv2_jax.training import loop
  from uniformerv2_jax.training.config_check import build_model_config
  from uniformerv2_jax.training.loop import _optimizer_note, train_and_evaluate
  from uniformerv2_jax.training.optim import lr_schedule
  peak = 1e9
  monkeypatch.setattr(loop, "device_peak_flops", lambda device: peak)
  run = tmp_path / "run"
  shutil.copytree(runs[0], run)
  config = tiny_config({"train.eps": 1e-3, "train.base_lr": 3e-4, "train.epochs": 1.5})
  old = tiny_config({})
  summary = train_and_evaluate(config, str(run))
  assert summary["steps"] == 6
  tc = config.train
  was = lr_schedule(old.train.base_lr, 4, 2, tc.warmup_start_lr, tc.min_lr)(4)
  now = lr_schedule(3e-4, 6, 2, tc.warmup_start_lr, tc.min_lr)(4)
  assert was == np.float32(tc.min_lr) and now > 10 * tc.min_lr  # the old run had ended
  out = capsys.readouterr().out
  assert (f"note: the checkpoint was trained with other config.train settings (epochs 1 -> 1.5; "
          f"base_lr {old.train.base_lr:g} -> 0.0003); the new ones apply from step 5 on (its "
          f"learning rate {float(was):.3g} -> {float(now):.3g})") in out
  assert "step 5/6 epoch 1.25 loss" in out and f" lr {float(now):.3g}" in out.split("step 5/6")[1]
  line = next(line for line in out.splitlines() if line.startswith("step 6/6"))
  clips, mfu = re.search(r"\| ([\d.]+) clips/s \d+ ms/step MFU ([\d.]+)%", line).groups()
  expected = (float(clips) * train_flops_per_clip(build_model_config(config))
              / (peak * jax.device_count()))
  assert abs(float(mfu) / 100 - expected) <= 0.0005 + 0.05 * expected / float(clips), line
  # finished: another rate changes nothing, so no note; the run says it is complete
  train_and_evaluate(tiny_config({"train.eps": 1e-3, "train.epochs": 1.5}), str(run))
  out = capsys.readouterr().out
  assert "The run in" in out and "is complete (step 6 of 6)" in out and "note:" not in out
  # a checkpoint saved before the settings were recorded: nothing to compare, no note
  assert _optimizer_note(None, tc, 4, 4) is None
  assert _optimizer_note({"base_lr": 3e-4}, tc, 4, 4) is None  # what it has agrees


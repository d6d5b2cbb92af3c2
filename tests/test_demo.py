"""The CPU demo (configs/demo.py), reduced: a tiny UniFormerV2 learns the direction of motion.

A single frame carries no class information (tests/test_data_synthetic.py), so chance (25%)
is the best any single-frame model can do; the assertion needs real temporal modelling.
"""
import json
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reduced_demo_learns_motion(tmp_path):
  from configs import demo
  from uniformerv2_jax.training.loop import train_and_evaluate

  c = demo.get_config()
  c.dataset.data_dir = str(tmp_path / "data")
  c.dataset.num_train, c.dataset.num_val = 256, 64
  # 8 steps/epoch: the full demo's 240 steps and schedule on half the videos, one evaluation.
  c.train.update(epochs=30, eval_every_epochs=30, checkpoint_every_steps=1000,
                 log_every_steps=40)
  summary = train_and_evaluate(c, str(tmp_path / "work"))
  assert summary["steps"] == 240
  assert summary["final_top1"] >= 0.6, summary["history"]
  with open(tmp_path / "work" / "summary.json") as f:
    assert json.load(f)["best_top1"] == summary["best_top1"]
  assert os.listdir(tmp_path / "work" / "tensorboard")

  # train.py rerun on the finished run trains nothing and spells eval.py's command for it:
  # the config file, the dataset overrides and the model's dtype (the rest of the model
  # comes from the checkpoint).
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/demo.py",
       f"--workdir={tmp_path / 'work'}", f"--config.dataset.data_dir={tmp_path / 'data'}",
       "--config.dataset.num_train=256", "--config.dataset.num_val=64",
       "--config.train.epochs=30", "--config.train.eval_every_epochs=30",
       "--config.model.dtype=float32"],
      cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "is complete (step 240 of 240): nothing to train" in out.stdout, out.stdout
  hint = re.search(r"Evaluate or convert the weights: (.*) \(latest step\)", out.stdout)
  command = shlex.split(hint.group(1))
  assert command[0] == "python" and os.path.samefile(tmp_path / command[1],
                                                     os.path.join(ROOT, "eval.py")), command
  assert f"--checkpoint={tmp_path / 'work'}" in command, command
  assert "--config.model.dtype=float32" in command, command  # eval.py reads the dtype
  assert not any(a.startswith("--config.train.") for a in command), command

  # eval.py, as the hint says, takes the run itself (its latest checkpoint, with the class
  # names it recorded). Its one view per video (1 clip, centre crop) is the one training
  # evaluates with: the same weights on the same frames give the same top-1.
  from uniformerv2_jax.checkpoint import read_class_names
  from uniformerv2_jax.data.synthetic import SYNTHETIC_CLASSES
  assert read_class_names(tmp_path / "work") == list(SYNTHETIC_CLASSES)
  out = subprocess.run([sys.executable, *command[1:],
                        "--config.model.width=32"],  # the checkpoint's architecture wins
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "--config.model.width ignored: evaluation reads config.dataset" in out.stderr
  summary_path = tmp_path / "eval" / "work-synthetic-validation" / "summary.json"
  result = json.loads(summary_path.read_text())
  assert result["num_videos"] == 64 and result["top1"] == summary["final_top1"]
  assert result["checkpoint"] == str(tmp_path / "work" / "checkpoints" / "240")  # the step read
  assert summary["best_step"] == 240
  assert (tmp_path / "work" / "checkpoints" / "240").is_dir()

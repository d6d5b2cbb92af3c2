"""Failures in the middle of a job keep what was done and say one thing: a dataset damaged
after it was built (a record failing its checksum), a full disk under the checkpoints, a
SIGTERM before the first step."""
import dataclasses
import glob
import os
import re
import signal

import numpy as np

import pytest

from uniformerv2_jax import data
from uniformerv2_jax.data import builder as builder_lib
from uniformerv2_jax.data import synthetic


def damage(path):
  """Overwrites bytes of the file's first data chunk (just after the file's signature; the
  files are padded to 128 KiB blocks, and their footer, read when opened, stays intact)."""
  with open(path, "r+b") as f:
    f.seek(512)
    f.write(b"\x5a" * 64)


def damaged_split(builder, split):
  """Damages the file holding the split's frames; returns its name."""
  files = (builder.info.metadata or {}).get(f"frame_files_{split}")
  if files:
    path = os.path.join(os.fspath(builder.data_dir), files[0])
  else:
    (path,) = glob.glob(os.path.join(os.fspath(builder.data_dir), f"*-{split}.array_record-*"))
  damage(path)
  return os.path.basename(path)


def message(builder, split, name):
  return (rf"{re.escape(os.fspath(builder.data_dir))}: video \d+ of the {split} split cannot be "
          rf"read: {re.escape(name)} is damaged \(.+\)\. Copy the dataset folder again if it "
          "was copied, else rebuild it")


@pytest.mark.parametrize("frame_store", [False, True])
def test_reader_and_pipeline_name_the_damaged_file(tmp_path, frame_store):
  source = tmp_path / "source"
  synthetic.write_synthetic_videos(source, 4, 4, size=32, num_frames=8)
  base = next(c for c in builder_lib.NAMED_CONFIGS if c.name == "synthetic")
  config = dataclasses.replace(base, name="damaged", flip=False, frame_store=frame_store)
  builder = builder_lib.build_dataset(tmp_path / "tfds", config, manual_dir=source,
                                      num_workers=1)
  name = damaged_split(builder, "validation")
  videos = data.StoredVideos(builder, "validation")  # opens: the footers are intact
  with pytest.raises(data.DamagedDataError, match=message(builder, "validation", name)):
    for i in range(len(videos)):
      videos.test_clips(i, 4, 1)
  ds = data.eval_dataset(builder, "validation", clip_len=4, crop_size=32, num_clips=1,
                         num_crops=1, per_host_batch=2)
  with pytest.raises(data.DamagedDataError, match=message(builder, "validation", name)):
    list(data.numpy_batches(ds))
  assert len(list(data.numpy_batches(data.eval_dataset(  # the undamaged split still reads
      builder, "train", clip_len=4, crop_size=32, num_clips=1, num_crops=1,
      per_host_batch=2)))) == 2


def test_training_saves_before_a_failing_evaluation_and_eval_py_names_the_file(tmp_path,
                                                                               capsys):
  """The evaluation at step 2 meets a damaged record: step 2 is saved first (a rerun resumes
  from it), then one ConfigError; eval.py's evaluation of that step stops the same way and
  writes nothing."""
  from configs import demo
  from uniformerv2_jax.evaluation.driver import EvalConfigError, evaluate_checkpoint
  from uniformerv2_jax.training import data_io
  from uniformerv2_jax.training.config_check import ConfigError
  from uniformerv2_jax.training.loop import train_and_evaluate
  c = demo.get_config()  # as test_train's recipe test: the same compiled step
  c.dataset.update(data_dir=str(tmp_path / "data"), num_train=16, num_val=8)
  c.train.update(global_batch_size=8, epochs=1, eval_every_epochs=1, checkpoint_every_steps=100)
  builder = data_io.source(c)
  name = damaged_split(builder, "validation")
  with pytest.raises(ConfigError, match="config.dataset: " + message(builder, "validation", name)):
    train_and_evaluate(c, str(tmp_path / "work"))
  assert "The evaluation at step 2 failed: saving step 2 first" in capsys.readouterr().out
  assert os.listdir(tmp_path / "work" / "checkpoints") == ["2"]
  with pytest.raises(EvalConfigError, match="config.dataset: " + message(builder, "validation",
                                                                        name)):
    evaluate_checkpoint(c, str(tmp_path / "work"), str(tmp_path / "eval"))
  assert not os.path.exists(tmp_path / "eval" / "summary.json")


def test_sigterm_during_startup_saves_after_the_first_step(tmp_path, monkeypatch):
  """A restore or a compilation can take minutes on a pod: a SIGTERM then is not fatal
  either (the default handler would kill the job without a word)."""
  from train_helper import tiny_config
  from uniformerv2_jax.training import loop

  def unhandled(signum, frame):
    raise RuntimeError("SIGTERM reached the handler the run started with")
  setup = loop.setup_training

  def setup_then_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return setup(*args, **kwargs)
  monkeypatch.setattr(loop, "setup_training", setup_then_sigterm)
  previous = signal.signal(signal.SIGTERM, unhandled)
  try:
    summary = loop.train_and_evaluate(tiny_config({"train.checkpoint_every_steps": 100}),
                                      str(tmp_path))
  finally:
    assert signal.signal(signal.SIGTERM, previous) is unhandled  # put back after the run
  assert summary["preempted"] and summary["steps"] == 1
  assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_a_full_disk_is_one_message_and_keeps_the_steps_before(tmp_path, monkeypatch):
  """Orbax writes in the background and re-raises there: the save that ran out of space (or
  the next call) becomes one CheckpointError; the finished step before it stays readable."""
  import errno

  from etils import epath

  from uniformerv2_jax.checkpoint import CheckpointError
  from uniformerv2_jax.training.checkpointing import Checkpointer, read_meta
  ckpt = Checkpointer(str(tmp_path / "w"))
  ckpt.save(1, {"x": np.zeros(1024, np.float32)}, {"step": 1})
  ckpt.wait()

  def full(path, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
  monkeypatch.setattr(type(epath.Path(tmp_path)), "write_text", full)
  with pytest.raises(CheckpointError, match=r"could not save a checkpoint in .*/w/checkpoints: "
                     r"no space left on the device \(a step takes about 0.0 MiB\)\. Free space "
                     r"or point --workdir at a larger disk, then rerun: the run resumes from its "
                     r"last finished step$"):
    ckpt.save(2, {"x": np.ones(1024, np.float32)}, {"step": 2})
    ckpt.close()
  monkeypatch.undo()
  assert Checkpointer(str(tmp_path / "w")).latest_step() == 1
  assert read_meta(tmp_path / "w" / "checkpoints" / "1") == {"step": 1}

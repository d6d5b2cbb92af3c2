"""A dataset damaged after it was built (a bad copy, a failing disk): a record that fails its
checksum stops the reader, the input pipelines, training and evaluation with one line naming
the file and what to do; training keeps the steps it made before."""
import dataclasses
import glob
import os

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
  return (rf"{builder.data_dir}: video \d+ of the {split} split cannot be read: {name} is "
          r"damaged \(.+\)\. Copy the dataset folder again if it was copied, else rebuild it")


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

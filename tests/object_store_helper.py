"""Subprocess entry of tests/test_object_store.py: a whole job on gs:// against an emulator.

  python tests/object_store_helper.py gs://BUCKET LOCAL_TMP

The environment points every GCS client at a local emulator (the test sets it before any of
them is imported): epath (fsspec/gcsfs) for metadata, tensorstore for Orbax's arrays, the
Cloud Storage C++ client inside ArrayRecord for the dataset's records.

The same recipe runs twice, once on local paths and once with the dataset, the workdir, the
model directory and the evaluation output in the bucket; the bucket run is preempted after
step 2 and resumed. Everything read back must equal the local run's, bit for bit.
"""

import json
import logging
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

logging.getLogger("gcsfs").setLevel(logging.ERROR)  # "no credentials" (the emulator needs none)


def upload(local: str, url: str) -> None:
  for root, _, files in os.walk(local):
    for name in files:
      target = epath.Path(url) / os.path.relpath(os.path.join(root, name), local)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(epath.Path(root, name).read_bytes())


def recipe(data_dir: str, dataset: str, tensorboard_dir: str):
  from configs.demo import get_config
  c = get_config()
  c.dataset.update(name=dataset, data_dir=data_dir)  # the built dataset, found by name
  c.train.update(global_batch_size=8, epochs=2, warmup_epochs=0.5, log_every_steps=1,
                 checkpoint_every_steps=2, keep_checkpoints=1, eval_every_epochs=1,
                 tensorboard_dir=tensorboard_dir)
  c.eval.per_device_batch = 8
  return c


def preempt_after(steps: int):
  """train_batches that sends this process SIGTERM once `steps` batches were handed out."""
  from uniformerv2_jax.training import data_io
  real = data_io.train_batches

  def batches(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == steps - 1:  # the handler runs at once: step `steps` sees the flag
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  return real, batches


def weights(directory: str) -> dict:
  from uniformerv2_jax.checkpoint import flat_weights, restore_weights
  return flat_weights(restore_weights(directory))


def assert_same(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def main():
  bucket, tmp = sys.argv[1], sys.argv[2]
  from convert import checkpoint_to_model_dir
  from uniformerv2_jax import checkpoint, storage
  from uniformerv2_jax.data.synthetic import SYNTHETIC_CLASSES, prepare_synthetic_dataset
  from uniformerv2_jax.evaluation.driver import evaluate_checkpoint
  from uniformerv2_jax.training import data_io
  from uniformerv2_jax.training.loop import train_and_evaluate

  prepared = prepare_synthetic_dataset(os.path.join(tmp, "tfds"), 16, 8, size=32, num_frames=8,
                                       radius=(0.15, 0.25), speed=(3.0, 5.0))
  dataset = os.path.basename(os.path.dirname(os.fspath(prepared.builder.data_dir)))
  upload(os.path.join(tmp, "tfds"), f"{bucket}/tfds")
  local = recipe(os.path.join(tmp, "tfds"), dataset, os.path.join(tmp, "tb_local"))
  remote = recipe(f"{bucket}/tfds", dataset, os.path.join(tmp, "tb_remote"))
  run_local, run_remote = os.path.join(tmp, "run"), f"{bucket}/runs/demo"

  # A bucket that does not exist (or cannot be written) stops the job before it compiles.
  from uniformerv2_jax.evaluation.driver import EvalConfigError
  from uniformerv2_jax.training.config_check import ConfigError
  for job, error in ((lambda: train_and_evaluate(remote, "gs://no-such-bucket/run"), ConfigError),
                     (lambda: evaluate_checkpoint(remote, run_remote, "gs://no-such-bucket/ev"),
                      EvalConfigError)):
    try:
      job()
      raise AssertionError("wrote to a bucket that does not exist")
    except error as e:
      assert "gs://no-such-bucket/" in str(e) and "cannot write there" in str(e), e

  expected = train_and_evaluate(local, run_local)
  real, preempted = preempt_after(2)
  data_io.train_batches = preempted
  first = train_and_evaluate(remote, run_remote)
  data_io.train_batches = real
  assert first["preempted"] and first["steps"] == 2, first
  resumed = train_and_evaluate(remote, run_remote)  # resumes from the bucket
  assert resumed["steps"] == expected["steps"] == 4, (resumed, expected)
  assert resumed["history"] == expected["history"]
  summary = json.loads(epath.Path(run_remote, "summary.json").read_text())
  assert summary["best_step"] == expected["best_step"]
  assert os.listdir(os.path.join(tmp, "tb_remote"))

  # Orbax's retention works in the bucket too (keep 1, which keeps 2, plus the best): as on
  # local disk.
  kept = storage.listdir(f"{run_remote}/checkpoints")
  assert kept == sorted({"2", "4", str(expected["best_step"])})
  assert kept == sorted(os.listdir(os.path.join(run_local, "checkpoints")))

  # The run read as a model (eval.py, init_from, convert): its latest finished step. A step
  # the bucket holds without Orbax's commit marker (a writer that died) is not one.
  junk = epath.Path(run_remote, "checkpoints", "9", "state")
  junk.mkdir(parents=True)
  (junk / "_METADATA").write_text("{}")
  (junk.parent / "meta").mkdir()
  (junk.parent / "meta" / "metadata").write_text("{}")
  assert checkpoint.resolve(run_remote) == f"{run_remote}/checkpoints/4"
  try:  # nor when named
    checkpoint.resolve(str(junk.parent))
    raise AssertionError("took a step without its commit marker")
  except checkpoint.CheckpointError as e:
    assert "checkpoints/9 is an unfinished checkpoint" in str(e), e
  local_weights = weights(run_local)
  assert_same(weights(run_remote), local_weights)
  assert checkpoint.read_class_names(run_remote) == list(SYNTHETIC_CLASSES)

  # Model directories in the bucket: written with config.json last, never replaced in place.
  model_dir = f"{bucket}/models/demo"
  checkpoint_to_model_dir(run_remote, model_dir, log=lambda m: None)
  assert_same(weights(model_dir), local_weights)
  assert checkpoint.read_class_names(model_dir) == list(SYNTHETIC_CLASSES)
  loaded = checkpoint.load_pretrained(model_dir)
  assert loaded.config == checkpoint.read_config(run_local)
  try:
    checkpoint.save_pretrained(model_dir, loaded, overwrite=True)
    raise AssertionError("replaced a model directory in a bucket")
  except checkpoint.CheckpointError as e:
    assert "cannot replace it atomically: delete it first" in str(e), e
  half = f"{bucket}/models/half"
  checkpoint._write_weights(f"{half}/weights", checkpoint.flat_weights(
      checkpoint.restore_weights(model_dir)))  # a save cut short before config.json
  try:
    checkpoint.load_pretrained(half)
    raise AssertionError("read a model directory without config.json")
  except checkpoint.CheckpointError as e:
    assert "is not a UniFormerV2 model directory (missing config.json)" in str(e), e

  # Evaluation: the bucket's model directory, dataset and output folder give the local run's
  # evaluation files.
  out_local, out_remote = os.path.join(tmp, "eval"), f"{bucket}/eval/demo"
  a = evaluate_checkpoint(local, run_local, out_local, log=lambda m: None)
  b = evaluate_checkpoint(remote, model_dir, out_remote, log=lambda m: None)
  assert (a["top1"], a["top5"], a["num_videos"]) == (b["top1"], b["top5"], b["num_videos"]) \
      and b["num_videos"] == 8
  assert epath.Path(out_remote, "results.jsonl").read_text() == \
      epath.Path(out_local, "results.jsonl").read_text()
  assert json.loads(epath.Path(out_remote, "summary.json").read_text())["top1"] == a["top1"]
  print("object store run: OK", json.dumps({"steps": resumed["steps"], "top1": b["top1"]}))


if __name__ == "__main__":
  main()

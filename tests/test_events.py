"""TensorBoard event files written without TensorFlow, read back by TensorFlow against the
events tf.summary writes for the same scalars."""

import glob
import os

import google_crc32c
import numpy as np
import pytest

from uniformerv2_jax.training import events
from uniformerv2_jax.training.loop import Writer

SCALARS = [(1, {"train/loss": 6.25, "train/top1": 0.0, "perf/mfu": 0.4321}),
           (50, {"train/loss": 1.0e-3, "perf/clips_per_s": 1234.5}),
           (2**33 + 7, {"eval/top1": float("nan"), "train/lr": 3e-38})]


def _records(path):
  import tensorflow as tf
  return [r.numpy() for r in tf.data.TFRecordDataset(path)]  # checks every record's CRCs


def _events(path):
  from tensorflow.core.util import event_pb2
  out = []
  for record in _records(path):
    e = event_pb2.Event.FromString(record)
    assert e.wall_time > 1.7e9
    e.wall_time = 0
    out.append(e)
  return out


@pytest.fixture(scope="module")
def tensorflow_events(tmp_path_factory):
  """The events of tf.summary.write for SCALARS, as the loop wrote them with TensorFlow."""
  import tensorflow as tf
  from tensorflow.core.framework import summary_pb2
  logdir = str(tmp_path_factory.mktemp("tf"))
  metadata = summary_pb2.SummaryMetadata(data_class=summary_pb2.DATA_CLASS_SCALAR)
  metadata.plugin_data.plugin_name = "scalars"
  writer = tf.summary.create_file_writer(logdir)
  with writer.as_default():
    for step, values in SCALARS:
      for k, v in values.items():
        tf.summary.write(k, tf.constant(v, tf.float32), step=step, metadata=metadata)
  writer.close()
  (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  return _events(path)


def test_crc32c_is_castagnoli():
  rng = np.random.default_rng(0)
  assert events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  for n in (0, 1, 7, 100, 4096):
    data = rng.bytes(n)
    assert events.crc32c(data) == google_crc32c.value(data)


def test_local_events_are_tensorflows_without_tensorflow(tmp_path, tensorflow_events):
  writer = Writer(str(tmp_path / "tb"))
  assert writer.tb is None  # a local folder: no TensorFlow writer
  for step, values in SCALARS:
    writer.scalars(step, values)
  writer.close()
  (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*.v2"))
  ours = _events(path)
  assert ours[0].file_version == tensorflow_events[0].file_version == "brain.Event:2"
  assert ours[0].source_metadata.writer == "uniformerv2_jax"
  assert len(ours) == len(tensorflow_events) == 1 + sum(len(v) for _, v in SCALARS)
  for a, b in zip(ours[1:], tensorflow_events[1:]):
    assert a.SerializeToString() == b.SerializeToString(), (a, b)


def test_a_damaged_event_file_is_refused_by_its_reader(tmp_path):
  """The reader does check the CRCs the writer computes (so the test above tests them)."""
  import tensorflow as tf
  f = events.EventFile(str(tmp_path))
  f.scalars(3, {"train/loss": 1.5})
  f.close()
  data = bytearray(open(f.path, "rb").read())
  assert len(_records(f.path)) == 2
  data[-1] ^= 1
  open(f.path, "wb").write(bytes(data))
  with pytest.raises(tf.errors.DataLossError):
    _records(f.path)

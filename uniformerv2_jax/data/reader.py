"""Random access to the stored videos of one split: the JPEG frames a clip needs, nothing more.

Works on both layouts of ``builder.py``: frames inside each example (``video``) or in the sidecar
frame store (``first_frame`` + ``frame_files_<split>`` in the dataset metadata), where only the
sampled frames are read. Frame indices come from :func:`uniformerv2_jax.data.uniform_sample`
itself, so tf.data sampling is the numpy reference by construction.
"""
from __future__ import annotations

import os

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from tensorflow.core.example import example_pb2

from .sampling import uniform_sample

__all__ = ["StoredVideos", "DamagedDataError"]

_REPAIR = ("Copy the dataset folder again if it was copied, else rebuild it: "
           "python -m uniformerv2_jax.data.build ... --overwrite")


class DamagedDataError(ValueError):
  """A stored record failed its checksum (one line: the dataset, the file, what to do)."""


def _detail(e: Exception, default: str) -> str:
  return (str(e).strip() or default).splitlines()[0][:200]


def _open(builder, split: str, paths: list[str]) -> ArrayRecordDataSource:
  try:
    return ArrayRecordDataSource(paths)
  except RuntimeError as e:
    bad = next((p for p in paths if not _succeeds(lambda: ArrayRecordDataSource([p]))), None)
    raise ValueError(
        f"{builder.data_dir}: the {split} split cannot be read: "
        f"{os.path.basename(bad) if bad else 'one of its files'} is missing or damaged "
        f"({_detail(e, 'unreadable')}). {_REPAIR}") from None


def _succeeds(read) -> bool:
  """False if `read()` raises ArrayRecord's RuntimeError (a missing, cut or damaged file)."""
  try:
    read()
    return True
  except RuntimeError:
    return False


def _file_holding(paths: list[str], key: int) -> str | None:
  """The file of `paths` (read in this order) that holds record `key`, by their footers."""
  for path in paths:
    n = len(ArrayRecordDataSource([path]))
    if key < n:
      return path
    key -= n
  return None


class StoredVideos:
  """``len()`` videos of ``split``; ``frames(index, positions)`` -> JPEG bytes."""

  def __init__(self, builder, split: str):
    fmt = builder.info.file_format
    if fmt is None or fmt.value != "array_record":
      raise ValueError(f"{builder.data_dir}: stored as {fmt}; the pipeline needs random "
                       "access, rebuild with file_format='array_record' (the default)")
    if split not in builder.info.splits:
      raise ValueError(f"{builder.data_dir}: no split {split!r}; have "
                       f"{list(builder.info.splits)}")
    # The split's shards in order, as tfds' data source reads them (raw bytes); opened now
    # (each file's footer), so a missing or cut-short file is named before any batch.
    self.data_dir, self.split = os.fspath(builder.data_dir), split
    self.record_files = [os.fspath(p) for p in builder.info.splits[split].filepaths]
    self.records = _open(builder, split, self.record_files)
    files = (builder.info.metadata or {}).get(f"frame_files_{split}")
    self.frame_files = [os.path.join(self.data_dir, f) for f in files or ()]
    self.store = _open(builder, split, self.frame_files) if files else None

  def __len__(self) -> int:
    return len(self.records)

  def example(self, index: int):
    """The video's features (``name``, ``label``, ``num_frames``, ...) as a protobuf map."""
    try:
      record = self.records[int(index)]
    except RuntimeError as e:  # a chunk failed its checksum
      raise self._damaged(e, index, self.record_files, int(index)) from None
    return example_pb2.Example.FromString(record).features.feature

  def _damaged(self, e: Exception, index: int, paths: list[str], key: int) -> DamagedDataError:
    path = _file_holding(paths, key)
    return DamagedDataError(
        f"{self.data_dir}: video {index} of the {self.split} split cannot be read: "
        f"{os.path.basename(path) if path else 'one of its files'} is damaged "
        f"({_detail(e, 'checksum mismatch')}). {_REPAIR}")

  def num_frames(self, index: int) -> int:
    return int(self.example(index)["num_frames"].int64_list.value[0])

  def frames(self, index: int, positions=None) -> tuple[list[bytes], int]:
    """(JPEG bytes at ``positions`` (all frames if None), label) of video ``index``."""
    return self.choose(index, lambda n: range(n) if positions is None else positions)

  def choose(self, index: int, choose) -> tuple[list[bytes], int]:
    """(JPEGs at ``choose(num_frames)``, label), reading the video's example once."""
    f = self.example(index)
    label = int(f["label"].int64_list.value[0])
    n = int(f["num_frames"].int64_list.value[0])
    positions = [int(p) for p in choose(n)]
    if positions and not 0 <= min(positions) <= max(positions) < n:
      raise IndexError(f"video {index} has {n} frames; asked for frames {positions}")
    if self.store is None:
      video = f["video"].bytes_list.value
      return [video[p] for p in positions], label
    keys = [int(f["first_frame"].int64_list.value[0]) + p for p in positions]
    try:
      return list(self.store.__getitems__(keys)), label
    except RuntimeError as e:
      bad = next((k for k in keys if not _succeeds(lambda: self.store[k])), keys[0])
      raise self._damaged(e, index, self.frame_files, bad) from None

  def train_clip(self, index, seed_key, clip_len: int):
    """JPEGs of one train-mode clip (clip_len,) and the label.

    The indices use ``np.random.default_rng([*seed_key, 0])``. Repeated augmentation
    crops these same frames again: the upstream decodes a clip's frames once and augments
    them ``AUG.NUM_SAMPLE`` times.
    """
    keys = [int(k) for k in np.asarray(seed_key).reshape(-1)]
    jpegs, label = self.choose(
        index, lambda n: uniform_sample(n, clip_len, rng=np.random.default_rng([*keys, 0])))
    return np.array(jpegs, dtype=object), np.int32(label)

  def test_clips(self, index, clip_len: int, num_clips: int):
    """JPEGs of the ``num_clips`` test-mode clips (num_clips * clip_len,) and the label."""
    jpegs, label = self.choose(
        index, lambda n: uniform_sample(n, clip_len, num_clips, test_mode=True))
    return np.array(jpegs, dtype=object), np.int32(label)

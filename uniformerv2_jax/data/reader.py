"""Random access to the stored videos of one split: the JPEG frames a clip needs, nothing more.

Works on both layouts of ``builder.py``: frames inside each example (``video``) or in the sidecar
frame store (``first_frame`` + ``frame_files_<split>`` in the dataset metadata), where only the
sampled frames are read. Frame indices come from :func:`uniformerv2_jax.data.uniform_sample`
itself, so tf.data sampling is the numpy reference by construction.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_data_source import ArrayRecordDataSource
from tensorflow.core.example import example_pb2

from .sampling import uniform_sample

__all__ = ["StoredVideos"]


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
        self.records = builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        files = (builder.info.metadata or {}).get(f"frame_files_{split}")
        self.store = ArrayRecordDataSource(
            [os.path.join(os.fspath(builder.data_dir), f) for f in files]) if files else None

    def __len__(self) -> int:
        return len(self.records)

    def example(self, index: int):
        """The video's features (``name``, ``label``, ``num_frames``, ...) as a protobuf map."""
        return example_pb2.Example.FromString(self.records[int(index)]).features.feature

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
        first = int(f["first_frame"].int64_list.value[0])
        return list(self.store.__getitems__([first + p for p in positions])), label

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

"""tf.data input pipelines, one per host, over the ArrayRecord datasets of ``builder.py``.

Train: an infinite stream of epochs. Epoch ``e`` is a permutation of the whole split drawn from
``(seed, e)``; host ``p`` of ``P`` reads positions ``p, p+P, ...`` of it (``n // P`` videos, so
every host has the same epoch length). Each video's randomness (frames, crop, flip) comes from
``(seed, its position in the host's stream)``, so ``start_step`` reproduces exactly the batches
an uninterrupted run would produce next, skipping only indices (nothing is read or decoded).
The iterator state to save is just the number of batches consumed.

Per video, a Python step (``reader.py``) draws the frame indices with ``uniform_sample`` and reads
only those JPEGs from the frame store (or picks them out of the video's record when frames are
stored inline); TensorFlow then decodes just the crop window of each and resizes.

Eval: the split is cut into ``P`` contiguous parts; each video gives ``num_clips * num_crops``
views; every host is padded (``mask`` 0) to the same number of batches.
"""
from __future__ import annotations

import math
import os
import re
import warnings

import tensorflow as tf
import tensorflow_datasets as tfds

from .. import storage
from . import tf_augment, tf_ops
from .reader import DamagedDataError, StoredVideos
from .spatial import AREA_RANGE, RATIO_RANGE, check_protocol

__all__ = ["load_builder", "train_dataset", "eval_dataset", "steps_per_epoch", "eval_batches",
           "numpy_batches"]

_SEED_SALT = 0x5EED


def load_builder(data_dir_or_builder):
  """A TFDS builder from a builder, or a folder holding one built dataset (any depth)."""
  if isinstance(data_dir_or_builder, tfds.core.DatasetBuilder):
    return data_dir_or_builder
  if hasattr(data_dir_or_builder, "builder"):  # synthetic.PreparedDataset
    return data_dir_or_builder.builder
  root = os.fspath(data_dir_or_builder)
  found = storage.find_dirs_containing(root, "dataset_info.json")  # local, gs://, s3://
  if not found:
    raise ValueError(f"{root}: no built dataset there (no dataset_info.json below it); "
                     "build it first: python -m uniformerv2_jax.data.build --config NAME "
                     "--data_dir TFDS_ROOT ... (README, Data)")
  if len(found) != 1:
    raise ValueError(f"{root}: expected exactly one built dataset (a folder with "
                     f"dataset_info.json) below it, found {len(found)}: {found[:5]}; pass "
                     "the versioned dataset folder or the builder itself")
  try:
    return tfds.builder_from_directory(found[0])
  except Exception as e:  # noqa: BLE001  (protobuf's ParseError, json's, a missing file)
    raise ValueError(
        f"{found[0]}: the dataset's description files (dataset_info.json, features.json) "
        f"cannot be read ({type(e).__name__}: {str(e)[:200]}). Copy the dataset folder "
        "again if it was copied, else rebuild it: python -m uniformerv2_jax.data.build ... "
        "--overwrite") from None


def steps_per_epoch(num_videos: int, per_host_batch: int, num_samples: int = 1,
                    process_count: int = 1) -> int:
  """Train batches per epoch per host (epochs do not align with batches; this is n/P/B)."""
  return (num_videos // process_count) * num_samples // per_host_batch


def _train_indices(size, seed, process_index, process_count, start_video):
  """(stream position, split index) from ``start_video`` on; infinite. The position, which
  seeds every random draw of that clip, counts over all hosts: no two hosts share one."""
  per_epoch = size // process_count
  if per_epoch == 0:
    raise ValueError(f"the split has {size} videos, fewer than the {process_count} hosts")
  first_epoch, offset = divmod(start_video, per_epoch)

  def epoch(e):
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(size, dtype=tf.int64), tf.stack([tf.cast(seed, tf.int64), e]))
    mine = perm[process_index::process_count][:per_epoch]
    pos = (e * per_epoch + tf.range(per_epoch, dtype=tf.int64)) * process_count + process_index
    return tf.data.Dataset.from_tensor_slices((pos, mine))

  return tf.data.Dataset.range(first_epoch, 2 ** 62).flat_map(epoch).skip(offset)


def _train_sample(jpegs, seed, clip_len, crop_size, flip, area_range, ratio_range,
                  randaugment=None, decoded=None):
  """One clip from its sampled JPEGs: [RandAugment of the whole frames,] RandomResizedCrop
  (shared by the frames), resize, flip. ``randaugment``: (magnitude, num_layers, compiled)
  or None; with it, ``decoded``: the whole frames (decoded once for all samples of a video)."""
  s_crop, s_flip, s_aug = (tf.random.experimental.stateless_fold_in(seed, k) for k in range(3))
  shape = tf.io.extract_jpeg_shape(jpegs[0])
  box = tf_ops.random_resized_crop_box(s_crop, shape[0], shape[1], area_range, ratio_range)
  if randaugment is None:
    frames = tf_ops.decode_frames(jpegs, clip_len, box)  # only the crop window
  else:  # the upstream's order: the ops see the whole frame, then the crop is taken
    magnitude, layers, compiled = randaugment
    frames = tf_augment.randaugment(s_aug, decoded, magnitude, layers, compiled=compiled)
    frames = frames[:, box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
  frames = tf_ops.resize_uint8(frames, crop_size, crop_size)
  if flip:
    coin = tf.random.stateless_uniform([], s_flip) < 0.5
    frames = tf.cond(coin, lambda: tf.reverse(frames, axis=[2]), lambda: frames)
  return tf.ensure_shape(frames, [clip_len, crop_size, crop_size, 3])


def _options(deterministic: bool = True) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = deterministic
  opts.autotune.enabled = True
  return opts


def train_dataset(data_dir_or_builder, split: str = "train", *, clip_len: int, crop_size: int,
                  per_host_batch: int, seed: int = 0, flip: bool | None = None,
                  num_samples: int = 1, randaugment: bool = False, process_index: int = 0,
                  process_count: int = 1, start_step: int = 0, randaugment_magnitude: float = 7,
                  randaugment_layers: int = 4, randaugment_compiled: bool = True,
                  area_range=AREA_RANGE, ratio_range=RATIO_RANGE) -> tf.data.Dataset:
  """Infinite train batches ``{"video": uint8 (B, T, S, S, 3), "label": int32 (B,)}``.

  ``num_samples`` > 1: repeated augmentation, ``B // num_samples`` videos per batch, each
  ``num_samples`` times (consecutive): the same sampled frames with independent crops, flips
  and RandAugment draws, as the upstream's ``AUG.NUM_SAMPLE``. ``flip=None`` uses the
  dataset's setting (off for SSv2 and the synthetic set). ``randaugment``: RandAugment
  (``randaugment_magnitude``, ``randaugment_layers``; ``tf_augment.py``) of the whole decoded
  frames before the crop, on the host CPU, as the upstream orders it (the alternative,
  ``data.randaugment`` after the crop on the accelerator, belongs in the train step);
  ``randaugment_compiled``: its pixel arithmetic through XLA (the same result, faster; compiled
  once per frame size).
  ``start_step`` = batches this host already consumed.
  ``area_range`` / ``ratio_range``: the RandomResizedCrop's crop area (fraction of the frame)
  and aspect ratio (w/h) ranges; the defaults are mmaction2's (0.08, 1) and (3/4, 4/3).
  """
  builder = load_builder(data_dir_or_builder)
  if per_host_batch % num_samples:
    raise ValueError(f"per_host_batch={per_host_batch} must be a multiple of "
                     f"num_samples={num_samples}")
  flip = _flip_setting(builder, flip)
  videos = StoredVideos(builder, split)
  videos_per_batch = per_host_batch // num_samples
  ds = _train_indices(len(videos), seed, process_index, process_count,
                      start_step * videos_per_batch)
  salt = seed ^ _SEED_SALT
  ra = ((float(randaugment_magnitude), int(randaugment_layers), bool(randaugment_compiled))
        if randaugment else None)

  def one_video(pos, index):
    # frame indices: numpy UniformSample seeded by (seed, stream position)
    jpegs, label = tf.numpy_function(
        lambda i, p: videos.train_clip(i, (salt, p), clip_len),
        [index, pos], [tf.string, tf.int32], stateful=False)
    jpegs = tf.ensure_shape(jpegs, [clip_len])
    video_seed = tf.stack([tf.constant(salt, tf.int64), pos])
    decoded = tf_ops.decode_frames(jpegs, clip_len) if ra else None
    clips = [_train_sample(jpegs, tf.random.experimental.stateless_fold_in(video_seed, k),
                           clip_len, crop_size, flip, tuple(area_range), tuple(ratio_range),
                           ra, decoded)
             for k in range(num_samples)]
    return {"video": tf.stack(clips),
            "label": tf.fill([num_samples], tf.ensure_shape(label, []))}

  ds = ds.map(one_video, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
  ds = ds.batch(per_host_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def _flip_setting(builder, flip):
  recommended = bool(builder.info.metadata.get("flip", True)) if builder.info.metadata else True
  if flip is None:
    return recommended
  if flip and not recommended:
    warnings.warn(f"{builder.info.full_name}: horizontal flip requested, but the dataset's "
                  "labels depend on direction (its metadata says flip=False)")
  return bool(flip)


def numpy_batches(ds: tf.data.Dataset):
  """``ds.as_numpy_iterator()``, where a damaged stored record raises its DamagedDataError (one
  line naming the file) instead of TensorFlow's error around it."""
  try:
    yield from ds.as_numpy_iterator()
  except tf.errors.OpError as e:
    found = re.search(rf"{DamagedDataError.__name__}: ([^\n]+)", e.message)
    if found is None:
      raise
    raise DamagedDataError(found.group(1)) from None


def eval_batches(num_videos: int, num_views: int, per_host_batch: int, process_count: int = 1):
  """Number of eval batches every host yields."""
  return math.ceil(math.ceil(num_videos / process_count) * num_views / per_host_batch)


def eval_dataset(data_dir_or_builder, split: str = "validation", *, clip_len: int, crop_size: int,
                 num_clips: int = 1, num_crops: int = 3, per_host_batch: int,
                 process_index: int = 0, process_count: int = 1,
                 spatial: str = "mmaction2") -> tf.data.Dataset:
  """Finite eval batches: ``video`` uint8 (B, T, S, S, 3), ``label``, ``video_id`` (index in the
  split), ``view`` (clip_index * num_crops + crop_index), ``mask`` (1 real, 0 padding); int32."""
  check_protocol(spatial, num_crops)
  builder = load_builder(data_dir_or_builder)
  videos = StoredVideos(builder, split)
  views, size = num_clips * num_crops, len(videos)
  lo, hi = process_index * size // process_count, (process_index + 1) * size // process_count
  total = eval_batches(size, views, per_host_batch, process_count) * per_host_batch

  def one_video(index):
    jpegs, label = tf.numpy_function(lambda i: videos.test_clips(i, clip_len, num_clips),
                                     [index], [tf.string, tf.int32], stateful=False)
    jpegs, label = tf.ensure_shape(jpegs, [num_clips * clip_len]), tf.ensure_shape(label, [])
    frames = tf_ops.decode_frames(jpegs, num_clips * clip_len)
    out = tf_ops.eval_views(frames, crop_size, num_crops, spatial)  # (C, K*T, S, S, 3)
    out = tf.reshape(out, [num_crops, num_clips, clip_len, crop_size, crop_size, 3])
    out = tf.reshape(tf.transpose(out, [1, 0, 2, 3, 4, 5]),
                     [views, clip_len, crop_size, crop_size, 3])
    ones = tf.ones([views], tf.int32)
    return {"video": out, "label": label * ones, "video_id": tf.cast(index, tf.int32) * ones,
            "view": tf.range(views, dtype=tf.int32), "mask": ones}

  real = tf.data.Dataset.range(lo, hi).map(one_video, num_parallel_calls=tf.data.AUTOTUNE,
                                           deterministic=True).unbatch()
  pad = tf.data.Dataset.from_tensors({
      "video": tf.zeros([clip_len, crop_size, crop_size, 3], tf.uint8),
      "label": tf.constant(0, tf.int32), "video_id": tf.constant(-1, tf.int32),
      "view": tf.constant(-1, tf.int32), "mask": tf.constant(0, tf.int32)}).repeat(
      total - (hi - lo) * views)
  ds = real.concatenate(pad).batch(per_host_batch, drop_remainder=True)
  ds = ds.apply(tf.data.experimental.assert_cardinality(total // per_host_batch))
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

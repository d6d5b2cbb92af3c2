"""TensorFlow graph twins of ``spatial.py`` for tf.data, plus JPEG decoding.

Every random draw is stateless (``seed``: int64 tensor of shape [2]), so results depend only on
the seed, never on parallelism or on where a run resumed. Arithmetic follows the numpy
references in float64 with the same half-to-even rounding; tests check they agree.
"""
from __future__ import annotations

import math

import tensorflow as tf

from .spatial import AREA_RANGE, MAX_TRIES, RATIO_RANGE


def keep_tensorflow_off_gpus() -> None:
  """tf.data runs on the host: a TensorFlow built with CUDA (`tensorflow`, not the
  `tensorflow-cpu` of requirements.txt) would otherwise claim most of every GPU's memory
  when its first op runs. Too late once an op ran with a GPU visible; then nothing changes."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass


keep_tensorflow_off_gpus()  # on import: the input pipeline and the TensorBoard writer load this

__all__ = ["rrc_box_from_draws", "random_resized_crop_box", "decode_frames",
           "resize_uint8", "eval_views"]


def rrc_box_from_draws(height, width, u_area, u_ratio, u_x, u_y, area_range=AREA_RANGE,
                       ratio_range=RATIO_RANGE):
  """RandomResizedCrop box ``(y, x, h, w)`` int32 from uniform draws (mmaction2's rule)."""
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  area = (area_range[0] + (area_range[1] - area_range[0]) * u_area) * h * w
  log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
  ratio = tf.exp(log_lo + (log_hi - log_lo) * u_ratio)
  cw, ch = tf.round(tf.sqrt(area * ratio)), tf.round(tf.sqrt(area / ratio))
  ok = (cw >= 1) & (ch >= 1) & (cw <= w) & (ch <= h)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  cw, ch = cw[first], ch[first]
  x, y = tf.floor(u_x * (w - cw + 1)), tf.floor(u_y * (h - ch + 1))
  side = tf.minimum(h, w)
  fallback = tf.stack([tf.floor((h - side) / 2), tf.floor((w - side) / 2), side, side])
  box = tf.where(tf.reduce_any(ok), tf.stack([y, x, ch, cw]), fallback)
  return tf.cast(box, tf.int32)


def random_resized_crop_box(seed, height, width, area_range=AREA_RANGE,
                            ratio_range=RATIO_RANGE):
  """Stateless RandomResizedCrop box ``(y, x, h, w)``: 10 tries, then a centred square.

  ``area_range`` (fraction of the frame) and ``ratio_range`` (w/h) default to mmaction2's.
  """
  u = tf.random.stateless_uniform([2 * MAX_TRIES + 2], seed, dtype=tf.float64)
  return rrc_box_from_draws(height, width, u[:MAX_TRIES], u[MAX_TRIES:2 * MAX_TRIES],
                            u[-2], u[-1], area_range, ratio_range)


def decode_frames(jpegs, count: int, box=None) -> tf.Tensor:
  """Decode ``count`` (static) JPEGs -> (count, h, w, 3) uint8.

  With ``box`` (y, x, h, w) only that window is decoded (``decode_and_crop_jpeg``).
  The accurate integer IDCT (libjpeg's default, as PIL and OpenCV decode): TF's default
  fast one is off by up to ~6 grey levels, and no faster here.
  """
  dct = "INTEGER_ACCURATE"
  if box is None:
    frames = [tf.io.decode_jpeg(jpegs[t], channels=3, dct_method=dct) for t in range(count)]
  else:
    frames = [tf.io.decode_and_crop_jpeg(jpegs[t], box, channels=3, dct_method=dct)
              for t in range(count)]
  return tf.stack(frames)


def resize_uint8(frames, height, width) -> tf.Tensor:
  """Bilinear resize (half-pixel centres, no antialiasing) of uint8 frames, rounded to uint8."""
  out = tf.image.resize(frames, tf.stack([height, width]), method="bilinear", antialias=False)
  return tf.cast(tf.round(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def _resized_shape(height, width, size: int, spatial: str):
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  short, long_ = tf.minimum(h, w), tf.maximum(h, w)
  if spatial == "mmaction2":  # the order of operations of spatial.resized_shape
    new_long = tf.floor(long_ * (size / short) + 0.5)
  else:  # unchanged when the short side is already `size`, as SlowFast's short_side_scale
    new_long = tf.where(short == size, long_, tf.floor(long_ / short * size))
  new_long = tf.cast(tf.maximum(new_long, size), tf.int32)
  landscape = height <= width
  return tf.where(landscape, size, new_long), tf.where(landscape, new_long, size)


def _offsets(free, num_crops: int, spatial: str):
  if spatial == "mmaction2":
    centre = free // 2
    return [centre] if num_crops == 1 else [0 * free, 2 * centre, centre]
  centre = (free + 1) // 2
  return [centre] if num_crops == 1 else [0 * free, centre, free]


def eval_views(frames, crop_size: int, num_crops: int, spatial: str = "mmaction2") -> tf.Tensor:
  """Test-time views of (N, H, W, 3) frames -> (num_crops, N, S, S, 3); see spatial.py."""
  shape = tf.shape(frames)
  new_h, new_w = _resized_shape(shape[1], shape[2], crop_size, spatial)
  frames = resize_uint8(frames, new_h, new_w)
  landscape = new_h <= new_w
  free = tf.maximum(new_h, new_w) - crop_size
  views = []
  for off in _offsets(free, num_crops, spatial):
    y, x = tf.where(landscape, 0, off), tf.where(landscape, off, 0)
    views.append(tf.image.crop_to_bounding_box(frames, y, x, crop_size, crop_size))
  return tf.stack(views)

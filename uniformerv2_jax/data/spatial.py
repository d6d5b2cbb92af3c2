"""Spatial protocols in plain numpy: test-time views and RandomResizedCrop boxes.

Test-time views (recipes.md, "Test-time spatial views"):

* ``spatial="mmaction2"`` (the numbers in the seed tables): short side -> S, long side
  ``int(L * S / short + 0.5)``; ThreeCrop offsets along the long side in the order
  ``(0, 2*((L'-S)//2), (L'-S)//2)`` = left, right, centre (top, bottom, centre for portrait);
  one crop = centre at ``(L'-S)//2``.
* ``spatial="original"`` (OpenGVLab/UniFormerV2): long side ``floor(L * S / short)``; crops in the
  order left, centre, right at ``0, ceil((L'-S)/2), L'-S``; one crop = centre at ``ceil((L'-S)/2)``.

Resizing is bilinear with half-pixel centres and no antialiasing (cv2 ``INTER_LINEAR`` and
``tf.image.resize`` geometry) computed in float32 and rounded to uint8, so the tf.data pipeline
(``tf_ops.py``) and :func:`eval_views` agree to within one grey level.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["SPATIAL_PROTOCOLS", "check_protocol", "resized_shape", "crop_offsets",
           "resize_bilinear", "eval_views", "rrc_box_from_draws", "random_resized_crop_box"]

SPATIAL_PROTOCOLS = ("mmaction2", "original")
AREA_RANGE = (0.08, 1.0)
RATIO_RANGE = (3 / 4, 4 / 3)
MAX_TRIES = 10


def check_protocol(spatial: str, num_crops: int) -> None:
  """The test views a protocol can give (ValueError otherwise)."""
  if spatial not in SPATIAL_PROTOCOLS:
    raise ValueError(f"spatial={spatial!r}: use one of {SPATIAL_PROTOCOLS}")
  if num_crops not in (1, 3):
    raise ValueError(f"num_crops={num_crops}: use 1 (centre crop) or 3 (ThreeCrop)")


def resized_shape(height: int, width: int, size: int,
                  spatial: str = "mmaction2") -> tuple[int, int]:
  """(h, w) after resizing the short side to ``size`` under the given protocol."""
  check_protocol(spatial, 1)
  short, long_ = min(height, width), max(height, width)
  # The upstreams' float expressions, in their order of operations (they round differently
  # from long * size / short for some sizes, e.g. 320x325 at 224).
  if spatial == "mmaction2":  # mmcv.rescale_size: scale = size / short; int(long * scale + .5)
    new_long = int(long_ * (size / short) + 0.5)
  elif short == size:  # SlowFast's short_side_scale returns such frames as they are
    new_long = long_
  else:  # SlowFast's short_side_scale: floor(long / short * size)
    new_long = int(math.floor(long_ / short * size))
  new_long = max(new_long, size)
  return (size, new_long) if height <= width else (new_long, size)


def crop_offsets(length: int, size: int, num_crops: int, spatial: str = "mmaction2") -> list[int]:
  """Crop offsets along an axis of ``length`` (>= size) pixels, in view order."""
  check_protocol(spatial, num_crops)
  free = length - size
  if free < 0:
    raise ValueError(f"crop of {size} pixels does not fit in {length}")
  if spatial == "mmaction2":
    centre = free // 2
    return [centre] if num_crops == 1 else [0, 2 * centre, centre]
  centre = int(math.ceil(free / 2))
  return [centre] if num_crops == 1 else [0, centre, free]


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  scale = np.float32(in_size / out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  lo = np.floor(src)
  frac = (src - lo).astype(np.float32)
  lo = lo.astype(np.int64)
  return np.clip(lo, 0, in_size - 1), np.clip(lo + 1, 0, in_size - 1), frac


def resize_bilinear(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of uint8 frames (..., H, W, C) to (..., height, width, C)."""
  frames = np.asarray(frames)
  if frames.shape[-3:-1] == (height, width):
    return frames.astype(np.uint8, copy=False)
  y0, y1, fy = _axis_weights(frames.shape[-3], height)
  x0, x1, fx = _axis_weights(frames.shape[-2], width)
  f = frames.astype(np.float32)
  fy = fy[:, None, None]
  rows = f[..., y0, :, :] * (1 - fy) + f[..., y1, :, :] * fy
  fx = fx[:, None]
  out = rows[..., :, x0, :] * (1 - fx) + rows[..., :, x1, :] * fx
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def eval_views(frames: np.ndarray, crop_size: int, num_crops: int = 3,
               spatial: str = "mmaction2") -> np.ndarray:
  """Test-time spatial views of decoded frames (T, H, W, 3) -> (num_crops, T, S, S, 3) uint8."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"eval_views expects frames (T, H, W, 3), got shape {frames.shape}")
  check_protocol(spatial, num_crops)
  h, w = resized_shape(frames.shape[1], frames.shape[2], crop_size, spatial)
  frames = resize_bilinear(frames, h, w)
  views = []
  for off in crop_offsets(max(h, w), crop_size, num_crops, spatial):
    if w >= h:
      views.append(frames[:, :, off:off + crop_size])
    else:
      views.append(frames[:, off:off + crop_size, :])
  return np.stack(views)


def rrc_box_from_draws(height: int, width: int, u_area, u_ratio, u_x: float, u_y: float):
  """RandomResizedCrop box ``(y, x, h, w)`` from uniform [0, 1) draws (mmaction2's rule).

  ``u_area``/``u_ratio`` hold one draw per try: area fraction uniform in [0.08, 1], aspect
  ratio log-uniform in [3/4, 4/3], ``w = round(sqrt(area*ratio))``, ``h = round(sqrt(area/ratio))``;
  the first try that fits (and is at least 1x1) wins, offsets uniform integers. When no try
  fits: the centred square of side min(H, W).
  """
  u_area, u_ratio = np.asarray(u_area, np.float64), np.asarray(u_ratio, np.float64)
  area = (AREA_RANGE[0] + (AREA_RANGE[1] - AREA_RANGE[0]) * u_area) * height * width
  log_lo, log_hi = math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1])
  ratio = np.exp(log_lo + (log_hi - log_lo) * u_ratio)
  cw = np.round(np.sqrt(area * ratio)).astype(np.int64)
  ch = np.round(np.sqrt(area / ratio)).astype(np.int64)
  ok = (cw >= 1) & (ch >= 1) & (cw <= width) & (ch <= height)
  if not ok.any():
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side
  i = int(np.argmax(ok))
  x = int(u_x * (width - cw[i] + 1))
  y = int(u_y * (height - ch[i] + 1))
  return y, x, int(ch[i]), int(cw[i])


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int):
  """Numpy RandomResizedCrop box (reference for the tf.data version)."""
  return rrc_box_from_draws(height, width, rng.random(MAX_TRIES), rng.random(MAX_TRIES),
                            rng.random(), rng.random())

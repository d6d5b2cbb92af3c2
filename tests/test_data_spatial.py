"""Spatial protocols: test-time resize/crop offsets (both protocols), RandomResizedCrop boxes."""
import math

import numpy as np
import pytest

from uniformerv2_jax.data import eval_views, spatial

import tensorflow as tf
from uniformerv2_jax.data import tf_ops  # noqa: E402


@pytest.mark.parametrize("h,w", [(320, 569), (272, 640), (320, 427), (480, 270), (224, 224)])
@pytest.mark.parametrize("proto", ["mmaction2", "original"])
def test_resized_shape_follows_recipes(h, w, proto):
  s, short, long_ = 224, min(h, w), max(h, w)
  expect = int(long_ * s / short + 0.5) if proto == "mmaction2" else math.floor(long_ * s / short)
  got = spatial.resized_shape(h, w, s, proto)
  assert min(got) == s and max(got) == expect
  assert (got[0] == s) == (h <= w)  # the short side stays the short side


@pytest.mark.parametrize("short,long_", [(320, 325), (320, 645), (112, 115), (480, 645),
                                         (224, 398), (336, 346), (336, 367)])
def test_resized_shape_rounds_as_the_upstream_code(short, long_):
  """Sizes where long * S / short and the upstreams' expressions round apart, and frames whose
  short side is already S (SlowFast returns those unresized: 336x346 stays, not 336x345)."""
  for size in (224, 336):
    mmcv = int(long_ * float(size / short) + 0.5)           # mmcv rescale_size/_scale_size
    slowfast = (long_ if short == size  # SlowFast short_side_scale's early return
                else int(math.floor((float(long_) / short) * size)))
    for proto, want in (("mmaction2", mmcv), ("original", slowfast)):
      assert spatial.resized_shape(short, long_, size, proto) == (size, want)
      assert spatial.resized_shape(long_, short, size, proto) == (want, size)
      got = tf_ops._resized_shape(tf.constant(short), tf.constant(long_), size, proto)
      assert (int(got[0]), int(got[1])) == (size, want)


def test_crop_offsets_from_the_formulas():
  # free = L' - S = 171 (odd): mmaction2 centre 85, right 2*85 = 170; original centre 86, right 171
  assert spatial.crop_offsets(395, 224, 3, "mmaction2") == [0, 170, 85]
  assert spatial.crop_offsets(395, 224, 3, "original") == [0, 86, 171]
  assert spatial.crop_offsets(395, 224, 1, "mmaction2") == [85]
  assert spatial.crop_offsets(395, 224, 1, "original") == [86]
  assert spatial.crop_offsets(224, 224, 3, "mmaction2") == [0, 0, 0]


def _ramp_frames(t, h, w):
  """Frames whose pixels encode their (row, col), to locate crops after resizing."""
  rows = np.linspace(0, 255, h)[:, None].repeat(w, 1)
  cols = np.linspace(0, 255, w)[None, :].repeat(h, 0)
  frame = np.stack([rows, cols, (rows + cols) / 2], -1)
  return np.round(np.repeat(frame[None], t, 0)).astype(np.uint8)


@pytest.mark.parametrize("proto", ["mmaction2", "original"])
@pytest.mark.parametrize("h,w", [(40, 67), (67, 40), (32, 32)])
def test_eval_views_crop_the_resized_frames(proto, h, w):
  frames = _ramp_frames(3, h, w)
  views = eval_views(frames, 24, 3, spatial=proto)
  assert views.shape == (3, 3, 24, 24, 3) and views.dtype == np.uint8
  rh, rw = spatial.resized_shape(h, w, 24, proto)
  resized = spatial.resize_bilinear(frames, rh, rw)
  for view, off in zip(views, spatial.crop_offsets(max(rh, rw), 24, 3, proto)):
    expect = resized[:, :, off:off + 24] if rw >= rh else resized[:, off:off + 24]
    np.testing.assert_array_equal(view, expect)
  np.testing.assert_array_equal(eval_views(frames, 24, 1, spatial=proto)[0],
                                views[2 if proto == "mmaction2" else 1])


def test_bilinear_resize_reference_points():
  # 2x upscale with half-pixel centres: out[0] = in[0], out[1] = 0.75*in[0] + 0.25*in[1], ...
  row = np.array([[0, 100, 200]], np.uint8)[..., None].repeat(3, -1)
  out = spatial.resize_bilinear(row, 1, 6)[0, :, 0]
  assert out.tolist() == [0, 25, 75, 125, 175, 200]


@pytest.mark.parametrize("proto", ["mmaction2", "original"])
@pytest.mark.parametrize("num_crops", [1, 3])
def test_tensorflow_eval_views_match_numpy(proto, num_crops):
  rng = np.random.default_rng(0)
  for h, w in [(320, 569), (57, 31), (100, 100)]:
    frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    ref = eval_views(frames, 48, num_crops, spatial=proto)
    got = tf_ops.eval_views(tf.constant(frames), 48, num_crops, proto).numpy()
    assert got.shape == ref.shape
    assert np.abs(got.astype(int) - ref).max() <= 1


def test_random_resized_crop_tf_equals_numpy_for_same_draws():
  rng = np.random.default_rng(1)
  for h, w in [(320, 569), (272, 640), (17, 35), (1, 1000), (8, 8)]:
    for _ in range(50):
      ua, ur, ux, uy = rng.random(10), rng.random(10), rng.random(), rng.random()
      ref = spatial.rrc_box_from_draws(h, w, ua, ur, ux, uy)
      got = tf_ops.rrc_box_from_draws(h, w, tf.constant(ua), tf.constant(ur),
                                      tf.constant(ux, tf.float64),
                                      tf.constant(uy, tf.float64)).numpy()
      assert tuple(got) == ref


def test_random_resized_crop_box_ranges_and_fallback():
  rng = np.random.default_rng(2)
  h, w = 320, 569
  boxes = np.array([spatial.random_resized_crop_box(rng, h, w) for _ in range(3000)])
  y, x, ch, cw = boxes.T
  assert (y >= 0).all() and (x >= 0).all() and (y + ch <= h).all() and (x + cw <= w).all()
  area, ratio = ch * cw / (h * w), cw / ch
  fallback = (ch == h) & (cw == h)
  ok = ~fallback
  # rounding to whole pixels moves area/ratio a little past the exact bounds
  assert area[ok].min() >= 0.079 and area[ok].max() <= 1.0
  assert ratio[ok].min() >= 0.75 - 0.01 and ratio[ok].max() <= 4 / 3 + 0.01
  # the range is covered up to the largest crop that fits: 320 x 427 (ratio 4/3) = 0.75
  assert area[ok].min() < 0.1 and area[ok].max() > 0.7
  # a 1-pixel-high frame never fits a 3/4..4/3 crop of >= 8% area: centred 1x1 square
  assert spatial.random_resized_crop_box(rng, 1, 1000) == (0, 499, 1, 1)

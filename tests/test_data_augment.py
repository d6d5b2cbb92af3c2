"""Accelerator-side augmentation: normalisation and RandAugment ops (timm/PIL formulas)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uniformerv2_jax.data import augment

apply_op = jax.jit(augment.apply_op)  # one compilation per clip shape, op is traced
OP = {name: i for i, name in enumerate(augment.OPS)}


@pytest.fixture(scope="module")
def clip():
  return np.random.default_rng(0).integers(0, 256, (2, 12, 20, 3)).astype(np.float32)


def run(clip, name, magnitude=7.0, sign=1.0):
  return np.asarray(apply_op(clip, OP[name], magnitude, sign))


def test_normalize():
  out = augment.normalize(jnp.array([0, 255, 114.75]))
  np.testing.assert_allclose(out, [-2.0, (255 - 114.75) / 57.375, 0.0], rtol=1e-6)
  video = np.zeros((1, 2, 4, 4, 3), np.uint8)
  assert jax.jit(augment.normalize)(video).dtype == jnp.float32
  assert augment.normalize(video, jnp.bfloat16).dtype == jnp.bfloat16


def test_lookup_ops_at_magnitude_7(clip):
  # timm "increasing" levels at m=7: posterize keeps 4 - int(2.8) = 2 bits, solarize threshold
  # 256 - int(179.2) = 77, solarize-add adds int(77.0) = 77 below 128
  np.testing.assert_array_equal(run(clip, "Invert"), 255 - clip)
  np.testing.assert_array_equal(run(clip, "PosterizeIncreasing"),
                                clip.astype(np.uint8) & 0b11000000)
  np.testing.assert_array_equal(run(clip, "SolarizeIncreasing"),
                                np.where(clip >= 77, 255 - clip, clip))
  np.testing.assert_array_equal(run(clip, "SolarizeAdd"),
                                np.where(clip < 128, np.minimum(clip + 77, 255), clip))


def test_autocontrast_stretches_each_frame_and_channel():
  x = np.random.default_rng(1).integers(50, 101, (2, 8, 8, 3)).astype(np.float32)
  x[..., 0, 0, :] = 50  # make every frame-channel span exactly 50..100
  x[..., 0, 1, :] = 100
  np.testing.assert_array_equal(run(x, "AutoContrast"), np.floor((x - 50) * 255 / 50))


def pil_equalize_channel(channel):
  """ImageOps.equalize for one channel, from its documented algorithm."""
  hist = np.bincount(channel.astype(int).ravel(), minlength=256)
  nonzero = hist[hist > 0]
  step = (nonzero.sum() - nonzero[-1]) // 255 if len(nonzero) > 1 else 0
  if not step:
    return channel
  lut, n = [], step // 2
  for i in range(256):
    lut.append(min(n // step, 255))
    n += hist[i]
  return np.array(lut)[channel.astype(int)]


def test_equalize_matches_pil_algorithm(clip):
  skewed = np.floor(clip ** 2 / 255)  # uneven histogram
  expect = np.stack([np.stack([pil_equalize_channel(f[..., c]) for c in range(3)], -1)
                     for f in skewed])
  np.testing.assert_array_equal(run(skewed, "Equalize"), expect)


def assert_like_pil(got, expect):
  """Equal but for float32 ties: a product landing on an integer may truncate one lower."""
  diff = np.abs(got - expect)
  assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_enhance_ops_blend_like_pil(clip):
  # factor = 1 + 0.09 m with a sign; PIL truncates blend results to uint8
  assert_like_pil(run(clip, "BrightnessIncreasing"), np.clip(np.floor(clip * 1.63), 0, 255))
  gray = np.floor((clip[..., 0] * 19595 + clip[..., 1] * 38470 + clip[..., 2] * 7471
                   + 32768) / 65536)[..., None]
  assert_like_pil(run(clip, "ColorIncreasing", 10, -1), np.floor(gray + 0.1 * (clip - gray)))
  mean = np.floor(gray.mean(axis=(1, 2, 3), keepdims=True) + 0.5)
  assert_like_pil(run(clip, "ContrastIncreasing", 5, -1),
                  np.clip(np.floor(mean + 0.55 * (clip - mean)), 0, 255))
  sharp = run(clip, "SharpnessIncreasing", 10, 1)
  np.testing.assert_array_equal(sharp[:, 0], clip[:, 0])  # border rows untouched
  window = clip[:, 4:7, 4:7]
  smooth = np.round((window.sum((1, 2)) + 4 * clip[:, 5, 5]) / 13)
  expect = np.clip(np.floor(smooth + 1.9 * (clip[:, 5, 5] - smooth)), 0, 255)
  assert np.abs(sharp[:, 5, 5] - expect).max() <= 1


def test_translate_moves_by_045_m_of_the_size_and_fills_128(clip):
  # m=10: 0.45 * 20 = 9 columns / 0.45 * 12 = 5.4 rows
  out = run(clip, "TranslateXRel", 10, 1)
  np.testing.assert_array_equal(out[:, :, :11], clip[:, :, 9:])
  assert (out[:, :, 11:] == 128).all()
  out = run(clip, "TranslateYRel", 10, -1)  # 5.4 rows down: fractional, blends rows
  np.testing.assert_array_equal(out[:, :5], np.full_like(out[:, :5], 128))


def test_geometric_ops_at_magnitude_0_are_identity(clip):
  for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
    np.testing.assert_array_equal(run(clip, name, 0.0), clip)


def test_rotate_is_counter_clockwise_30_degrees_at_m10():
  x = np.zeros((1, 41, 41, 3), np.float32)
  x[0, 19:22, 34:37] = 255  # a blob 15 px right of the centre (20, 20)
  out = run(x, "Rotate", 10, 1)[0, ..., 0]
  rows, cols = np.nonzero(out > 200)  # the blob; the corners hold fill 128 or blends with it
  # counter-clockwise by 30 degrees (image y axis points down): up and a little left
  assert abs(rows.mean() - (20 - 15 * 0.5)) < 1 and abs(cols.mean() - (20 + 15 * 0.866)) < 1


def test_shear_x_about_the_top_left_corner():
  x = np.zeros((1, 10, 30, 3), np.float32)
  x[0, :, 10] = 255
  out = run(x, "ShearX", 10, 1)[0, ..., 0]  # input x = x_out + 0.3 y
  for row in (0, 5, 9):
    col = int(np.argmax(out[row]))
    assert abs(col + 0.3 * (row + 0.5) - 10) <= 0.5 + 1e-6  # pixel centres at +0.5


@pytest.fixture(scope="module")
def ra():
  return jax.jit(lambda key, v: augment.randaugment(key, v))


def test_randaugment_same_ops_for_all_frames_of_a_clip(ra):
  frame = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  videos = np.broadcast_to(frame, (8, 4, 16, 16, 3)).copy()
  out = np.asarray(ra(jax.random.PRNGKey(0), videos))
  assert out.dtype == np.uint8 and out.shape == videos.shape
  for clip in out:  # identical frames stay identical: one op list per clip
    assert (clip == clip[0]).all()
  assert len({clip.tobytes() for clip in out}) > 2  # clips draw different ops


def test_randaugment_determinism_and_float_input(ra):
  videos = np.random.default_rng(3).integers(0, 256, (8, 4, 16, 16, 3), dtype=np.uint8)
  a = np.asarray(ra(jax.random.PRNGKey(1), videos))
  np.testing.assert_array_equal(a, np.asarray(ra(jax.random.PRNGKey(1), videos)))
  assert not np.array_equal(a, np.asarray(ra(jax.random.PRNGKey(2), videos)))
  out = ra(jax.random.PRNGKey(1), videos.astype(np.float32))
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), a)
  assert not np.array_equal(a, videos)  # ops were applied (P(no op in 8 clips) ~ 1e-5)


def test_randaugment_with_probability_0_is_identity():
  videos = np.random.default_rng(4).integers(0, 256, (2, 2, 8, 8, 3), dtype=np.uint8)
  out = augment.randaugment(jax.random.PRNGKey(0), videos, prob=0.0, num_layers=1)
  np.testing.assert_array_equal(np.asarray(out), videos)

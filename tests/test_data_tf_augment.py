"""Host RandAugment (TensorFlow, whole frames before the crop) against the accelerator's (JAX),
op by op: the same ops, magnitudes and arithmetic on any frame size."""
import jax
import numpy as np
import pytest

import tensorflow as tf
from uniformerv2_jax.data import augment, tf_augment  # noqa: E402

jax_op = jax.jit(augment.apply_op)
WARPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.fixture(scope="module")
def frames():
  """Two frames of an odd size: smooth gradients plus noise (histograms and edges matter)."""
  rng = np.random.default_rng(0)
  h, w = 23, 41
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([40 + 4 * x, 30 + 7 * y, 120 + 2 * (x - y)], -1)
  clip = np.stack([base, base[::-1] * 0.7]) + rng.normal(0, 12, (2, h, w, 3))
  return np.clip(np.round(clip), 0, 255).astype(np.float32)


@pytest.mark.parametrize("name", augment.OPS)
def test_each_op_matches_the_accelerator_version(frames, name):
  op = augment.OPS.index(name)
  for mag, sign in ((7.0, 1.0), (3.3, -1.0), (10.0, 1.0), (0.0, 1.0)):
    want = np.asarray(jax_op(frames, op, mag, sign))
    got = tf_augment.apply_op(tf.constant(frames), op, mag, sign).numpy()
    diff = np.abs(got - want)
    if name not in WARPS:
      np.testing.assert_array_equal(got, want, err_msg=f"{name} m={mag} sign={sign}")
      continue
    # Shears and translations sample many pixels at exactly half-way between two: the
    # bilinear value is an integer + .5, and each implementation's float32 order rounds
    # that tie its own way (checked against float64: every difference is such a tie).
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02, (name, mag, sign, diff.max(),
                                                            (diff > 0).mean())


def test_xla_compiled_ops_equal_tensorflow_kernels():
  """The ops XLA compiles give the bits TensorFlow's own kernels give, on frames large enough
  for vectorised loops (and with saturated rows: AutoContrast/Contrast edge cases), at random
  magnitudes too."""
  rng = np.random.default_rng(1)
  clip = np.clip(np.round(rng.normal(128, 60, (3, 40, 72, 3))), 0, 255).astype(np.float32)
  clip[2, :9] = 255
  draws = [(7.0, 1.0), (3.3, -1.0), (10.0, 1.0), (8.6, -1.0)] + [
      (float(m), float(s)) for m, s in zip(rng.uniform(0, 10, 12), rng.choice([-1, 1], 12))]
  for op, name in enumerate(augment.OPS):
    for mag, sign in draws:
      want = tf_augment.apply_op(tf.constant(clip), op, mag, sign, compiled=False).numpy()
      got = tf_augment.apply_op(tf.constant(clip), op, mag, sign).numpy()
      np.testing.assert_array_equal(got, want, err_msg=f"{name} m={mag} sign={sign}")


@pytest.mark.parametrize("along", ["xy", "x", "y"])
def test_xla_warps_equal_tensorflows_projective_transform(along):
  """The warps' XLA form gives the bits of TensorFlow's ImageProjectiveTransformV3 (its float32
  order, every product rounded) on random affine maps beyond the ops' ranges: rotations with
  shifts, and for the one-axis forms the row-keeping (column-keeping) shears and translations
  they serve, sources far outside the frame included."""
  rng = np.random.default_rng(2)
  clip = tf.constant(rng.integers(0, 256, (2, 37, 53, 3)).astype(np.uint8))
  xla = tf.function(tf_augment._warp_xla(along), jit_compile=True)
  for trial in range(60):
    angle, shear = rng.uniform(-0.7, 0.7), rng.uniform(-0.4, 0.4) * (trial % 3 > 0)
    shift = rng.uniform(-80, 80, 2)
    if along == "xy":
      coefficients = (np.cos(angle), np.sin(angle), shift[0], -np.sin(angle),
                      np.cos(angle), shift[1])
    elif along == "x":
      coefficients = (1.0, shear, shift[0], 0.0, 1.0, 0.0)
    else:
      coefficients = (1.0, 0.0, 0.0, shear, 1.0, shift[1])
    level = tf_augment._warp_level(lambda mag, sign, h, w: coefficients)(clip, 0.0, 1.0)
    frames = tf.cast(clip, tf.float32)
    want = tf_augment._warp(frames, *level).numpy()
    got = xla(frames, *level).numpy()
    np.testing.assert_array_equal(got, want, err_msg=f"{along} {coefficients}")


def test_warp_products_are_rounded_before_the_sum():
  """A rotation where TensorFlow's two roundings matter: its kernel gives 155 at this pixel;
  XLA computing the bilinear weights times the taps as float products (fused into the sums
  after them: one rounding) gives 156. The integer products give TensorFlow's value."""
  clip = tf.constant(np.random.default_rng(5).integers(0, 256, (2, 120, 160, 3)).astype(np.uint8))
  coefficients = (0.99869007, -0.05116777, -23.90263176, 0.05116777, 0.99869007, 41.03923798)
  level = tf_augment._warp_level(lambda mag, sign, h, w: coefficients)(clip, 0.0, 1.0)
  frames = tf.cast(clip, tf.float32)
  assert tf_augment._warp(frames, *level).numpy()[0, 31, 83, 0] == 155
  xla = tf.function(tf_augment._warp_xla("xy"), jit_compile=True)
  assert xla(frames, *level).numpy()[0, 31, 83, 0] == 155


def test_blends_round_the_product_before_the_sum():
  """PIL's blend rounds d + factor * (x - d) twice in float32. Contrast at this magnitude
  blends 75 towards the mean 193 with factor 1.6271187: the rounded product is -192.0, so
  the pixel is 1; one rounding of the exact 0.99999... (an FMA, XLA's excess precision)
  would give 0."""
  frame = np.full((2, 40, 72), 193.0, np.float32)
  frame[:, 0, :31] = 75
  frame[:, 1, :59] = 255  # the grey mean stays 193
  frame = np.repeat(frame[..., None], 3, -1)
  op = augment.OPS.index("ContrastIncreasing")
  for compiled in (False, True):
    out = tf_augment.apply_op(tf.constant(frame), op, 6.9679856300354, 1.0,
                              compiled=compiled).numpy()
    np.testing.assert_array_equal(out[:, 0, :31], 1.0, err_msg=f"compiled={compiled}")


def test_randaugment_clip_level_draws(frames):
  clip = tf.constant(np.repeat(frames[:1], 3, 0).astype(np.uint8))  # three equal frames
  seed = tf.constant([3, 4], tf.int64)
  out = tf_augment.randaugment(seed, clip, magnitude=9, num_layers=4, prob=1.0).numpy()
  assert out.dtype == np.uint8 and out.shape == clip.shape
  np.testing.assert_array_equal(out[0], out[1])  # the same ops for every frame
  np.testing.assert_array_equal(out[0], out[2])
  again = tf_augment.randaugment(seed, clip, magnitude=9, num_layers=4, prob=1.0).numpy()
  np.testing.assert_array_equal(out, again)  # stateless: the seed decides
  kernels = tf_augment.randaugment(seed, clip, magnitude=9, num_layers=4, prob=1.0,
                                   compiled=False).numpy()
  np.testing.assert_array_equal(out, kernels)  # XLA-compiled ops or not: the same clip
  outs = [tf_augment.randaugment(tf.constant([s, 0], tf.int64), clip, prob=1.0).numpy()
          for s in range(6)]
  assert len({o.tobytes() for o in outs}) > 1
  off = tf_augment.randaugment(seed, clip, prob=0.0).numpy()
  np.testing.assert_array_equal(off, clip.numpy())


def test_train_sample_augments_the_whole_frames_then_crops(frames):
  """The pipeline's order is the upstream's: RandAugment of the decoded frames, then the
  RandomResizedCrop box (drawn from the frame size) and the resize."""
  from uniformerv2_jax.data import pipeline, tf_ops
  jpegs = tf.stack([tf.io.encode_jpeg(f.astype(np.uint8), quality=95) for f in frames])
  seed = tf.constant([11, 5], tf.int64)
  got = pipeline._train_sample(jpegs, seed, 2, 16, False, (0.08, 1.0), (3 / 4, 4 / 3),
                               randaugment=(9.0, 4, True),
                               decoded=tf_ops.decode_frames(jpegs, 2)).numpy()
  s_crop, _, s_aug = (tf.random.experimental.stateless_fold_in(seed, k) for k in range(3))
  whole = tf_augment.randaugment(s_aug, tf_ops.decode_frames(jpegs, 2), 9.0, 4)
  y, x, h, w = tf_ops.random_resized_crop_box(s_crop, 23, 41).numpy()
  want = tf_ops.resize_uint8(whole[:, y:y + h, x:x + w], 16, 16).numpy()
  np.testing.assert_array_equal(got, want)
  crop_first = tf_augment.randaugment(
      s_aug, tf_ops.resize_uint8(tf_ops.decode_frames(jpegs, 2)[:, y:y + h, x:x + w], 16, 16),
      9.0, 4).numpy()
  assert not np.array_equal(got, crop_first)  # the order is visible in the result

"""RandAugment's policy, both implementations, against timm's ``rand-m7-n4-mstd0.5-inc1``
(timm.data.auto_augment: RandAugment picks ``n`` ops uniformly with replacement from the 15
``_RAND_INCREASING_TRANSFORMS``; each AugmentOp applies with ``prob`` 0.5, draws its magnitude
from ``random.gauss(m, mstd)`` clipped to [0, 10], and negates its level with probability 0.5),
and the augmentation applies exactly the drawn ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from uniformerv2_jax.data import augment, tf_augment

DRAWS, LAYERS = 4000, 4


def _jax_policies():
  keys = jax.random.split(jax.random.PRNGKey(0), DRAWS)
  return [np.asarray(a) for a in jax.vmap(lambda k: augment.draw_policy(k, LAYERS))(keys)]


def _tf_policies():
  seeds = tf.stack([tf.fill([DRAWS], tf.constant(7, tf.int64)), tf.range(DRAWS, dtype=tf.int64)], 1)
  draw = tf.function(lambda seeds: tf.map_fn(  # a graph: 4000 eager draws take ~20 s
      lambda s: tf_augment.draw_policy(s, LAYERS), seeds, parallel_iterations=64,
      fn_output_signature=(tf.int32, tf.float32, tf.float32, tf.bool)))
  out = draw(seeds)
  return [a.numpy() for a in out]


@pytest.mark.parametrize("draw", [_jax_policies, _tf_policies], ids=["device", "host"])
def test_policy_follows_timm(draw):
  ops, mags, signs, applied = draw()
  n = DRAWS * LAYERS
  tol = lambda p: 4.5 * np.sqrt(p * (1 - p) / n)  # 4.5 sigma of a fraction of n draws
  counts = np.bincount(ops.ravel(), minlength=len(augment.OPS))
  assert len(counts) == 15 and np.abs(counts / n - 1 / 15).max() < tol(1 / 15)
  # layers draw independently: two layers agree as often as two uniform picks (1/15)
  assert abs((ops[:, 0] == ops[:, 1]).mean() - 1 / 15) < 4.5 * np.sqrt(1 / 15 * 14 / 15 / DRAWS)
  assert abs(applied.mean() - 0.5) < tol(0.5)
  assert set(np.unique(signs)) == {-1.0, 1.0} and abs((signs > 0).mean() - 0.5) < tol(0.5)
  assert mags.min() >= 0 and mags.max() <= 10
  assert abs(mags.mean() - 7) < 4.5 * 0.5 / np.sqrt(n) and abs(mags.std() - 0.5) < 0.02


def test_randaugment_applies_the_drawn_ops():
  frames = np.random.default_rng(0).integers(0, 256, (2, 12, 16, 3), np.uint8)
  for s in range(6):  # host: one clip from its stateless seed
    seed = tf.constant([3, s], tf.int64)
    ops, mags, signs, applied = (a.numpy() for a in tf_augment.draw_policy(seed))
    want = tf.cast(frames, tf.float32)
    for op, mag, sign, on in zip(ops, mags, signs, applied):
      want = tf_augment.apply_op(want, op, mag, sign) if on else want
    got = tf_augment.randaugment(seed, frames)
    np.testing.assert_array_equal(got.numpy(), tf.cast(want, tf.uint8).numpy())
  videos = np.random.default_rng(1).integers(0, 256, (6, 2, 12, 16, 3), np.uint8)
  key = jax.random.PRNGKey(5)  # device: clip i from split(key)[i]
  got = np.asarray(jax.jit(augment.randaugment)(key, videos))
  apply_op = jax.jit(augment.apply_op)  # one compilation for every op
  for clip, k, out in zip(videos, jax.random.split(key, len(videos)), got):
    want = jnp.asarray(clip, jnp.float32)
    for op, mag, sign, on in zip(*augment.draw_policy(k)):
      want = apply_op(want, op, mag, sign) if on else want
    np.testing.assert_array_equal(out, np.asarray(want).astype(np.uint8))

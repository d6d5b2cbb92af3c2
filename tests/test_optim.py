"""Optimiser: the schedule against its formula, weight-decay mask, frozen recipe."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs.common import get_base_config
from uniformerv2_jax.training.optim import lr_schedule, make_optimizer, trainable


def test_schedule_matches_formula():
  base, lo, total, warm = 1e-3, 1e-6, 100, 10
  s = lr_schedule(base, total, warm, warmup_start_lr=1e-6, min_lr=lo)
  for step in range(total + 1):
    if step < warm:
      want = 1e-6 + (base - 1e-6) * step / warm
    else:
      want = lo + (base - lo) * (1 + math.cos(math.pi * (step - warm) / (total - warm))) / 2
    np.testing.assert_allclose(float(s(step)), want, rtol=1e-5)
  np.testing.assert_allclose(float(s(warm)), base, rtol=1e-6)
  np.testing.assert_allclose(float(s(total)), lo, rtol=1e-5)


def test_weight_decay_skips_1d_params_and_clip():
  c = get_base_config().train
  c.update(base_lr=0.1, warmup_epochs=0.0, warmup_start_lr=0.1, min_lr=0.1)
  tx, _ = make_optimizer(c, 10, 1)
  params = {"w": jnp.full((2, 3), 2.0), "b": jnp.full((3,), 2.0), "pos": jnp.ones((1, 1, 3))}
  zero = jax.tree.map(jnp.zeros_like, params)
  new = optax.apply_updates(params, tx.update(zero, tx.init(params), params)[0])
  np.testing.assert_allclose(new["w"], 2.0 - 0.1 * 0.05 * 2.0, rtol=1e-6)  # decayed
  np.testing.assert_allclose(new["pos"], 1.0 - 0.1 * 0.05, rtol=1e-6)       # 3-D: decayed
  np.testing.assert_array_equal(new["b"], params["b"])                       # 1-D: not
  # clipping: a gradient of norm 40 reaches Adam as norm 20 (first moment = 0.1 * g)
  g = {"w": jnp.full((2, 3), 40 / math.sqrt(12)), "b": jnp.full((3,), 40 / math.sqrt(12)),
       "pos": jnp.full((1, 1, 3), 40 / math.sqrt(12))}
  state = tx.update(g, tx.init(params), params)[1]
  mu = state[1][0].mu
  np.testing.assert_allclose(float(optax.tree.norm(mu)), 0.1 * 20.0, rtol=1e-5)


def test_frozen_trains_only_global_blocks_and_head():
  tree = {"backbone": {"a": 1}, "temporal": {"b": 2}, "head": {"c": 3}}
  assert set(trainable(tree, True)) == {"temporal", "head"}
  assert trainable(tree, False) is tree

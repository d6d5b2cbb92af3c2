"""Optimiser: the schedule against its formula, weight-decay mask, frozen recipe."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pytest

from configs.common import get_base_config
from uniformerv2_jax import model_config, torch_layout
from uniformerv2_jax.training.optim import decay_mask, lr_schedule, make_optimizer, trainable
from uniformerv2_jax.training.state import abstract_weights
from uniformerv2_jax.weights import flatten, weight_shapes


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
  params = {"w": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 2.0)},
            "pos": jnp.ones((1, 1, 3))}
  zero = jax.tree.map(jnp.zeros_like, params)
  new = optax.apply_updates(params, tx.update(zero, tx.init(params), params)[0])
  np.testing.assert_allclose(new["w"]["kernel"], 2.0 - 0.1 * 0.05 * 2.0, rtol=1e-6)  # decayed
  np.testing.assert_allclose(new["pos"], 1.0 - 0.1 * 0.05, rtol=1e-6)  # 3-D: decayed
  np.testing.assert_array_equal(new["w"]["bias"], params["w"]["bias"])  # 1-D: not
  # clipping: a gradient of norm 40 reaches Adam as norm 20 (first moment = 0.1 * g)
  g = jax.tree.map(lambda p: jnp.full(p.shape, 40 / math.sqrt(12)), params)
  state = tx.update(g, tx.init(params), params)[1]
  mu = state[1][0].mu
  np.testing.assert_allclose(float(optax.tree.norm(mu)), 0.1 * 20.0, rtol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_follows_the_upstream_tensor_ranks(scan):
  """Decayed exactly when the upstream's tensor is more than 1-D, whatever our layout.

  The fused qkv / kv biases are (3, C) / (2, C) here but one 1-D in_proj_bias upstream, and
  scanned blocks add a layer axis: neither may make a 1-D upstream parameter decayed.
  """
  cfg = model_config(None, input_resolution=32, patch_size=8, width=48, layers=2, heads=4,
                     n_layers=2, return_list=(0, 1), n_head=4, num_classes=5, t_size=4,
                     no_lmhra=False, double_lmhra=True, temporal_downsample=True)
  plain = flatten(abstract_weights(cfg)[0])
  shapes = torch_layout.torch_shapes(cfg, flatten(weight_shapes(cfg)))  # params + batch stats
  rank = {rule.path: len(shapes[rule.torch])  # unscanned path -> rank of the upstream tensor
          for rule in torch_layout.model_rules(cfg) if rule.path in plain}
  assert set(rank) == set(plain)
  params = abstract_weights(cfg.replace(scan_layers=scan))[0]
  mask = flatten(decay_mask(params))
  assert set(mask) == set(flatten(params))
  for path, decayed in mask.items():
    if scan and path[:2] == ("backbone", "blocks"):
      path = path[:2] + (0,) + path[2:]  # every layer as layer 0
    assert decayed == (rank[path] > 1), (path, rank[path])
  assert not mask[("backbone", "blocks") + (() if scan else (0,)) + ("qkv", "bias")]


def test_frozen_trains_only_global_blocks_and_head():
  tree = {"backbone": {"a": 1}, "temporal": {"b": 2}, "head": {"c": 3}}
  assert set(trainable(tree, True)) == {"temporal", "head"}
  assert trainable(tree, False) is tree

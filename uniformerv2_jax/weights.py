"""Building models from weight trees: PyTorch state dicts, scanned/unscanned layouts."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uniformerv2_jax.config import ModelConfig
from uniformerv2_jax.model import UniFormerV2
from uniformerv2_jax.torch_layout import (apply_rules, canonical_state_dict, model_rules)

WEIGHTS = (nnx.Param, nnx.BatchStat)


def abstract_model(cfg: ModelConfig, seed: int = 0) -> UniFormerV2:
  """A model of shapes only (no memory for weights); dropout RNG is real."""
  model = nnx.eval_shape(lambda: UniFormerV2(cfg, rngs=nnx.Rngs(seed)))
  model.dropout_rngs = nnx.Rngs(dropout=seed)
  return model


def weight_shapes(cfg: ModelConfig) -> dict:
  """Pure dict of ShapeDtypeStruct for params and batch stats, UNSCANNED layout."""
  model = abstract_model(cfg.replace(scan_layers=False))
  return nnx.to_pure_dict(nnx.state(model, WEIGHTS))


def nest(flat: Mapping[tuple, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return tree


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def stack_layers(tree: Mapping) -> dict:
  """Unscanned -> scanned: backbone.blocks.{0..L-1}.* become one leading axis."""
  tree = dict(tree)
  backbone = dict(tree["backbone"])
  blocks = backbone["blocks"]
  if not all(isinstance(k, int) for k in blocks):
    return tree  # already scanned
  layers = [blocks[i] for i in sorted(blocks)]
  backbone["blocks"] = jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *layers)
  tree["backbone"] = backbone
  return tree


def unstack_layers(tree: Mapping) -> dict:
  """Scanned -> unscanned."""
  tree = dict(tree)
  backbone = dict(tree["backbone"])
  blocks = backbone["blocks"]
  if all(isinstance(k, int) for k in blocks):
    return tree
  n = jax.tree.leaves(blocks)[0].shape[0]
  backbone["blocks"] = {i: jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(n)}
  tree["backbone"] = backbone
  return tree


def model_from_tree(cfg: ModelConfig, tree: Mapping, seed: int = 0) -> UniFormerV2:
  """A model holding `tree` (params + batch stats, either layout) cast to cfg.param_dtype."""
  model = abstract_model(cfg, seed)
  tree = stack_layers(tree) if cfg.scan_layers else unstack_layers(tree)
  graphdef, weights, rest = nnx.split(model, WEIGHTS, ...)
  dtype = jnp.dtype(cfg.param_dtype)
  nnx.replace_by_pure_dict(weights, jax.tree.map(lambda a: jnp.asarray(a, dtype), tree))
  return nnx.merge(graphdef, weights, rest)


def torch_tensors_to_tree(tensors: Mapping[str, Any], cfg: ModelConfig,
                          source: str = "checkpoint") -> dict:
  """Canonical torch tensors -> unscanned JAX weight tree (numpy), checked against cfg."""
  expected = {path: s for path, s in flatten(weight_shapes(cfg)).items()}
  return nest(apply_rules(model_rules(cfg), tensors, expected, source=source))


def from_torch_state_dict(state_dict: Mapping[str, Any], config: ModelConfig,
                          dtype=jnp.float32, source: str = "checkpoint") -> UniFormerV2:
  """A model with the weights of an upstream state dict (original or mmaction2 layout).

  Parameters and computation are in `dtype` (float64 needs jax_enable_x64). Every
  missing, unexpected or mis-shaped key is reported by name; nothing loads partially.
  """
  dtype = jnp.dtype(dtype).name
  cfg = config.replace(dtype=dtype, param_dtype=dtype)
  tensors, _ = canonical_state_dict(state_dict)
  return model_from_tree(cfg, torch_tensors_to_tree(tensors, cfg, source=source))


def count_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

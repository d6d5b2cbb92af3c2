"""The train state: a plain pytree of pure dicts, sharded by the model's logical axes.

    state = {"step": int32, "params": {...}, "batch_stats": {...}, "opt_state": optax state,
             "rng": uint32[2]}

`params`/`batch_stats` are `nnx.to_pure_dict` trees in the model's layout (scanned when
`scan_layers`); `ModelDef` holds what turns them back into a module (`nnx.merge`). Only
the trainable part of `params` has optimiser state (the frozen recipe: temporal + head).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from uniformerv2_jax import sharding as shd
from uniformerv2_jax.config import ModelConfig
from uniformerv2_jax.model import UniFormerV2
from uniformerv2_jax.training.optim import trainable
from uniformerv2_jax.weights import abstract_model, stack_layers, unstack_layers

WEIGHTS = (nnx.Param, nnx.BatchStat)


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """Static half of the model: graph + non-weight state (dropout RNG), and its config."""
  cfg: ModelConfig
  graphdef: Any
  rest: Any
  param_shardings: dict
  stat_shardings: dict

  def merge(self, params: dict, batch_stats: dict) -> UniFormerV2:
    return nnx.merge(self.graphdef, params, batch_stats, self.rest)


def model_def(cfg: ModelConfig, mesh: Mesh, rules=shd.DEFAULT_RULES,
              min_fsdp_size: int = shd.MIN_FSDP_SIZE) -> ModelDef:
  model = abstract_model(cfg)
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  return ModelDef(cfg, graphdef, rest,
                  nnx.to_pure_dict(shd.state_shardings(params, mesh, rules, min_fsdp_size)),
                  nnx.to_pure_dict(shd.state_shardings(stats, mesh, rules, min_fsdp_size)))


def random_weights(cfg: ModelConfig, seed: int) -> tuple[dict, dict]:
  """Freshly initialised (params, batch_stats) pure dicts (call under jit)."""
  model = UniFormerV2(cfg, rngs=nnx.Rngs(seed))
  _, params, stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def to_model_layout(cfg: ModelConfig, tree: dict) -> dict:
  """A canonical (unscanned) weight tree -> this config's layout, in param_dtype."""
  tree = stack_layers(tree) if cfg.scan_layers else unstack_layers(tree)
  return jax.tree.map(lambda a: jnp.asarray(a, cfg.param_dtype), tree)


def state_shardings(mdef: ModelDef, tx: optax.GradientTransformation, mesh: Mesh,
                    frozen: bool) -> dict:
  """NamedShardings of the whole train state (optimiser moments follow their parameter)."""
  rep = shd.replicated(mesh)
  abstract_params = abstract_weights(mdef.cfg)[0]
  opt_abstract = jax.eval_shape(tx.init, trainable(abstract_params, frozen))
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, opt_abstract, trainable(mdef.param_shardings, frozen),
      transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  return {"step": rep, "params": mdef.param_shardings, "batch_stats": mdef.stat_shardings,
          "opt_state": opt_shardings, "rng": rep}


def abstract_weights(cfg: ModelConfig) -> tuple[dict, dict]:
  """(params, batch_stats) pure dicts of ShapeDtypeStruct, in cfg's layout (scanned or not)."""
  _, params, stats, _ = nnx.split(abstract_model(cfg), nnx.Param, nnx.BatchStat, ...)
  return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def create_train_state(mdef: ModelDef, tx, mesh: Mesh, *, seed: int, frozen: bool,
                       init_weights: dict | None = None, new_head: bool = False):
  """(state, shardings): initialised on device, straight into its sharded layout.

  `init_weights`: params + batch stats as one pure dict (any layout), e.g. from a
  converted checkpoint; None initialises randomly from `seed`. `new_head`: the classifier
  (head.fc) comes from that random initialisation even when `init_weights` has one.
  """
  shardings = state_shardings(mdef, tx, mesh, frozen)

  def init(weights):
    if weights is None:
      params, stats = random_weights(mdef.cfg, seed)
    else:
      # under jit: for a new head XLA initialises only head.fc and drops the rest
      new_fc = random_weights(mdef.cfg, seed)[0]["head"]["fc"] if new_head else None
      params, stats = _split_weights(mdef, weights, new_fc)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": stats,
            "opt_state": tx.init(trainable(params, frozen)),
            "rng": jax.random.key_data(jax.random.key(seed + 1))}

  if init_weights is not None:
    init_weights = to_model_layout(mdef.cfg, init_weights)
  state = jax.jit(init, out_shardings=shardings)(init_weights)
  return state, shardings


def _split_weights(mdef: ModelDef, weights: dict, new_fc: dict | None = None):
  """One pure dict with params and batch stats -> (params, batch_stats) pure dicts.

  new_fc: {"kernel", "bias"} to use as head.fc instead of the one in `weights`.
  """
  params_abs, stats_abs = abstract_weights(mdef.cfg)
  flat = dict(jax.tree_util.tree_flatten_with_path(weights)[0])
  if new_fc is not None:
    flat.update(jax.tree_util.tree_flatten_with_path({"head": {"fc": new_fc}})[0])
  missing = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path((params_abs, stats_abs))[0]
             if p[1:] not in flat]
  if missing:
    raise ValueError(f"initial weights lack {len(missing)} entries, e.g. {missing[:3]}")

  def take(abstract):
    return jax.tree_util.tree_map_with_path(lambda p, a: jnp.asarray(flat[p], a.dtype), abstract)
  return take(params_abs), take(stats_abs)


def abstract_state(state_shapes, shardings) -> Any:
  """ShapeDtypeStructs carrying shardings (restore targets, AOT compilation)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      state_shapes, shardings)


def state_shapes(mdef: ModelDef, tx, frozen: bool, seed: int = 0):
  """Shapes of the train state without allocating it."""
  def init():
    params, stats = random_weights(mdef.cfg, seed)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": stats,
            "opt_state": tx.init(trainable(params, frozen)),
            "rng": jax.random.key_data(jax.random.key(seed + 1))}
  return jax.eval_shape(init)


def unscanned_weights(state) -> dict:
  """Params + batch stats of a state in the canonical (unscanned) layout, merged."""
  merged = jax.tree.map(lambda x: x, state["params"])
  _deep_update(merged, state["batch_stats"])
  return unstack_layers(merged)


def _deep_update(dst: dict, src: dict) -> None:
  for k, v in src.items():
    if isinstance(v, dict) and isinstance(dst.get(k), dict):
      _deep_update(dst[k], v)
    else:
      dst[k] = v

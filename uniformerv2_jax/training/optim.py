"""AdamW with the upstream's schedule: per-iteration linear warm-up, then cosine to min_lr.

Weight decay applies to every parameter the upstream holds as a tensor of more than one
dimension (its 1-D ones: biases, norm scales, class embedding, balance are not decayed);
gradients are clipped at a global L2 norm.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

# Top-level subtrees trained by the frozen-backbone recipe (everything else is constant).
FROZEN_TRAINABLE = ("temporal", "head")


def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int,
                warmup_start_lr: float = 1e-6, min_lr: float = 1e-6):
  """lr(step): warmup_start_lr -> base_lr linearly over warmup_steps, then cosine to min_lr.

  At step `total_steps` the rate is exactly `min_lr` (the upstream's `lr_func_cosine` with
  the warm-up of `get_lr_at_epoch`, evaluated per iteration).
  """
  total_steps, warmup_steps = int(total_steps), int(warmup_steps)
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_start_lr + (base_lr - warmup_start_lr) * step / max(warmup_steps, 1)
    t = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cos = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * t))
    return jnp.where(step < warmup_steps, warm, cos)
  return schedule


# Leaf names of the parameters that are 1-D upstream. The rank here is no guide: the fused
# projections keep their biases as (3, C) / (2, C) (upstream: one (3C,) in_proj_bias) and
# scanned blocks add a layer axis to every backbone parameter.
NO_DECAY = frozenset({"bias", "dw_bias", "scale", "class_embedding", "balance"})


def decay_mask(params):
  """True for parameters that get weight decay (those the upstream holds as >1-D tensors)."""
  def decays(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) not in NO_DECAY
  return jax.tree_util.tree_map_with_path(decays, params)


# The config.train fields the updates depend on. A checkpoint records them; a resumed run
# may change them (it says so: upstream and mmaction2 take the new values silently).
SETTINGS = ("epochs", "warmup_epochs", "base_lr", "warmup_start_lr", "min_lr", "weight_decay",
            "grad_clip", "b1", "b2", "eps")


def settings(train_cfg) -> dict:
  return {k: float(train_cfg[k]) for k in SETTINGS}


def total_steps(train_cfg, steps_per_epoch: int) -> int:
  """The run's length in steps: `epochs` of `config.train` (or of its `settings`)."""
  return int(round(train_cfg["epochs"] * steps_per_epoch))


def schedule_for(train_cfg, total_steps: int, steps_per_epoch: int):
  """The learning-rate schedule of `config.train` (or of its `settings`)."""
  c = train_cfg
  return lr_schedule(c["base_lr"], total_steps, round(c["warmup_epochs"] * steps_per_epoch),
                     c["warmup_start_lr"], c["min_lr"])


def make_optimizer(train_cfg, total_steps: int, steps_per_epoch: int):
  """optax transformation and schedule from `config.train`."""
  schedule = schedule_for(train_cfg, total_steps, steps_per_epoch)
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask))
  return tx, schedule


def trainable(params: dict, frozen: bool) -> dict:
  """The part of the parameter tree the optimiser updates."""
  if not frozen:
    return params
  return {k: v for k, v in params.items() if k in FROZEN_TRAINABLE}


def merge_trainable(params: dict, updated: dict) -> dict:
  return {**params, **updated}

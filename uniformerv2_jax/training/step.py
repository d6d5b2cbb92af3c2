"""Pure train/eval steps, jitted once with explicit shardings (the hot path).

The batch arrives as uint8 videos; normalisation (and RandAugment when enabled) runs on
device inside the step. A global batch may be split into `grad_accum_steps` microbatches
(lax.scan); microbatch j is the j-th of A contiguous runs of every device's rows, so every
device keeps its own rows. BatchNorm's running statistics move once per step, by the mean of
the microbatches' statistics (as one batch of `replica_batch` groups moves them).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uniformerv2_jax import sharding as shd
from uniformerv2_jax.training import data_io
from uniformerv2_jax.training.optim import make_optimizer, merge_trainable, trainable
from uniformerv2_jax.training.state import ModelDef, model_def, state_shardings


def _data_fns():
  """(normalize, randaugment) of the data package: uint8 -> float32 on the device."""
  from uniformerv2_jax import data
  return data.normalize, data.randaugment


def cross_entropy(logits, labels):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def make_train_step(mdef, tx, schedule, config, mesh: Mesh):
  """train_step(state, batch) -> (state, metrics); pure, not yet jitted."""
  frozen = bool(mdef.cfg.frozen)
  accum = int(config.train.grad_accum_steps)
  inp = config.input
  on_device_ra = data_io.randaugment_on_device(config)
  normalize, randaugment = _data_fns()
  batch_axes = shd.BATCH_AXES

  def loss_fn(tparams, params, stats, videos, labels, key):
    model = mdef.merge(merge_trainable(params, tparams), stats)
    logits = model(videos, train=True, key=key)
    loss = cross_entropy(logits, labels).mean()
    new_stats = _pure(model)[1]
    correct = (jnp.argmax(logits, -1) == labels).sum(dtype=jnp.int32)
    return loss, (new_stats, correct)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_aug, k_model = jax.random.split(key)
    videos, labels = batch["video"], batch["label"]
    if on_device_ra:  # else the host pipeline augmented the whole frames
      videos = randaugment(k_aug, videos, magnitude=inp.magnitude, num_layers=inp.num_layers)
    videos = normalize(videos)
    params = state["params"]
    tparams = trainable(params, frozen)

    def micro(carry, xs):
      # Every microbatch's BatchNorm starts from the step's running statistics; their mean
      # over the microbatches is one update by the mean batch statistics, as one big batch
      # of replica_batch groups gives (not one momentum-0.1 update per microbatch).
      grads, stats_sum, loss_sum, correct_sum = carry
      mb_videos, mb_labels, j = xs
      (loss, (stats, correct)), g = grad_fn(tparams, params, state["batch_stats"], mb_videos,
                                            mb_labels, jax.random.fold_in(k_model, j))
      grads, stats_sum = jax.tree.map(jnp.add, (grads, stats_sum), (g, stats))
      return (grads, stats_sum, loss_sum + loss, correct_sum + correct), None

    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    carry = (zeros(tparams), zeros(state["batch_stats"]), jnp.zeros((), jnp.float32),
             jnp.zeros((), jnp.int32))
    if accum == 1:
      carry, _ = micro(carry, (videos, labels, 0))
    else:
      split = lambda x: _microbatches(x, accum, mesh, batch_axes)
      carry, _ = jax.lax.scan(micro, carry, (split(videos), split(labels), jnp.arange(accum)))
    grads, stats, loss_sum, correct = carry
    grads, stats = jax.tree.map(lambda x: x / accum, (grads, stats))
    updates, opt_state = tx.update(grads, state["opt_state"], tparams)
    new_params = merge_trainable(params, optax.apply_updates(tparams, updates))
    metrics = {"loss": loss_sum / accum,
               "top1": correct / labels.shape[0],
               "lr": schedule(step),
               "grad_norm": optax.tree.norm(grads)}
    new_state = {"step": step + 1, "params": new_params, "batch_stats": stats,
                 "opt_state": opt_state, "rng": state["rng"]}
    return new_state, metrics

  return train_step


def _microbatches(x, accum, mesh, batch_axes):
  """(B, ...) -> (A, B/A, ...): each batch shard's rows in A contiguous runs, microbatch j the
  j-th run of every shard. No cross-device traffic, and neighbouring rows stay in one
  microbatch, as on the upstream's GPU (SSv2's two samples of a video, when a run's length,
  B / (shards * A), is even)."""
  b, shards = x.shape[0], math.prod(mesh.shape[a] for a in batch_axes)
  y = x.reshape(shards, accum, b // (shards * accum), *x.shape[1:]).swapaxes(0, 1)
  y = y.reshape(accum, b // accum, *x.shape[1:])
  spec = P(None, batch_axes, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))


def _pure(model):
  from flax import nnx
  _, params, stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def make_eval_step(mdef):
  """eval_step(params, batch_stats, batch) -> {"correct", "loss", "count"} sums over valid rows."""
  normalize, _ = _data_fns()

  def eval_step(params, stats, batch):
    model = mdef.merge(params, stats)
    logits = model(normalize(batch["video"]), train=False)
    mask = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones(logits.shape[:1])
    labels = batch["label"]
    return {"correct": ((jnp.argmax(logits, -1) == labels) * mask).sum(),
            "loss": (cross_entropy(logits, labels) * mask).sum(),
            "count": mask.sum()}

  return eval_step


def batch_shardings(mesh: Mesh, batch_spec: dict) -> dict:
  """{name: NamedSharding} for a batch given {name: ndim}."""
  return {k: shd.batch_sharding(mesh, nd) for k, nd in batch_spec.items()}


def jit_train_step(train_step, state_shardings, batch_shards, mesh):
  rep = shd.replicated(mesh)
  return jax.jit(train_step, in_shardings=(state_shardings, batch_shards),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,))


def jit_eval_step(eval_step, param_shardings, stat_shardings, batch_shards, mesh):
  rep = shd.replicated(mesh)
  return jax.jit(eval_step, in_shardings=(param_shardings, stat_shardings, batch_shards),
                 out_shardings=rep)


class TrainSetup(NamedTuple):
  """A recipe's train step for a mesh, and what it is made of."""
  mdef: ModelDef
  tx: optax.GradientTransformation
  schedule: Callable
  shardings: dict        # of the train state
  batch_shardings: dict  # {"video", "label"}
  train_step: Any        # jitted; donates the state


def setup_training(config, cfg, mesh: Mesh, total_steps: int, steps_per_epoch: int) -> TrainSetup:
  """The jitted train step that train.py runs for `config` (model config `cfg`) on `mesh`:
  the recipe's optimiser and schedule, the state's shardings, the batch split over the mesh.
  AOT compilation and the throughput benchmark build theirs here too."""
  tx, schedule = make_optimizer(config.train, total_steps, steps_per_epoch)
  mdef = model_def(cfg, mesh, min_fsdp_size=config.mesh.get("min_fsdp_size", shd.MIN_FSDP_SIZE))
  shardings = state_shardings(mdef, tx, mesh, cfg.frozen)
  batch_shards = batch_shardings(mesh, {"video": 5, "label": 1})
  step = jit_train_step(make_train_step(mdef, tx, schedule, config, mesh), shardings,
                        batch_shards, mesh)
  return TrainSetup(mdef, tx, schedule, shardings, batch_shards, step)

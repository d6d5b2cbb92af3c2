"""Train-state checkpoints: Orbax CheckpointManager in WORKDIR/checkpoints.

Each checkpoint holds two items: `state` (the whole train state: params, batch stats,
optimiser state, step, RNG) and `meta` (JSON: step, data position, model config). Saves are
asynchronous; Orbax writes into a temporary directory and renames it only when complete,
so a half-written checkpoint (killed process) is never listed or restored. The last
`keep` checkpoints are kept, plus the one with the best validation top-1.
Restoring takes a target of ShapeDtypeStructs with shardings: the state lands on whatever
mesh the new run uses (another device count works).
"""

from __future__ import annotations

import copy
import functools
import os
import signal
import threading

import jax
import orbax.checkpoint as ocp

from uniformerv2_jax.training.state import abstract_state


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=max(int(keep), 1)),
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["top1"], reverse=False, n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> bool:
    """Starts an (async) save of `state` at `step`; returns False if it already exists."""
    if step in self.manager.all_steps():
      return False
    return self.manager.save(
        int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def restore(self, shapes, shardings, step: int | None = None):
    """(state, meta) of `step` (default: the latest), placed by `shardings`."""
    step = self.latest_step() if step is None else step
    target = abstract_state(shapes, shardings)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionWatcher:
  """Set by SIGTERM (single process) or by JAX's preemption notice (multi-host)."""

  def __init__(self):
    self._flag = threading.Event()
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self._flag.set()

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
      except RuntimeError:  # preemption service not running
        return False
    return self._flag.is_set()


# ---------------------------------------------------------------------------------------
# A training checkpoint read as a model (eval.py, init_from, `convert export|checkpoint`).

def step_directory(path: str) -> str | None:
  """`WORKDIR` or `WORKDIR/checkpoints` (the latest step), `WORKDIR/checkpoints/STEP` -> the step.

  None when `path` is neither. Only finished checkpoints count: Orbax writes a step under a
  temporary name and renames it to the bare step number when complete.
  """
  path = os.path.abspath(os.fspath(path))
  if all(os.path.isdir(os.path.join(path, item)) for item in ("state", "meta")):
    return path
  root = path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints")
  if not os.path.isdir(root):
    return None
  steps = [int(n) for n in os.listdir(root)
           if n.isdigit() and os.path.isdir(os.path.join(root, n, "state"))]
  if not steps:
    from uniformerv2_jax.checkpoint import CheckpointError
    raise CheckpointError(f"{path} is a training workdir without a finished checkpoint; wait "
                          "for the first save (train.checkpoint_every_steps) or name a step "
                          "directory, WORKDIR/checkpoints/STEP")
  return os.path.join(root, str(max(steps)))


def read_meta(step_dir: str) -> dict:
  """The `meta` item of a checkpoint: step, data position, model config, class names."""
  return copy.deepcopy(_read_meta(os.path.abspath(step_dir)))


@functools.lru_cache(maxsize=16)  # a finished step never changes; readers ask several times
def _read_meta(step_dir: str) -> dict:
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
    return ckptr.restore(os.path.join(step_dir, "meta"))


def restore_weights(step_dir: str) -> dict:
  """Params + batch stats of a checkpoint as one numpy tree, UNSCANNED (no optimiser state).

  Reads only those two parts of the state: a partial restore, on the host.
  """
  import numpy as np

  from uniformerv2_jax.config import ModelConfig
  from uniformerv2_jax.training.state import abstract_weights, unscanned_weights
  params, stats = abstract_weights(ModelConfig.from_dict(read_meta(step_dir)["model_config"]))
  item = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                      {"params": params, "batch_stats": stats})
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
  return unscanned_weights(out)

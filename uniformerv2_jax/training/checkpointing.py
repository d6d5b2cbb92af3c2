"""Train-state checkpoints: Orbax CheckpointManager in WORKDIR/checkpoints.

Each checkpoint holds two items: `state` (the whole train state: params, batch stats,
optimiser state, step, RNG) and `meta` (JSON: step, data position, model config). Saves are
asynchronous; Orbax finalises a step only when it is complete (locally a rename of its
temporary directory, on an object store a `commit_success.txt` written last), so a
half-written checkpoint (killed process) is never listed or restored. WORKDIR may be a
local path or a `gs://` URL. The last `keep` checkpoints are kept (at least two: the newest
is known good only once a later loss is finite, see training.loop), plus the one with the
best validation top-1.
Restoring takes a target of ShapeDtypeStructs with shardings: the state lands on whatever
mesh the new run uses (another device count works).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import sys
import threading

import jax
import orbax.checkpoint as ocp

from uniformerv2_jax import storage
from uniformerv2_jax.distributed import process_0_value
from uniformerv2_jax.training.state import abstract_state

MOVE_ASIDE = ("the step is damaged: move its folder out of checkpoints/ to use the step before "
              "(a training run then resumes from that one, or starts afresh if there is none)")


@dataclasses.dataclass
class KeepStep:
  """An Orbax preservation policy that keeps one step, set as the run goes: the best one as
  the training loop ranks them (also one evaluated only after a resume, whose save carried no
  metrics for Orbax's own BestN to rank)."""
  step: int | None = None

  def should_preserve(self, checkpoints, *, context=None):
    del context
    return [c.step == self.step for c in checkpoints]


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(storage.absolute(workdir), "checkpoints")
    self.step_bytes = 0  # of the last save: a full disk's message says it
    self.best = KeepStep()  # set by the loop: keep_best(step)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=max(int(keep), 2)), self.best])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def keep_best(self, step: int | None) -> None:
    """The step to keep beside the latest ones (applied at the next save)."""
    self.best.step = step

  def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> bool:
    """Starts an (async) save of `state` at `step`; returns False if it already exists."""
    if step in self.manager.all_steps():
      return False
    self.step_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    with self._disk_full_named():  # this save, or the previous one, written in the background
      return self.manager.save(
          int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True)

  @contextlib.contextmanager
  def _disk_full_named(self):
    """A save that ran out of space: one CheckpointError saying what to do, not Orbax's
    traceback. The steps finished before it are intact."""
    try:
      yield
    except Exception as e:  # noqa: BLE001  (Orbax re-raises a background failure as it likes)
      text = str(e)
      if not (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
              or "No space left on device" in text or "Disk quota exceeded" in text):
        raise
      from uniformerv2_jax.checkpoint import CheckpointError
      gib = self.step_bytes >= 2**30
      size = (f" (a step takes about {self.step_bytes / 2**(30 if gib else 20):.1f} "
              f"{'GiB' if gib else 'MiB'})" if self.step_bytes else "")
      raise CheckpointError(
          f"could not save a checkpoint in {self.directory}: no space left on the device{size}."
          " Free space or point --workdir at a larger disk, then rerun: the run resumes from "
          "its last finished step") from None

  def restore(self, shapes, shardings, step: int | None = None):
    """(state, meta) of `step` (default: the latest), placed by `shardings`."""
    from uniformerv2_jax.damaged_reads import damaged_files_reported
    step = self.latest_step() if step is None else step
    target = abstract_state(shapes, shardings)
    with damaged_files_reported(os.path.join(self.directory, str(step)), MOVE_ASIDE):
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def wait(self) -> None:
    with self._disk_full_named():
      self.manager.wait_until_finished()

  def set_aside(self, steps, destination: str) -> tuple[bool, str]:
    """Moves ``steps`` out of the checkpoint directory (into ``destination``), so that a rerun
    resumes from an earlier step: (moved?, a sentence saying what was done or what to do).
    Local disks only; in a bucket the sentence asks the user to move them."""
    steps = sorted(steps)
    if not steps:
      return False, ""
    if storage.is_url(self.directory):
      return False, (f" Steps {steps} were saved after the last finite loss and may hold the "
                     f"diverging weights: move them out of {self.directory} (e.g. to "
                     f"{destination}) before rerunning.")
    if jax.process_index() == 0:
      os.makedirs(destination, exist_ok=True)
      for step in steps:
        target, n = os.path.join(destination, str(step)), 1
        while os.path.exists(target):  # an earlier divergence set this step aside too
          target, n = os.path.join(destination, f"{step}-{n}"), n + 1
        os.rename(os.path.join(self.directory, str(step)), target)
    return True, (f" Steps {steps}, saved after the last finite loss, may hold the diverging "
                  f"weights: moved to {destination} (to resume from one, move it back into "
                  f"{self.directory} under its step number).")

  def close(self) -> None:
    self.wait()
    self.manager.close()


class PreemptionWatcher:
  """Set by SIGTERM or a first Ctrl-C (single process) or by JAX's preemption notice
  (multi-host). A context manager: the signal handlers live while the training loop runs."""

  def __init__(self):
    self._flag = threading.Event()
    self._multi = jax.process_count() > 1
    self._previous = {}

  def __enter__(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        if sig == signal.SIGINT and signal.getsignal(sig) is not signal.default_int_handler:
          continue  # Ctrl-C ignored (a background job) or handled by the caller: left so
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      if handler is not None:  # None: installed outside Python, cannot be put back
        signal.signal(sig, handler)
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
      signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
      print("Interrupted (Ctrl-C): the run saves after this step and stops; Ctrl-C again stops "
            "at once, losing the steps since the last checkpoint", file=sys.stderr, flush=True)
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

  None when `path` is neither. Only finished checkpoints count (Orbax's own test: a step
  renamed from its temporary name, or one with its commit marker on an object store).
  """
  path = storage.absolute(path)
  names = storage.listdir(path)
  named_step = (os.path.basename(path).isdigit() and storage.isdir(path)
                and os.path.basename(os.path.dirname(path)) == "checkpoints")
  if "state" in names or "meta" in names or named_step:  # a part missing: read as damaged
    if not ocp.utils.is_checkpoint_finalized(path):
      from uniformerv2_jax.checkpoint import CheckpointError
      raise CheckpointError(f"{path} is an unfinished checkpoint (its save is still running or "
                            "was interrupted, or it was copied without Orbax's commit_success.txt)"
                            "; name a finished step, WORKDIR/checkpoints/STEP")
    return path
  if os.path.basename(path) == "checkpoints" and storage.isdir(path):
    root = path
  elif "checkpoints" in names:
    root = os.path.join(path, "checkpoints")
  else:
    return None
  steps = [int(p.name) for p in ocp.utils.checkpoint_steps_paths(root) if p.name.isdigit()]
  # process 0's choice: a save landing between two hosts' listings must not make them restore
  # different steps into one model; and every host raises, or none
  latest = process_0_value(max(steps, default=-1))
  if latest < 0:
    from uniformerv2_jax.checkpoint import CheckpointError
    raise CheckpointError(f"{path} is a training workdir without a finished checkpoint; wait "
                          "for the first save (train.checkpoint_every_steps) or name a step "
                          "directory, WORKDIR/checkpoints/STEP")
  return os.path.join(root, str(latest))


def read_meta(step_dir: str) -> dict:
  """The `meta` item of a checkpoint: step, data position, model config, class names."""
  from uniformerv2_jax.checkpoint import CheckpointError
  path = os.path.join(storage.absolute(step_dir), "meta")
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
      meta = ckptr.restore(path)
  except (FileNotFoundError, ValueError) as e:  # missing, cut short, not JSON
    raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e}); {MOVE_ASIDE}") from None
  except Exception as e:  # noqa: BLE001  (no access, a network error: the step may be fine)
    raise CheckpointError(f"{path}: could not be read ({type(e).__name__}: {e}); check that it "
                          "can be read from here and retry") from None
  if not isinstance(meta, dict):
    raise CheckpointError(f"{path}: not a checkpoint's meta (a JSON object); {MOVE_ASIDE}")
  return meta


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
  from uniformerv2_jax.damaged_reads import damaged_files_reported
  with damaged_files_reported(step_dir, MOVE_ASIDE), ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
        item=item, restore_args=args, partial_restore=True))
  return unscanned_weights(out)

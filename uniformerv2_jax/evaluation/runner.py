"""The sharded eval step, the evaluation loop over host batches, and the result files.

Sharding. The batch is split over the mesh's ``data`` x ``fsdp`` axes, parameters follow their
logical axes (``sharding.state_shardings``). Each host feeds its own ``per_host_batch`` rows;
short batches are padded with masked rows; probabilities of every host come back to every host
(``process_allgather``) with video ids, view ids and masks, so each (video, view) is counted
exactly once whatever the device and host count, and a missing or duplicated view is an error.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from uniformerv2_jax import storage
from uniformerv2_jax.evaluation.metrics import EvalResult, ViewAccumulator, top_classes
from uniformerv2_jax.sharding import BATCH_AXES, batch_sharding, state_shardings


def _eval_step(graphdef, dtype, state, video):
  from uniformerv2_jax.data import normalize  # jnp; imported lazily (pulls no TensorFlow)
  model = nnx.merge(graphdef, state)
  logits = model(normalize(video).astype(dtype), train=False).astype(jnp.float32)
  return jax.nn.softmax(logits, axis=-1)


def put_global(x, sharding):
  """``x`` laid out as ``sharding``, also when ``x`` is a host-local copy on a multi-host mesh."""
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
    return x
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = put_global(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def global_batch_size(mesh: Mesh, per_device_batch: int) -> int:
  """Rows per step over the whole mesh (the batch is split over data x fsdp)."""
  return int(per_device_batch) * math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


class Evaluator:
  """Softmax probabilities (float32) of uint8 video batches: one jitted step for a mesh.

  Frames are normalised on device (``data.normalize``) and cast to ``model.config.dtype``.
  """

  def __init__(self, model: nnx.Module, mesh: Mesh):
    self.mesh = mesh
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    is_var = lambda x: isinstance(x, nnx.Variable)
    self.state = jax.tree.map(lambda v, sh: v.replace(put_global(v.get_value(), sh)), state,
                              shardings, is_leaf=is_var)
    dtype = jnp.dtype(model.config.dtype)
    self.num_classes = model.config.num_classes
    self._video_sharding = batch_sharding(mesh, 5)
    self._step = jax.jit(partial(_eval_step, graphdef, dtype),
                         in_shardings=(shardings, self._video_sharding),
                         out_shardings=batch_sharding(mesh, 2))

  @property
  def step(self):
    """The jitted step, (self.state, global uint8 video laid out over the mesh) -> probabilities
    (benchmarks time it on a batch already on the devices)."""
    return self._step

  @property
  def batch_divisor(self) -> int:
    """Each host's batch must be a multiple of this (its share of the data x fsdp devices)."""
    return max(1, global_batch_size(self.mesh, 1) // jax.process_count())

  def __call__(self, video: np.ndarray) -> np.ndarray:
    """Host-local uint8 (B, T, S, S, 3) -> host-local float32 probabilities (B, classes)."""
    return host_rows(self.dispatch(video))

  def dispatch(self, video: np.ndarray) -> jax.Array:
    """Starts the step on a host batch and returns at once (the global probabilities array);
    `host_rows` of it waits for the result."""
    video = np.asarray(video)
    if video.dtype != np.uint8:
      raise TypeError(f"Evaluator expects uint8 frames (normalised on device), got {video.dtype}")
    if len(video) % self.batch_divisor:
      raise ValueError(f"per-host batch {len(video)} is not a multiple of {self.batch_divisor} "
                       "(this host's data x fsdp devices); pad it with masked rows")
    x = jax.make_array_from_process_local_data(self._video_sharding, video)
    return self._step(self.state, x)


def host_rows(array: jax.Array) -> np.ndarray:
  """This host's rows of a batch-sharded global array, in the order
  ``make_array_from_process_local_data`` took them from the host (by global row; on a TPU
  torus a host's devices need not be one contiguous block of the mesh)."""
  shards = {s.index[0].start or 0: s for s in array.addressable_shards}
  return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pad every array of a host batch to ``size`` rows; padded rows get mask 0."""
  n = len(batch["video"])
  out = {k: np.asarray(v) for k, v in batch.items()}
  out["mask"] = out.get("mask", np.ones(n, bool)).astype(bool)
  if n == size:
    return out
  if n > size:
    raise ValueError(f"host batch of {n} rows exceeds per_host_batch={size}")
  return {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)]) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# The loop.


def _progress(done_views, num_views, total_views, start, log):
  elapsed = time.perf_counter() - start
  rate = done_views / num_views / max(elapsed, 1e-9)
  msg = f"eval: {done_views / num_views:.0f} videos ({done_views} views) {rate:.2f} videos/s"
  if total_views:
    eta = (total_views - done_views) / num_views / max(rate, 1e-9)
    msg += f", {100 * done_views / total_views:.0f}%, ETA {eta:.0f}s"
  log(msg)


def evaluate(evaluator: Evaluator, batches: Iterable[Mapping[str, np.ndarray]], *,
             num_views: int, per_host_batch: int, aggregate: str = "mean",
             total_views: int | None = None, log_every: int = 20,
             log: Callable[[str], Any] | None = None,
             complete_only: bool = False) -> EvalResult:
  """Run every host batch ({"video", "label", "video_id", "view", optional "mask"}) -> result.

  Every host must call this with the same number of batches (``data.eval_dataset`` ensures it).
  ``complete_only``: score the videos whose views all arrived and leave out the others (for
  batches cut short); otherwise a video missing a view is an error.
  """
  if log is None:
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if jax.process_index() == 0 else \
        (lambda m: None)
  acc = ViewAccumulator(num_views)
  start = time.perf_counter()
  keys = ("video_id", "label", "view", "mask")

  def collect(probs, batch, step):
    local = dict(probs=host_rows(probs), **{k: np.asarray(batch[k]) for k in keys})
    gathered = multihost_utils.process_allgather(local, tiled=True) \
        if jax.process_count() > 1 else local
    acc.add(gathered["probs"], gathered["video_id"], gathered["label"], gathered["view"],
            gathered["mask"])
    if log_every and step % log_every == 0:
      _progress(acc.views_seen, num_views, total_views, start, log)

  # One batch in flight: the device runs batch i+1 while the host fetches, gathers and
  # accumulates batch i (and reads the next input).
  pending = None
  for step, batch in enumerate(batches, 1):
    batch = pad_batch(batch, per_host_batch)
    running = (evaluator.dispatch(batch["video"]), batch, step)
    if pending is not None:
      collect(*pending)
    pending = running
  if pending is not None:
    collect(*pending)
  seconds = time.perf_counter() - start
  result = acc.result(aggregate, seconds, complete_only)
  log(f"eval: {len(result.video_ids)} videos x {num_views} view{'s' * (num_views != 1)} in "
      f"{seconds:.1f}s ({len(result.video_ids) / max(seconds, 1e-9):.2f} videos/s)")
  return result


def array_batches(videos: np.ndarray, labels: Sequence[int], per_host_batch: int, *,
                  video_ids: Sequence[int] | None = None, process_index: int = 0,
                  process_count: int = 1):
  """Host batches from in-memory views (N, V, T, S, S, 3): rows in (video, view) order, split
  round-robin by batch over hosts, same number of batches on every host (for tests/predict)."""
  videos = np.asarray(videos)
  n, v = videos.shape[:2]
  ids = np.arange(n) if video_ids is None else np.asarray(video_ids)
  rows = dict(video=videos.reshape(n * v, *videos.shape[2:]),
              label=np.repeat(np.asarray(labels), v), video_id=np.repeat(ids, v),
              view=np.tile(np.arange(v), n), mask=np.ones(n * v, bool))
  global_batch = per_host_batch * process_count
  for start in range(0, n * v, global_batch):
    lo = start + process_index * per_host_batch
    hi = min(lo + per_host_batch, n * v)
    part = {k: a[lo:hi] for k, a in rows.items()} if lo < n * v else \
        {k: a[:0] for k, a in rows.items()}
    yield pad_batch(part, per_host_batch)


# ----------------------------------------------------------------------------------------------
# Output files.


def video_records(result: EvalResult, *, top: int = 5, class_names: Sequence[str] | None = None,
                  video_names: Mapping[int, str] | None = None, save_scores: bool = False):
  """One JSON-able dict per video (see README, "Evaluation outputs")."""
  ids = top_classes(result.scores, top)
  for i, vid in enumerate(result.video_ids):
    rec = dict(video_id=int(vid), label=int(result.labels[i]), top=ids[i].tolist(),
               scores=[round(float(s), 6) for s in result.scores[i, ids[i]]])
    if video_names is not None and int(vid) in video_names:
      rec["video"] = video_names[int(vid)]
    if class_names is not None:
      rec["label_name"] = class_names[rec["label"]] if 0 <= rec["label"] < len(class_names) else None
      rec["top_names"] = [class_names[c] for c in rec["top"]]
    if save_scores:
      rec["all_scores"] = [float(s) for s in result.scores[i]]
    yield rec


def write_results(workdir: str, result: EvalResult, *, summary_extra: Mapping[str, Any] = (),
                  class_names=None, video_names=None, save_scores=False, top: int = 5) -> dict:
  """Write ``WORKDIR/results.jsonl`` and ``WORKDIR/summary.json`` (process 0); returns summary."""
  summary = dict(**result.metrics, num_videos=int(len(result.video_ids)),
                 num_views=int(result.num_views), aggregate=result.aggregate,
                 seconds=round(result.seconds, 2), **dict(summary_extra))
  if jax.process_index() != 0:
    return summary
  storage.makedirs(workdir)
  lines = (json.dumps(r) + "\n" for r in video_records(
      result, top=top, class_names=class_names, video_names=video_names, save_scores=save_scores))
  storage.write_text(os.path.join(workdir, "results.jsonl"), "".join(lines))
  storage.write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=1) + "\n")
  return summary

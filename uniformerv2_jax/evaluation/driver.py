"""``eval.py``: a model directory + a config -> multi-view metrics and result files.

The config follows the shared schema (``configs/common.py``): ``config.dataset`` picks the TFDS
dataset and split, ``config.input`` the clip length and crop size, ``config.eval`` the views
(``num_clips``, ``num_crops``, ``spatial``), ``per_device_batch``, ``head_map`` (read a
Kinetics-710 head as K400/K600/K700 without converting), ``match_class_names`` (score a head
that lists the dataset's classes in another order by name) and ``save_scores``; ``config.mesh`` the
device mesh; ``config.model`` may override speed knobs (dtype, scan_layers, remat, remat_blocks,
attention).
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any, Callable

import jax
import numpy as np

from uniformerv2_jax.evaluation.runner import (Evaluator, evaluate, global_batch_size,
                                               write_results)
from uniformerv2_jax.sharding import make_mesh

# config.model fields that may differ from the checkpoint's (they leave weight shapes alone).
SPEED_FIELDS = ("dtype", "scan_layers", "remat", "remat_blocks", "attention")


def reads_override(key: str) -> bool:
  """Whether eval.py reads the config field `key` ("dataset.data_dir", "model.width", ...):
  config.dataset, input, eval and mesh, and of config.model only its speed fields (the
  architecture comes from the checkpoint); not config.train or the initialisation."""
  section, _, field = key.partition(".")
  return section in ("dataset", "input", "eval", "mesh") or (
      section == "model" and field in SPEED_FIELDS)


def _get(cfg, key, default=None):
  try:
    value = cfg.get(key, default)
  except AttributeError:
    value = getattr(cfg, key, default)
  return default if value is None else value


def class_names_for(config, head_names, num_classes: int):
  """Names for the evaluated head: its own (``checkpoint.head_class_names``), else
  config.dataset's."""
  names = head_names
  if names is None and _get(config.dataset, "class_names"):
    from uniformerv2_jax.data.annotations import load_class_names
    names = list(load_class_names(config.dataset.class_names))
  return names if names is not None and len(names) == num_classes else None


def match_classes(head_names, data_names, checkpoint: str) -> np.ndarray | None:
  """Head row of each dataset class when the head lists the dataset's classes in another order.

  None when the orders agree, or either list is unknown, or the counts differ (load_model says
  so). Names match exactly or through the Kinetics aliases (`heads.aliases`); a head whose
  classes are not the dataset's is an error.
  """
  if (head_names is None or data_names is None or len(head_names) != len(data_names)
      or list(head_names) == list(data_names)):
    return None
  from uniformerv2_jax import heads
  try:
    rows = heads.index_map_from_names(head_names, data_names)
  except ValueError as e:
    differ = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(head_names, data_names))
              if a != b]
    raise EvalConfigError(
        f"{checkpoint}: the head's class names are not the dataset's ({e}; first "
        f"differences, head vs dataset: {differ[:3]}). Scores would be compared with the wrong "
        "labels. Give the checkpoint the class list its head was trained with (`python -m "
        "convert ... --class-names FILE`), set --config.eval.head_map, or, if only the wording "
        "differs and row i is class i, --config.eval.match_class_names=False.") from None
  return None if np.array_equal(rows, np.arange(len(rows))) else rows


def load_model(config, checkpoint: str, mesh, data_names=None, log=print,
               data_classes: int | None = None):
  """(model with its head's rows in the dataset's class order, class names, reordered?)."""
  from uniformerv2_jax.checkpoint import (head_class_names, head_rows, load_pretrained,
                                          read_config, resolve)
  checkpoint = resolve(checkpoint)  # a training run's latest step, fixed for every read
  overrides = {k: config.model[k] for k in SPEED_FIELDS if _get(config.model, k) is not None}
  overrides["t_size"] = int(config.input.clip_len)
  head_map = _get(config.eval, "head_map")
  stored = read_config(checkpoint)
  crop = int(config.input.crop_size)
  if crop != stored.input_resolution:
    raise EvalConfigError(f"{checkpoint} takes {stored.input_resolution}-pixel crops but "
                          f"config.input.crop_size is {crop}: use the config of its recipe, or "
                          f"--config.input.crop_size={stored.input_resolution}")
  if stored.t_size != overrides["t_size"] and jax.process_index() == 0:
    log(f"eval: note: {checkpoint} is set up for {stored.t_size}-frame clips (t_size in its "
        f"config); evaluating on {overrides['t_size']} (config.input.clip_len)")
  rows = None if head_map is None else head_rows(checkpoint, head_map)
  num_classes = len(rows) if rows is not None else stored.num_classes
  head_names = head_class_names(checkpoint, head_map)
  names = class_names_for(config, head_names, num_classes)
  order = None
  if _get(config.eval, "match_class_names", True):
    if head_map is None and data_names is not None and head_names is None:
      raise EvalConfigError(
          f"{checkpoint} does not name its head's classes (no class_names.txt), so evaluation "
          f"cannot check that head row i is the dataset's class i (the original repository's "
          "Kinetics heads, for one, list their classes in another order). Give it the class "
          "list its head was trained with (`python -m convert uniformerv2 ... --class-names "
          "FILE`; mmaction2's port of a Kinetics model converts with its names), or, if row i "
          "is the dataset's class i, pass --config.eval.match_class_names=False.")
    order = match_classes(names, data_names, checkpoint)
    if order is not None and jax.process_index() == 0:
      log(f"eval: {checkpoint} lists the dataset's {len(order)} classes in another order; its "
          "head rows are taken by class name (--config.eval.match_class_names=False: row i is "
          "class i)")
    if order is not None:
      rows, names = (order if rows is None else rows[order]), list(data_names)
  model = load_pretrained(checkpoint, mesh=mesh, head_map=None if rows is None else
                          [int(r) for r in rows], **overrides)
  have = model.config.num_classes
  hint = (" Set --config.eval.head_map=k400|k600|k700 to read a Kinetics-710 head." if have == 710
          else " Evaluate it on the dataset it was trained for.")
  # The dataset first: when it agrees with the model, the config's count is a recipe's leftover
  stale = (f" Dataset {config.dataset.name} has {have} too: pass "
           f"--config.dataset.num_classes={have}.")
  for what, want, fix in ((f"dataset {config.dataset.name} has", data_classes, hint),
                          ("config.dataset.num_classes is", _get(config.dataset, "num_classes"),
                           stale if data_classes == have else hint)):
    if want and have != want:
      raise EvalConfigError(f"{checkpoint}: the model has {have} classes but {what} {want}.{fix}")
  return model, names, order is not None


def _check_views(ev) -> None:
  """The views a config asks for, before any model is loaded."""
  from uniformerv2_jax.data.spatial import check_protocol
  try:
    check_protocol(_get(ev, "spatial", "mmaction2"), int(ev.num_crops))
  except ValueError as e:
    raise EvalConfigError(f"--config.eval.{e}") from None
  if int(ev.num_clips) < 1 or int(ev.per_device_batch) < 1:
    raise EvalConfigError(f"--config.eval.num_clips={ev.num_clips}, per_device_batch="
                          f"{ev.per_device_batch}: each must be at least 1")


class EvalConfigError(ValueError):
  """The config and the checkpoint/dataset do not fit together."""


def video_names(builder, split: str, ids, num_threads: int = 16) -> dict[int, str]:
  """{index in split: the video's name as its annotation gave it} (reads those records)."""
  import concurrent.futures
  import tensorflow as tf
  import tensorflow_datasets as tfds
  source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)

  def name(i):  # parse the record's Example without decoding the frames
    example = tf.train.Example.FromString(source[int(i)])
    return int(i), example.features.feature["name"].bytes_list.value[0].decode()

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    return dict(pool.map(name, ids))


def evaluate_checkpoint(config, checkpoint: str, workdir: str | None = None, *,
                        builder=None, max_batches: int | None = None,
                        log: Callable[[str], Any] | None = None) -> dict:
  """Evaluate ``checkpoint`` on ``config.dataset.eval_split``; returns the summary dict.

  ``builder``: the TFDS builder (default: from ``config.dataset`` as train.py finds it).
  Writes ``WORKDIR/results.jsonl`` and ``WORKDIR/summary.json`` when ``workdir`` is given.
  ``max_batches``: stop after that many batches per host (a smoke run): only the videos whose
  views all arrived are scored, and the summary records ``max_batches``.
  """
  from uniformerv2_jax import storage
  from uniformerv2_jax.training.data_io import FAKE
  _check_views(config.eval)
  if builder is None and config.dataset.name == FAKE:
    raise EvalConfigError(f"config.dataset.name={FAKE}: random clips (for training benchmarks "
                          "and tests) have no videos to score; evaluate on a built dataset "
                          "(--config.dataset.name=NAME --config.dataset.data_dir=DIR)")
  created = []  # the folders this evaluation creates, deepest first
  if workdir is not None:
    workdir = storage.absolute(workdir)
    if jax.process_index() == 0 and not storage.is_url(workdir):
      folder = workdir
      while folder != os.path.dirname(folder) and not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    try:  # before the evaluation, not after it
      storage.ensure_writable_by_process_0(workdir)
    except PermissionError as e:
      raise EvalConfigError(f"--workdir {e}") from None
  try:
    return _evaluate(config, checkpoint, workdir, builder, max_batches, log)
  except BaseException:
    for folder in created:  # a failed evaluation leaves no empty output folders behind
      if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)
    raise


def _evaluate(config, checkpoint, workdir, builder, max_batches, log) -> dict:
  from uniformerv2_jax import data
  from uniformerv2_jax.checkpoint import read_config, resolve
  from uniformerv2_jax.training.data_io import class_names as dataset_class_names
  from uniformerv2_jax.training.data_io import (check_readable, frame_notes, num_classes,
                                                stored_short_side)
  _log = log or (lambda m: print(m, file=sys.stderr, flush=True))
  ev = config.eval
  mesh = make_mesh(dict(config.mesh))
  try:
    if builder is None:
      from uniformerv2_jax.training.data_io import source
      builder = source(config)
    builder = data.load_builder(builder)
    check_readable(builder, config.dataset.eval_split)
  except ValueError as e:
    raise EvalConfigError(f"config.dataset: {e}") from None
  checkpoint = resolve(checkpoint)  # the step scored is the step the summary names
  model_t_size = read_config(checkpoint).t_size
  model, names, by_name = load_model(config, checkpoint, mesh, dataset_class_names(builder), _log,
                                     data_classes=num_classes(builder))
  spatial = _get(ev, "spatial", "mmaction2")
  for note in frame_notes(config, builder, "eval") if jax.process_index() == 0 else ():
    _log(note)
  num_clips, num_crops = int(ev.num_clips), int(ev.num_crops)
  num_views = num_clips * num_crops
  per_host = global_batch_size(mesh, int(ev.per_device_batch)) // jax.process_count()
  split = config.dataset.eval_split
  num_videos = builder.info.splits[split].num_examples
  ds = data.eval_dataset(builder, split, clip_len=int(config.input.clip_len),
                         crop_size=int(config.input.crop_size), num_clips=num_clips,
                         num_crops=num_crops, per_host_batch=per_host,
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         spatial=spatial)
  batches = itertools.islice(data.numpy_batches(ds), max_batches)  # None: all
  aggregate = "sum" if spatial == "original" else "mean"  # each upstream's own (same ranking)
  try:
    result = evaluate(Evaluator(model, mesh), batches, num_views=num_views,
                      per_host_batch=per_host, aggregate=aggregate,
                      total_views=num_videos * num_views, log=log,
                      complete_only=max_batches is not None)
  except data.DamagedDataError as e:  # one line naming the file; nothing written yet
    raise EvalConfigError(f"config.dataset: {e}") from None
  if max_batches is None and len(result.video_ids) != num_videos:
    raise RuntimeError(f"evaluated {len(result.video_ids)} videos but {split} has {num_videos}")
  if not len(result.video_ids):
    raise EvalConfigError(f"max_batches={max_batches}: no video got all its {num_views} views "
                          f"in that many batches of {per_host}; raise it")
  protocol = dict(num_clips=num_clips, num_crops=num_crops, spatial=spatial, aggregate=aggregate,
                  clip_len=int(config.input.clip_len), crop_size=int(config.input.crop_size),
                  model_t_size=model_t_size, stored_short_side=stored_short_side(builder),
                  dtype=str(model.config.dtype), attention=_attention(model.config))
  extra = dict(checkpoint=checkpoint, dataset=config.dataset.name, split=split,
               head_map=_get(ev, "head_map"), head_rows_by_class_name=by_name,
               protocol=protocol, devices=jax.device_count(),
               processes=jax.process_count(),
               skipped_videos=data.skipped_videos(builder, split))
  if max_batches is not None:  # a smoke run: say so wherever its numbers go
    extra["max_batches"] = max_batches
  if workdir is None:
    return dict(result.metrics, num_videos=len(result.video_ids), num_views=num_views, **extra)
  vnames = video_names(builder, split, result.video_ids) if jax.process_index() == 0 else None
  summary = write_results(workdir, result, summary_extra=extra, class_names=names,
                          video_names=vnames, save_scores=bool(_get(ev, "save_scores", False)))
  if jax.process_index() == 0:
    skipped = extra["skipped_videos"]
    _log(f"eval: top1 {summary['top1']:.4f} top5 {summary['top5']:.4f} mean class accuracy "
         f"{summary['mean_class_accuracy']:.4f} over {len(result.video_ids)} videos"
         + (f" ({skipped} unreadable at build time left out, listed in skipped-{split}.tsv "
            "beside the dataset)" if skipped else "")
         + f" -> {os.path.join(workdir, 'summary.json')}")
  return summary


def _attention(cfg) -> str:
  """The backbone's attention as it ran ("auto" resolved)."""
  from uniformerv2_jax.layers import attention_impl
  return attention_impl(cfg.attention, cfg.dtype, cfg.width // cfg.heads)

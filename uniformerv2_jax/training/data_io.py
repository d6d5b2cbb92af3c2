"""Where batches come from: the TFDS video pipeline, or `fake` in-memory data.

Every process reads its own shard (per-host batch = global / process_count) and the
loop turns the per-host numpy batches into global arrays sharded over data x fsdp.
`dataset.name = "fake"` yields deterministic random uint8 clips (benchmarks, sharding tests).
"""

from __future__ import annotations

import os
from typing import Iterator

import jax
import numpy as np

from uniformerv2_jax import sharding as shd
from uniformerv2_jax import storage

FAKE = "fake"


def dataset_dir(config) -> str:
  d = config.dataset
  return os.path.join(os.fspath(d.data_dir), d.builder, d.name)


def source(config):
  """A built TFDS builder for config.dataset (the synthetic one is built when missing)."""
  d = config.dataset
  from uniformerv2_jax import data
  if d.name == "synthetic":
    from uniformerv2_jax.distributed import on_process_0

    def prepare():
      try:
        return data.prepare_synthetic_dataset(
            d.data_dir, d.num_train, d.num_val, size=d.synthetic_size,
            num_frames=d.synthetic_frames, radius=tuple(d.synthetic_radius),
            speed=tuple(d.synthetic_speed)).builder
      except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise ValueError(f"data_dir {d.data_dir}: cannot build the synthetic dataset there "
                         f"({e.strerror or e}{where}); give a folder with room that this "
                         "machine can write: --config.dataset.data_dir=FOLDER") from None
    # Process 0 renders and builds it first: on a shared disk the others then find it built
    # (they raced to write the same files); on disks of their own each builds its copy.
    builder = on_process_0(prepare, ValueError(
        f"{d.data_dir}: process 0 could not build the synthetic dataset (its log says why)"))
    return prepare() if builder is None else builder
  try:
    return data.load_builder(dataset_dir(config))
  except ValueError as e:
    raise ValueError(f"{e}{_built_variants(config)}") from None


def _built_variants(config) -> str:
  """A hint naming the datasets built from the same lists with other frame settings
  (`kinetics400_short336`, ...), which data.build names apart."""
  d = config.dataset
  parent = os.path.join(os.fspath(d.data_dir), d.builder)
  try:
    names = sorted(n for n in storage.listdir(parent) if n.startswith(f"{d.name}_"))
  except OSError:
    return ""
  return (f". Built there under other names: {', '.join(names[:5])} (pass "
          "--config.dataset.name=NAME to use one)") if names else ""


def check_readable(builder, *splits: str) -> None:
  """Opens every file of the splits (their footers), so that a missing or cut-short file stops
  the job with its name before anything is compiled or written; nothing without a builder."""
  from uniformerv2_jax import data
  if builder is not None:
    for split in splits:
      data.StoredVideos(builder, split)


def num_classes(builder) -> int | None:
  """The size of the dataset's label space (None without a builder)."""
  return None if builder is None else int(builder.info.features["label"].num_classes)


def randaugment_on_device(config) -> bool:
  """RandAugment in the train step (``crops``, and the fake data, which has no host pipeline)
  rather than on the host's whole frames (``frames``)."""
  inp = config.input
  return bool(inp.randaugment) and (inp.randaugment_on == "crops"
                                    or config.dataset.name == FAKE)


def check_classes(config, builder) -> None:
  """The head has one row per class of the dataset: a label past the head makes the loss NaN,
  and rows no label reaches make a model that eval.py refuses for this dataset."""
  have, want = num_classes(builder), config.model.num_classes
  if have is not None and have != want:
    from uniformerv2_jax.training.config_check import ConfigError
    raise ConfigError(
        f"dataset {config.dataset.name} ({builder.data_dir}) has {have} classes (labels 0.."
        f"{have - 1}) but config.model.num_classes={want}; set --config.model.num_classes={have}"
        f" --config.dataset.num_classes={have}, or point config.dataset at the dataset this "
        "recipe is for")


def class_names(builder) -> list[str] | None:
  """The dataset's label names (checkpoints record them: evaluation checks the class order)."""
  label = builder.info.features["label"] if builder is not None else None
  names = list(getattr(label, "names", None) or [])
  return names if names and names != [str(i) for i in range(len(names))] else None


def stored_short_side(builder) -> int | None:
  """The short side the build brought larger videos' frames down to (a cap: smaller videos
  keep their size; None: every video at its source size)."""
  return None if builder is None else (builder.info.metadata or {}).get("short_side")


def upscale_note(config, builder, tool: str) -> str | None:
  """A note when the build's short side is below the crop size (the @336 recipes on a dataset
  built at the default 320): the upstream takes those crops from the larger source. A video
  smaller than the crop is upscaled from its source size as in the upstream, and not noted."""
  short, crop = stored_short_side(builder), int(config.input.crop_size)
  if not short or short >= crop:
    return None
  views = "views are" if tool == "eval" else "crops are"
  return (f"{tool}: note: the frames are stored at short side {short}, so the {crop}-pixel "
          f"{views} upscaled from them (the upstream takes them from the source video); "
          f"rebuild with data.build --short_side {crop} or --keep_size to match it, and set "
          "--config.dataset.name to the dataset it names")


def frame_notes(config, builder, tool: str) -> list[str]:
  """Notes on how the dataset's frames were stored: upscaled crops (`upscale_note`), and a
  dataset built before frames were stored as the upstream's decoder gives them."""
  notes = [upscale_note(config, builder, tool)]
  if builder is not None and "frames" not in (builder.info.metadata or {}):
    notes.append(f"{tool}: note: {builder.data_dir} was built by an earlier data.build, whose "
                 "frames are not the upstream's: green about 2 grey levels high, and videos "
                 "below the short side enlarged to it; rebuild it (data.build ... --overwrite) "
                 "to match the upstream's input")
  return [n for n in notes if n]


def steps_per_epoch(config, builder, per_host: int) -> int:
  """Train steps per epoch (every host reads n / process_count videos)."""
  n = split_size(config, builder, config.dataset.train_split)
  if config.dataset.name == FAKE:
    return max(n // config.train.global_batch_size, 1)
  from uniformerv2_jax import data
  return max(data.steps_per_epoch(n, per_host, config.input.num_samples, jax.process_count()), 1)


def split_size(config, builder, split: str) -> int:
  if config.dataset.name == FAKE:
    return config.dataset.num_train if split == config.dataset.train_split else config.dataset.num_val
  return int(builder.info.splits[split].num_examples)


def _fake_batch(config, seed: int, index: int, per_host: int, process_index: int, train: bool):
  """Deterministic in (seed, batch index, process): the same rows whatever the device count."""
  rng = np.random.default_rng([seed, index, process_index, int(train)])
  s, t = config.input.crop_size, config.input.clip_len
  return {"video": rng.integers(0, 256, (per_host, t, s, s, 3), dtype=np.uint8),
          "label": rng.integers(0, config.dataset.num_classes, (per_host,), dtype=np.int32)}


def train_batches(config, builder, per_host: int, start_step: int) -> Iterator[dict]:
  """Infinite per-host numpy batches, starting after `start_step` consumed batches."""
  pi, pc = jax.process_index(), jax.process_count()
  if config.dataset.name == FAKE:
    def gen():
      i = start_step
      while True:
        yield _fake_batch(config, config.train.seed, i, per_host, pi, True)
        i += 1
    return gen()
  from uniformerv2_jax import data
  inp = config.input
  ds = data.train_dataset(builder, config.dataset.train_split, clip_len=inp.clip_len,
                          crop_size=inp.crop_size, per_host_batch=per_host,
                          seed=config.train.seed, flip=inp.flip, num_samples=inp.num_samples,
                          process_index=pi, process_count=pc, start_step=start_step,
                          area_range=tuple(inp.crop_area), ratio_range=tuple(inp.crop_ratio),
                          randaugment=inp.randaugment and not randaugment_on_device(config),
                          randaugment_magnitude=inp.magnitude, randaugment_layers=inp.num_layers,
                          randaugment_compiled=inp.randaugment_compiled)
  return ({"video": b["video"], "label": b["label"]} for b in _batches(ds))


def _batches(ds):
  """The dataset's numpy batches; a damaged stored record stops the job with one line."""
  from uniformerv2_jax import data
  from uniformerv2_jax.training.config_check import ConfigError
  try:
    yield from data.numpy_batches(ds)
  except data.DamagedDataError as e:
    raise ConfigError(f"config.dataset: {e}") from None


def eval_batches(config, builder, per_host: int) -> Iterator[dict]:
  """Finite single-view validation batches (same count on every host), with `mask`."""
  pi, pc = jax.process_index(), jax.process_count()
  limit = config.train.max_eval_batches
  if config.dataset.name == FAKE:
    total = config.dataset.num_val
    n = -(-total // (per_host * pc))
    for i in range(n if limit is None else min(n, limit)):
      b = _fake_batch(config, config.train.seed, i, per_host, pi, False)
      first = (i * pc + pi) * per_host  # global row index: rows past num_val are padding
      b["mask"] = np.arange(first, first + per_host) < total
      yield b
    return
  from uniformerv2_jax import data
  inp = config.input
  ds = data.eval_dataset(builder, config.dataset.eval_split, clip_len=inp.clip_len,
                         crop_size=inp.crop_size, num_clips=1, num_crops=1,
                         per_host_batch=per_host, process_index=pi, process_count=pc,
                         spatial=config.eval.spatial)
  for i, b in enumerate(_batches(ds)):
    if limit is not None and i >= limit:
      return
    yield {"video": b["video"], "label": b["label"], "mask": b["mask"]}


def to_global(batch: dict, mesh) -> dict:
  """Per-host numpy batch -> global jax arrays sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(shd.batch_sharding(mesh, np.ndim(v)),
                                                    np.asarray(v))
          for k, v in batch.items()}

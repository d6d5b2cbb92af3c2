"""TFDS builder for video classification: one generic builder, named configs per dataset.

Frames are decoded with PyAV at build time, resized to a short side (default 320), dropped to
the frame rate (default: the source rate capped at 30 fps) and stored as JPEG. One example per
video (``name``, ``label``, ``fps``, ``num_frames``) in ArrayRecord files (random access: exact
per-epoch shuffles and cheap resumption). The frames are either inside each example (``video``,
a TFDS Video feature; the default) or, with ``frame_store=True`` (the named Kinetics/SSv2/MiT
configs), in sidecar ArrayRecord files of one frame a record, so training reads only the frames
it samples (~0.2 MB a clip instead of the whole ~6 MB video). Unreadable videos are skipped and
listed in ``skipped-<split>.tsv`` beside the dataset.

From Python::

    from uniformerv2_jax.data.builder import VideoConfig, build_dataset
    cfg = VideoConfig(name="mine", annotations={"train": "/d/train.txt"},
                      video_roots={"train": "/d/videos"}, class_names="/d/classes.txt")
    builder = build_dataset("/data/tfds", cfg)

From the shell: ``python -m uniformerv2_jax.data.build --config kinetics400 --manual_dir
/data/kinetics400 --data_dir /data/tfds`` (see build.py); TFDS's ``tfds build
video_classification --imports uniformerv2_jax.data.builder ...`` drives the same builder where
that command starts (it needs apache-beam installed).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import sys
import tempfile
from concurrent import futures
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core import utils as tfds_utils

from . import annotations as ann
from .synthetic import SYNTHETIC_CLASSES
from .video_io import jpeg_frames_task

__all__ = ["VideoConfig", "VideoClassification", "build_dataset", "NAMED_CONFIGS"]


@dataclasses.dataclass(eq=False)
class VideoConfig(tfds.core.BuilderConfig):
  """Where the videos and annotations are and how frames are stored.

  Relative paths are taken inside ``manual_dir``. ``layout`` picks the annotation reader:
  ``"list"`` (mmaction2 ``path label`` or ``path,label`` CSV), ``"ssv2"`` (JSON),
  ``"kinetics710"`` (union of ``kinetics{400,600,700}/`` in manual_dir).
  """
  layout: str = "list"
  annotations: dict = dataclasses.field(default_factory=dict)   # split -> annotation file
  video_roots: dict = dataclasses.field(default_factory=dict)   # split -> folder of videos
  class_names: Any = None       # class-name file, packaged name ("k400", ...) or list
  short_side: int | None = 320  # None keeps the source size
  fps: float | None = None      # None: source rate (capped at max_fps)
  max_fps: float | None = 30.0
  jpeg_quality: int = 85        # libjpeg quality of the stored frames, 1 .. 95
  flip: bool = True             # horizontal flip keeps labels valid (False for SSv2)
  frame_store: bool = False     # frames in a sidecar ArrayRecord store, one record a frame
  on_unknown_label: str = "error"   # or "skip" (listed in the skip report)


class _TfdsNoise(logging.Filter):
  """TFDS logs a warning that dumps the whole config for every config it does not list
  (your own lists, a named config's derived name): here that is the normal case. And its
  Video feature reads its own deprecated `FeatureConnector.dtype` when it writes the
  dataset's info: nothing a user of this package can change."""

  def filter(self, record):
    return not str(record.msg).startswith(("Using custom data configuration",
                                           "`FeatureConnector.dtype` is deprecated"))


logging.getLogger("absl").addFilter(_TfdsNoise())


def _kinetics(n: int) -> VideoConfig:
  return VideoConfig(
      name=f"kinetics{n}", description=f"Kinetics-{n}, mmaction2 layout in manual_dir",
      annotations={"train": f"kinetics{n}_train_list_videos.txt",
                   "validation": f"kinetics{n}_val_list_videos.txt"},
      video_roots={"train": "videos_train", "validation": "videos_val"},
      class_names=f"k{n}", frame_store=True)


NAMED_CONFIGS = [
    _kinetics(400), _kinetics(600), _kinetics(700),
    VideoConfig(name="kinetics710", layout="kinetics710", class_names="k710", frame_store=True,
                description="K400+K600+K700 train sets, de-duplicated by YouTube id, held-out ids "
                            "removed, labels mapped to 710 classes; manual_dir holds kinetics400/, "
                            "kinetics600/, kinetics700/ in the kinetics<N> layout"),
    VideoConfig(name="ssv2", layout="ssv2", class_names="sthv2", flip=False, frame_store=True,
                description="Something-Something V2: JSON annotations, webm videos",
                annotations={"train": "something-something-v2-train.json",
                             "validation": "something-something-v2-validation.json"},
                video_roots={"train": "20bn-something-something-v2",
                             "validation": "20bn-something-something-v2"}),
    VideoConfig(name="mit", class_names="mit", frame_store=True,
                description="Moments in Time v1, mmaction2 lists",
                annotations={"train": "mit_train_list_videos.txt",
                             "validation": "mit_val_list_videos.txt"},
                video_roots={"train": "videos/training", "validation": "videos/validation"}),
    VideoConfig(name="synthetic", class_names=list(SYNTHETIC_CLASSES), short_side=None, flip=False,
                description="moving shapes from uniformerv2_jax.data.synthetic",
                annotations={"train": "train_list.txt", "validation": "val_list.txt"},
                video_roots={"train": "videos", "validation": "videos"}),
]


def _resolve(path, manual_dir):
  path = os.fspath(path)
  if os.path.isabs(path):
    return path
  if manual_dir is None:
    raise ValueError(f"relative path {path!r} in the config needs a manual_dir "
                     "(tfds build --manual_dir=... or build_dataset(manual_dir=...))")
  return os.path.join(os.fspath(manual_dir), path)


def _kinetics710_splits(cfg: VideoConfig, manual_dir):
  """{split: (entries, skipped)} of the K710 recipe (see label_maps/README.md)."""
  splits = {"train": [], "validation": []}
  heldout, skipped, no_test_list = set(), {"train": [], "validation": []}, []
  for n in (400, 600, 700):
    src, names, idx = _kinetics(n), ann.load_class_names(f"k{n}"), ann.load_index_map(f"k{n}")
    root = os.path.join(os.fspath(manual_dir), f"kinetics{n}")
    for split in ("train", "validation"):
      entries, skip = ann.parse_list(
          os.path.join(root, src.annotations[split]), names,
          os.path.join(root, src.video_roots[split]), label_map=idx,
          on_unknown=cfg.on_unknown_label)
      splits[split].append(entries)
      skipped[split] += skip
    # every validation video is held out, those skipped for an unknown label too
    heldout |= {ann.kinetics_id(e.name) for e in splits["validation"][-1]}
    heldout |= {ann.kinetics_id(name) for name, _ in skipped["validation"]}
    test_list = os.path.join(root, f"kinetics{n}_test_list_videos.txt")
    if os.path.isfile(test_list):
      heldout |= ann.read_ids(test_list)
    else:
      no_test_list.append(test_list)
  if no_test_list:
    print(f"kinetics710: warning: no {', '.join(no_test_list)}; the training union keeps "
          "those test sets' YouTube ids (the recipe removes them). Put each test list there "
          "(an mmaction2 list, or the official CSV with a youtube_id column) and rebuild with "
          "--overwrite to match the recipe", file=sys.stderr)
  train, dropped = ann.kinetics710_entries(splits["train"], heldout)
  print(f"kinetics710: train union keeps {len(train)} videos ({dropped['duplicate']} duplicate "
        f"and {dropped['heldout']} held-out YouTube ids removed)", file=sys.stderr)
  val, _ = ann.kinetics710_entries(splits["validation"], set())
  return {"train": (train, skipped["train"]), "validation": (val, skipped["validation"])}


def split_entries(cfg: VideoConfig, manual_dir=None) -> dict:
  """{split: (entries, skipped)} for a config; parses every annotation before decoding."""
  if cfg.layout == "kinetics710":
    return _kinetics710_splits(cfg, manual_dir)
  names = ann.load_class_names(cfg.class_names)
  out = {}
  for split, path in cfg.annotations.items():
    root = _resolve(cfg.video_roots.get(split, ""), manual_dir)
    path = _resolve(path, manual_dir)
    if cfg.layout == "ssv2":
      out[split] = ann.parse_ssv2_json(path, names, root, on_unknown=cfg.on_unknown_label)
    elif cfg.layout == "list":
      out[split] = ann.parse_list(path, names, root, on_unknown=cfg.on_unknown_label)
    else:
      raise ValueError(f"config {cfg.name}: unknown layout {cfg.layout!r}")
  return out


def needs_manual_dir(cfg: VideoConfig) -> bool:
  """Whether the config names its files relative to a manual_dir (the named configs do)."""
  return cfg.layout == "kinetics710" or any(
      not os.path.isabs(os.fspath(p))
      for p in [*cfg.annotations.values(), *cfg.video_roots.values()])


class BuildError(ValueError):
  """A dataset that cannot be built from what was given; the message says what to fix."""


class VideoClassification(tfds.core.GeneratorBasedBuilder):
  """Video classification from local files (nothing is downloaded)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "JPEG frames, short side 320 (configurable), <= 30 fps."}
  BUILDER_CONFIGS = NAMED_CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the videos and annotations in manual_dir as the " \
                                 "chosen config describes (see builder.py)."

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS derives this through `importlib_resources`, which it does not install.
    return epath.Path(__file__)

  def __init__(self, *, file_format=None, num_workers: int | None = None, **kwargs):
    self._num_workers = os.cpu_count() if num_workers is None else num_workers
    super().__init__(file_format=file_format or "array_record", **kwargs)

  # TFDS's own lines say "Downloading and preparing dataset Unknown size ...": say what
  # happens instead (TFDS calls these two around the build; its own output otherwise).
  def _log_download_bytes(self) -> None:
    print(f"Building {self.name}/{self.builder_config.name} in {self.data_dir} from local "
          "videos (nothing is downloaded)", flush=True)

  def _log_download_done(self) -> None:
    print(f"Built {self.name}/{self.builder_config.name} in {self.data_dir}", flush=True)

  def _download_and_prepare(self, dl_manager, download_config=None):
    with _uncompressed_array_record():
      return super()._download_and_prepare(dl_manager, download_config)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    features = {
        "label": tfds.features.ClassLabel(names=ann.load_class_names(cfg.class_names)),
        "name": tfds.features.Text(),
        "fps": tfds.features.Scalar(dtype=np.float32),
        "num_frames": tfds.features.Scalar(dtype=np.int32),
    }
    if cfg.frame_store:
      features["first_frame"] = tfds.features.Scalar(dtype=np.int64)
    else:
      features["video"] = tfds.features.Video(shape=(None, None, None, 3),
                                              encoding_format="jpeg")
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        supervised_keys=None if cfg.frame_store else ("video", "label"),
        # frames: how they were stored (train/eval note datasets built before "rgb24")
        metadata=tfds.core.MetadataDict(flip=cfg.flip, short_side=cfg.short_side,
                                        frames="rgb24", jpeg_quality=cfg.jpeg_quality),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    manual_dir = dl_manager.manual_dir if needs_manual_dir(cfg) else None
    return {split: self._generate_examples(split, entries, skipped)
            for split, (entries, skipped) in split_entries(cfg, manual_dir).items()}

  def _generate_examples(self, split, entries, skipped):
    cfg = self.builder_config
    opts = dict(short_side=cfg.short_side, fps=cfg.fps, max_fps=cfg.max_fps,
                quality=cfg.jpeg_quality, threads=1 if self._num_workers > 1 else 0)
    tasks = [(f"{i:09d}", e.path, e.name, e.label, opts) for i, e in enumerate(entries)]
    skipped, written = list(skipped), 0
    store = _FrameStore(self.data_dir, split) if cfg.frame_store else None
    for key, name, label, result in _map(jpeg_frames_task, tasks, self._num_workers):
      if isinstance(result, str):
        skipped.append((name, result))
        continue
      jpegs, fps = result
      written += 1
      example = {"label": label, "name": name, "fps": fps, "num_frames": len(jpegs)}
      if store is None:
        example["video"] = jpegs
      else:
        example["first_frame"] = store.add(jpegs)
      yield key, example
    if store is not None:
      self.info.metadata[f"frame_files_{split}"] = store.close()
    if written == 0 and skipped:
      shown = "; ".join(f"{n}: {' '.join(str(r).split())}" for n, r in skipped[:3])
      raise BuildError(f"{split}: none of its {len(skipped)} videos could be read (first: "
                       f"{shown}); check the video root (--video_root / --manual_dir) "
                       "and the paths in the annotations")
    self._write_report(split, written, skipped)

  def _write_report(self, split, written, skipped):
    path = os.path.join(os.fspath(self.data_dir), f"skipped-{split}.tsv")
    with open(path, "w", encoding="utf-8") as f:
      f.write("video\treason\n")
      f.writelines(f"{n}\t{' '.join(str(r).split())}\n" for n, r in skipped)
    self.info.metadata[f"skipped_{split}"] = len(skipped)
    print(f"{self.name}/{self.builder_config.name} {split}: wrote {written} videos, skipped "
          f"{len(skipped)} (listed in skipped-{split}.tsv beside the dataset)", file=sys.stderr)


def skipped_videos(builder, split: str) -> int:
  """How many of ``split``'s videos the build could not read (its skipped-SPLIT.tsv lists
  them); ``builder``: this module's builder or one read back from its directory."""
  return int((builder.info.metadata or {}).get(f"skipped_{split}", 0) or 0)


class _FrameStore:
  """Sidecar ArrayRecord files ``frames-<split>.array_record-NNNNN``: one JPEG a record, in
  write order; a video's example keeps ``first_frame``, its index in this store. Training then
  reads only the frames it samples instead of the whole video."""

  FRAMES_PER_FILE = 100_000  # ~2.5 GB at short side 320

  def __init__(self, data_dir, split: str):
    self.data_dir, self.split = os.fspath(data_dir), split
    self.files, self.count, self.writer = [], 0, None

  def add(self, jpegs) -> int:
    first = self.count
    for jpeg in jpegs:
      if self.count % self.FRAMES_PER_FILE == 0:
        self._next_file()
      self.writer.write(jpeg)
      self.count += 1
    return first

  def _next_file(self):
    if self.writer is not None:
      self.writer.close()
    self.files.append(f"frames-{self.split}.array_record-{len(self.files):05d}")
    self.writer = array_record_module.ArrayRecordWriter(
        os.path.join(self.data_dir, self.files[-1]), "group_size:1,uncompressed")

  def close(self) -> list[str]:
    if self.writer is not None:
      self.writer.close()
    return self.files


@contextlib.contextmanager
def _uncompressed_array_record():
  """Write ArrayRecord files uncompressed while this builder prepares.

  TFDS always writes them with ArrayRecord's default (brotli) compression, which cannot shrink
  JPEG data but made every read of a video cost ~10 ms of decompression (5x the decode).
  """
  adapter = file_adapters.ArrayRecordFileAdapter
  original = adapter.__dict__["write_examples"]

  def write_examples(cls, path, iterator):
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1,uncompressed")
    for _, serialized in iterator:
      writer.write(serialized)
    writer.close()

  adapter.write_examples = classmethod(write_examples)
  try:
    yield
  finally:
    adapter.write_examples = original


def _map(fn, tasks, num_workers):
  """Apply ``fn`` over tasks in threads, results in completion order, a bounded number in flight.

  PyAV releases the GIL while decoding, scaling and encoding, so threads use all cores without
  the pickling and ``__main__`` re-import pitfalls of process pools.
  """
  if num_workers <= 1:
    yield from map(fn, tasks)
    return
  todo = iter(tasks)
  with futures.ThreadPoolExecutor(num_workers) as pool:
    pending = {pool.submit(fn, t) for t in itertools.islice(todo, 2 * num_workers)}
    while pending:
      done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
      for fut in done:
        yield fut.result()
        pending |= {pool.submit(fn, t) for t in itertools.islice(todo, 1)}


def build_dataset(data_dir, config: VideoConfig | str, *, manual_dir=None,
                  num_workers: int | None = None, num_shards: int | None = None,
                  overwrite: bool = False) -> VideoClassification:
  """Build (once) and return the dataset builder, offline; ``data_dir`` is the TFDS root.

  ``overwrite`` rebuilds an existing dataset beside it and swaps it in only when the new one
  is complete: a rebuild that fails leaves the old dataset as it was.
  """
  data_dir = os.fspath(data_dir)
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise BuildError(f"--manual_dir {manual_dir}: no such folder (it holds the videos and "
                     "annotations of the named config; see README, Data)")
  builder = VideoClassification(config=config, data_dir=data_dir, num_workers=num_workers)
  final = os.fspath(builder.data_dir)
  built = os.path.exists(os.path.join(final, "dataset_info.json"))
  if needs_manual_dir(builder.builder_config) and (not built or overwrite) and (
          manual_dir is None or not os.listdir(manual_dir)):
    raise BuildError(f"config {builder.builder_config.name} reads its videos and annotations "
                     f"from --manual_dir, {'not given' if manual_dir is None else 'empty'}: "
                     "give the folder that holds them (README, Data, lists what each named "
                     "config needs)")
  if overwrite and built:
    return _rebuild(data_dir, final, config, manual_dir, num_workers, num_shards)
  if not built:
    _note_unfinished(os.path.dirname(final), "incomplete.")
  _prepare(builder, manual_dir, num_shards)
  return builder


def _note_unfinished(folder: str, prefix: str) -> None:
  """Names the folders an interrupted (killed) build left in ``folder``; never deletes them."""
  stale = sorted(n for n in os.listdir(folder) if n.startswith(prefix)) \
      if os.path.isdir(folder) else []
  if stale:
    print(f"note: {folder} holds {len(stale)} unfinished build(s) ({', '.join(stale)}) from "
          "an interrupted run; delete them to free the space", file=sys.stderr)


def _prepare(builder, manual_dir, num_shards) -> None:
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False, num_shards=num_shards,
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))


def _rebuild(data_dir, final, config, manual_dir, num_workers, num_shards):
  """Builds into a temporary TFDS root in ``data_dir``, then swaps the version folder."""
  _note_unfinished(data_dir, ".rebuild-")
  tmp = tempfile.mkdtemp(prefix=".rebuild-", dir=data_dir)
  old = os.path.join(tmp, "previous")
  try:
    fresh = VideoClassification(config=config, data_dir=tmp, num_workers=num_workers)
    _prepare(fresh, manual_dir, num_shards)
    os.rename(final, old)
    os.rename(os.fspath(fresh.data_dir), final)
  except BaseException as e:
    if os.path.exists(old) and not os.path.exists(final):
      os.rename(old, final)  # interrupted between the two renames: put it back
    if isinstance(e, Exception):
      print(f"\nthe rebuild failed; the existing dataset at {final} was left unchanged",
            file=sys.stderr)  # on a line of its own, after the progress bars
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return VideoClassification(config=config, data_dir=data_dir, num_workers=num_workers)

"""Command line: build a video dataset from local files (offline, all cores).

Named config (files laid out in --manual_dir as the config describes, see builder.py)::

    python -m uniformerv2_jax.data.build --config kinetics400 \\
        --manual_dir /data/kinetics400 --data_dir /data/tfds

Your own annotation lists (mmaction2 ``path label`` or ``path,label`` CSV)::

    python -m uniformerv2_jax.data.build --config mydata --data_dir /data/tfds \\
        --train_list train.txt --val_list val.txt --video_root /data/videos --classes classes.txt

TFDS's own ``tfds build video_classification --imports uniformerv2_jax.data.builder ...`` drives
the same builder where that command can start (it imports apache-beam).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .builder import NAMED_CONFIGS, VideoConfig, build_dataset, skipped_videos


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m uniformerv2_jax.data.build",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True,
                 help=f"named config ({', '.join(c.name for c in NAMED_CONFIGS)}) or a new name "
                      "for your own lists")
  p.add_argument("--data_dir", required=True, help="TFDS root folder to write to")
  p.add_argument("--manual_dir", help="folder holding the files of a named config")
  p.add_argument("--train_list")
  p.add_argument("--val_list")
  p.add_argument("--video_root", default="",
                 help="folder the list paths are relative to (default: --manual_dir, else "
                      "the current folder)")
  p.add_argument("--classes", help="class-name file (one name a line) or k400/k600/.../sthv2")
  p.add_argument("--short_side", type=int, default=None,
                 help="frames above it are brought down to it, never enlarged; default: the "
                      "config's (320)")
  p.add_argument("--keep_size", action="store_true", help="store frames at the source size")
  p.add_argument("--fps", type=float, default=None,
                 help="resample every video to this frame rate (default: its own, capped at "
                      "--max_fps)")
  p.add_argument("--max_fps", type=float, default=None, help="default: the config's (30)")
  p.add_argument("--on_unknown_label", choices=("error", "skip"), default=None,
                 help="a video whose label the classes lack: stop (default) or skip it "
                      "(listed in skipped-<split>.tsv)")
  p.add_argument("--num_workers", type=int, default=None, help="default: all cores")
  p.add_argument("--num_shards", type=int, default=None, help="default: by size (TFDS)")
  p.add_argument("--overwrite", action="store_true")
  return p


def derived_name(name: str, changes: dict) -> str:
  """The dataset name of a named config built with other frames: ``kinetics400_short336``,
  ``kinetics400_fullsize``, ``kinetics400_maxfps60``, ``kinetics400_fps25``, ..."""
  parts = [name]
  for key, value in changes.items():
    if key == "short_side":
      parts.append("fullsize" if value is None else f"short{value}")
    elif key == "on_unknown_label":
      parts.append(f"unknown{value}")
    else:
      number = f"{value:f}".rstrip("0").rstrip(".")  # 29.97 -> 29p97, never 1e+06
      parts.append(f"{key.replace('_', '')}{number}".replace(".", "p"))
  return "_".join(parts)


def config_from_args(args) -> VideoConfig:
  """The config to build. A named config built with other frames (--short_side, --keep_size,
  --fps, --max_fps, --on_unknown_label) is a dataset of its own, under a derived name."""
  named = {c.name: c for c in NAMED_CONFIGS}
  if args.config in named:
    cfg = named[args.config]
  else:
    lists = {s: v for s, v in (("train", args.train_list), ("validation", args.val_list)) if v}
    if not lists or not args.classes:
      raise SystemExit(f"--config {args.config} is not a named config ({', '.join(named)})"
                       ": for your own lists give --train_list and/or --val_list, "
                       "--classes (and usually --video_root)")
    # relative paths: inside --manual_dir when given, else the current folder
    base = os.path.abspath(args.manual_dir or os.curdir)
    lists = {s: os.path.join(base, v) for s, v in lists.items()}
    cfg = VideoConfig(name=args.config, annotations=lists, class_names=args.classes,
                      video_roots={s: os.path.join(base, args.video_root) for s in lists})
  changes = {k: getattr(args, k) for k in ("short_side", "fps", "max_fps", "on_unknown_label")
             if getattr(args, k) is not None}
  if args.keep_size:
    changes["short_side"] = None
  changes = {k: v for k, v in changes.items() if getattr(cfg, k) != v}
  if not changes:
    return cfg
  if cfg.name in named:  # TFDS keeps a registered config's name for the registered config
    name = derived_name(cfg.name, changes)
    print(f"note: {cfg.name} with {', '.join(f'{k}={v}' for k, v in changes.items())} is a "
          f"dataset of its own, {name}: train and evaluate on it with "
          f"--config.dataset.name={name}", file=sys.stderr)
    changes["name"] = name
  return dataclasses.replace(cfg, **changes)


def _built_dir(data_dir, config) -> str | None:
  """The dataset folder of ``config`` under ``data_dir`` when it is already built."""
  from .builder import VideoClassification
  folder = os.fspath(VideoClassification(config=config, data_dir=data_dir).data_dir)
  return folder if os.path.isfile(os.path.join(folder, "dataset_info.json")) else None


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if "://" in args.data_dir:
    raise SystemExit(f"--data_dir {args.data_dir}: build on a local disk, then copy the "
                     "dataset folder to the bucket (gcloud storage cp -r DIR/video_"
                     "classification gs://BUCKET/tfds/); training and evaluation read it "
                     "from there")
  try:
    config = config_from_args(args)
    existing = _built_dir(args.data_dir, config)
    builder = build_dataset(args.data_dir, config,
                            manual_dir=args.manual_dir, num_workers=args.num_workers,
                            num_shards=args.num_shards, overwrite=args.overwrite)
  except (ValueError, OSError) as e:  # AnnotationError, BuildError, unreadable files
    print(f"error: {e}", file=sys.stderr)
    return 2
  except RuntimeError as e:  # TFDS's writers: a full disk
    if "No space left on device" not in str(e):
      raise
    print(f"\nerror: no space left on the device under {args.data_dir} ("
          f"{str(e).strip().splitlines()[0][:200]}); nothing was built (an earlier build of "
          "this dataset is untouched): free space and run the command again", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # the build writes beside the dataset and swaps it in at the end
    print("interrupted: nothing was built (an earlier build of this dataset is untouched); "
          "run the command again to build it", file=sys.stderr)
    return 130
  if existing and not args.overwrite:
    print(f"note: {existing} was already built; it is reused as it is, not read again from "
          "the lists (pass --overwrite to rebuild it)", file=sys.stderr)
  for split, info in builder.info.splits.items():
    skipped = skipped_videos(builder, split)
    print(f"{split}: {info.num_examples} videos in {info.num_shards} shards, {skipped} skipped")
  print(f"dataset: {builder.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

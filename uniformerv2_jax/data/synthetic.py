"""Synthetic moving-shapes videos: the quickstart's default dataset and the tests' data.

Class = direction of motion (right, left, down, up) of one shape that starts at a uniformly
random position and wraps around the frame edges (a torus), so every single frame has the same
distribution for every class: only motion tells the classes apart. Shape, size, colours and speed
are random. Videos are real H.264 mp4 files written with PyAV and built with the generic builder
(config "synthetic"); horizontal flip is off for it, since flipping swaps left and right.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from .video_io import write_video

__all__ = ["SYNTHETIC_CLASSES", "render_clip", "write_synthetic_videos",
           "prepare_synthetic_dataset", "PreparedDataset"]

SYNTHETIC_CLASSES = ("moving right", "moving left", "moving down", "moving up")
_DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (dy, dx) per class
RADIUS = (0.09, 0.16)  # shape radius range, fraction of the frame side
SPEED = (1.2, 2.2)     # pixels per frame range


def _shape_mask(rng: np.random.Generator, size: int, radius=RADIUS) -> np.ndarray:
  """Boolean mask (size, size) of a disc, square or diamond centred in the frame."""
  r = rng.uniform(*radius) * size
  yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
  kind = rng.integers(3)
  if kind == 0:
    return yy ** 2 + xx ** 2 <= r ** 2
  if kind == 1:
    return (np.abs(yy) <= r) & (np.abs(xx) <= r)
  return np.abs(yy) + np.abs(xx) <= 1.3 * r


def render_clip(rng: np.random.Generator, label: int, size: int = 64,
                num_frames: int = 24, *, radius=RADIUS, speed=SPEED) -> np.ndarray:
  """RGB frames (num_frames, size, size, 3) uint8: one shape moving in class ``label``'s direction.

  ``radius`` (fraction of ``size``) and ``speed`` (pixels per frame) are uniform ranges.
  """
  mask = _shape_mask(rng, size, radius)
  background = rng.integers(0, 256, 3)
  colour = (background + rng.integers(96, 160, 3)) % 256  # far from the background
  start = rng.uniform(0, size, 2)
  speed = rng.uniform(*speed)
  dy, dx = _DIRECTIONS[label]
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  for t in range(num_frames):
    y = int(round(start[0] + dy * speed * t)) % size
    x = int(round(start[1] + dx * speed * t)) % size
    m = np.roll(mask, (y - size // 2, x - size // 2), axis=(0, 1))
    frames[t] = np.where(m[..., None], colour, background).astype(np.uint8)
  return frames


def write_synthetic_videos(out_dir, num_train: int = 256, num_val: int = 64, *, size: int = 64,
                           num_frames: int = 24, seed: int = 0, fps: int = 25,
                           radius=RADIUS, speed=SPEED) -> dict:
  """Write mp4 videos, ``train_list.txt``/``val_list.txt`` (mmaction2 ``path label``) and
  ``classes.txt`` into ``out_dir``; returns the paths. Labels are balanced (i % 4)."""
  out_dir = os.fspath(out_dir)
  rng = np.random.default_rng(seed)
  lists = {}
  for split, count, list_name in (("train", num_train, "train_list.txt"),
                                  ("val", num_val, "val_list.txt")):
    lines = []
    for i in range(count):
      label = i % len(SYNTHETIC_CLASSES)
      rel = f"{split}/{i:06d}.mp4"
      write_video(os.path.join(out_dir, "videos", rel),
                  render_clip(rng, label, size, num_frames, radius=radius, speed=speed),
                  fps=fps)
      lines.append(f"{rel} {label}\n")
    lists[split] = os.path.join(out_dir, list_name)
    with open(lists[split], "w") as f:
      f.writelines(lines)
  classes = os.path.join(out_dir, "classes.txt")
  with open(classes, "w") as f:
    f.write("\n".join(SYNTHETIC_CLASSES) + "\n")
  return {"videos": os.path.join(out_dir, "videos"), "classes": classes, **lists}


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  """What the pipeline functions need: pass ``builder`` as ``data_dir_or_builder``."""
  builder: object
  class_names: tuple
  train_split: str = "train"
  eval_split: str = "validation"
  flip: bool = False

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def prepare_synthetic_dataset(data_dir, num_train: int = 256, num_val: int = 64, *,
                              size: int = 64, num_frames: int = 24, seed: int = 0,
                              num_workers: int | None = None, radius=RADIUS,
                              speed=SPEED) -> PreparedDataset:
  """Write the videos and build the TFDS dataset under ``data_dir`` unless already there.

  ``radius`` / ``speed``: see :func:`render_clip` (non-default values get their own dataset).
  """
  from .builder import NAMED_CONFIGS, build_dataset  # TensorFlow only when building

  tag = f"n{num_train}v{num_val}s{size}f{num_frames}r{seed}"
  radius, speed = tuple(float(v) for v in radius), tuple(float(v) for v in speed)
  if (radius, speed) != (RADIUS, SPEED):
    tag += "_r{:g}-{:g}_v{:g}-{:g}".format(*radius, *speed)
  source = os.path.join(os.fspath(data_dir), "synthetic_source", tag)
  if not os.path.isfile(os.path.join(source, "classes.txt")):
    write_synthetic_videos(source + ".tmp", num_train, num_val, size=size,
                           num_frames=num_frames, seed=seed, radius=radius, speed=speed)
    os.replace(source + ".tmp", source)
  base = next(c for c in NAMED_CONFIGS if c.name == "synthetic")
  config = dataclasses.replace(base, name=f"synthetic_{tag}", flip=False)
  builder = build_dataset(data_dir, config, manual_dir=source, num_workers=num_workers)
  return PreparedDataset(builder=builder, class_names=SYNTHETIC_CLASSES)

"""Synthetic moving shapes: only motion tells the classes apart; built with the same builder."""
import os

import numpy as np

from uniformerv2_jax.data import decode_video
from uniformerv2_jax.data.synthetic import SYNTHETIC_CLASSES, render_clip, write_synthetic_videos

DIRECTIONS = {0: (0, 1), 1: (0, -1), 2: (1, 0), 3: (-1, 0)}  # (dy, dx) of "moving right", ...


def torus_shift(a, b):
  """(dy, dx) in [-size/2, size/2) that best aligns frame a onto frame b (wrap-around)."""
  size = a.shape[0]
  best = max(((dy, dx) for dy in range(size) for dx in range(size)),
             key=lambda d: (np.roll(a, d, axis=(0, 1)) == b).all(-1).sum())
  return tuple((v + size // 2) % size - size // 2 for v in best)


def test_first_frame_carries_no_label():
  for seed in range(5):
    firsts = [render_clip(np.random.default_rng(seed), k, 24, 6)[0] for k in range(4)]
    for f in firsts[1:]:
      np.testing.assert_array_equal(f, firsts[0])


def test_motion_follows_the_label():
  for k, (dy, dx) in DIRECTIONS.items():
    clip = render_clip(np.random.default_rng(k), k, 40, 6)
    sy, sx = torus_shift(clip[0], clip[5])  # 1.2-2.2 px a frame: 6-11 px, under half the size
    assert np.sign(sy) == dy and np.sign(sx) == dx, (SYNTHETIC_CLASSES[k], sy, sx)
    assert 6 <= abs(sy) + abs(sx) <= 11


def test_written_files_are_real_videos_with_balanced_lists(tmp_path):
  paths = write_synthetic_videos(tmp_path, 8, 4, size=32, num_frames=12, seed=1)
  lines = open(paths["train"]).read().split("\n")[:-1]
  assert [int(x.split()[1]) for x in lines] == [0, 1, 2, 3] * 2
  frames, _ = decode_video(os.path.join(paths["videos"], lines[0].split()[0]))
  assert frames.shape == (12, 32, 32, 3)
  assert open(paths["classes"]).read().split("\n")[:4] == list(SYNTHETIC_CLASSES)


def test_prepare_builds_once_and_reuses(tmp_path):
  from uniformerv2_jax.data import prepare_synthetic_dataset

  ds = prepare_synthetic_dataset(tmp_path, 8, 4, size=32, num_frames=12, num_workers=1)
  assert ds.num_classes == 4 and ds.flip is False
  splits = ds.builder.info.splits
  assert splits["train"].num_examples == 8 and splits["validation"].num_examples == 4
  stamp = os.path.getmtime(os.path.join(ds.builder.data_dir, "dataset_info.json"))
  again = prepare_synthetic_dataset(tmp_path, 8, 4, size=32, num_frames=12)
  assert again.builder.data_dir == ds.builder.data_dir
  assert os.path.getmtime(os.path.join(again.builder.data_dir, "dataset_info.json")) == stamp

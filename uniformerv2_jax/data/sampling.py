"""Temporal frame sampling: mmaction2's ``UniformSample`` (TSN-style segments).

n = number of frames, T = clip length, seg = (n - 1) / T.

* train: for segment i in 0..T-1 one random integer in
  ``[round(seg*i), round(seg*(i+1))]`` (inclusive; round = numpy's half-to-even).
* test, clip k of K: ``round(seg*i) + int(seg / (K+1) * (k+1))``.

Videos shorter than the clip (n < T) get repeated indices from the same formulas,
as mmaction2 does; indices are clamped to ``[0, n-1]`` as the original repository does.
The tf.data pipelines call this function itself (``reader.py``), so they sample exactly so.
"""
from __future__ import annotations

import numpy as np

__all__ = ["uniform_sample", "segment_bounds"]


def _check(num_frames: int, clip_len: int, num_clips: int) -> None:
  if int(num_frames) < 1:
    raise ValueError(f"uniform_sample: the video has {num_frames} frames; need at least 1 "
                     "(empty videos are skipped when the dataset is built)")
  if int(clip_len) < 1 or int(num_clips) < 1:
    raise ValueError(f"uniform_sample: clip_len ({clip_len}) and num_clips ({num_clips}) "
                     "must be >= 1")


def segment_bounds(num_frames: int, clip_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Inclusive ``(start, end)`` frame range of each of the ``clip_len`` train segments."""
  _check(num_frames, clip_len, 1)
  seg = (num_frames - 1) / clip_len
  i = np.arange(clip_len, dtype=np.float64)
  return np.round(seg * i).astype(np.int64), np.round(seg * (i + 1)).astype(np.int64)


def uniform_sample(num_frames: int, clip_len: int, num_clips: int = 1, test_mode: bool = False,
                   rng: np.random.Generator | int | None = None) -> np.ndarray:
  """Frame indices ``(num_clips * clip_len,)`` as mmaction2's ``UniformSample``.

  Test mode is deterministic (``rng`` unused). In train mode each of the ``num_clips`` clips
  is drawn independently (mmaction2 draws one); ``rng`` is a ``np.random.Generator`` or a seed.
  """
  _check(num_frames, clip_len, num_clips)
  seg = (num_frames - 1) / clip_len
  starts = np.round(seg * np.arange(clip_len, dtype=np.float64)).astype(np.int64)
  if test_mode:
    shifts = [int(seg / (num_clips + 1) * (k + 1)) for k in range(num_clips)]
    inds = np.concatenate([starts + s for s in shifts])
  else:
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    lo, hi = segment_bounds(num_frames, clip_len)
    inds = np.concatenate([rng.integers(lo, hi + 1) for _ in range(num_clips)])
  return np.clip(inds, 0, num_frames - 1).astype(np.int64)

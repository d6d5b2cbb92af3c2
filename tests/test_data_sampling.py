"""Temporal sampling: mmaction2's UniformSample formulas (recipes.md) in numpy and in tf.data."""
import numpy as np
import pytest

from uniformerv2_jax.data import segment_bounds, uniform_sample

# recipes.md worked examples (n=300, T=8)
K4_CLIP0 = [7, 44, 82, 119, 157, 194, 231, 269]
K4_CLIP3 = [29, 66, 104, 141, 179, 216, 253, 291]
K1 = [18, 55, 93, 130, 168, 205, 242, 280]


def reference_test_indices(n, t, k_clips):
  """Test-mode formula of recipes.md written out with Python's round/int."""
  seg = (n - 1) / t
  return [min(int(np.round(seg * i)) + int(seg / (k_clips + 1) * (k + 1)), n - 1)
          for k in range(k_clips) for i in range(t)]


def test_worked_examples():
  idx = uniform_sample(300, 8, num_clips=4, test_mode=True)
  assert idx.shape == (32,)
  assert idx[:8].tolist() == K4_CLIP0
  assert idx[24:].tolist() == K4_CLIP3
  assert uniform_sample(300, 8, num_clips=1, test_mode=True).tolist() == K1


@pytest.mark.parametrize("n", [1, 2, 5, 7, 8, 9, 31, 64, 300, 301])
@pytest.mark.parametrize("t,k", [(8, 1), (8, 4), (16, 2), (3, 3)])
def test_test_mode_matches_formula(n, t, k):
  assert uniform_sample(n, t, k, test_mode=True).tolist() == reference_test_indices(n, t, k)


def test_round_half_to_even():
  # n=5, T=8: seg = 0.5, so round(0.5*i) hits .5 at odd i: numpy rounds 0.5->0, 1.5->2, 2.5->2
  lo, hi = segment_bounds(5, 8)
  assert lo.tolist() == [0, 0, 1, 2, 2, 2, 3, 4]
  assert hi.tolist() == [0, 1, 2, 2, 2, 3, 4, 4]


@pytest.mark.parametrize("n", [1, 3, 8, 50, 300])
def test_train_indices_lie_in_their_segments_and_cover_them(n):
  t = 8
  lo, hi = segment_bounds(n, t)
  rng = np.random.default_rng(0)
  draws = np.stack([uniform_sample(n, t, rng=rng) for _ in range(2000)])
  assert ((draws >= lo) & (draws <= hi)).all()
  for i in range(t):  # every value of each inclusive range shows up
    assert set(np.unique(draws[:, i])) == set(range(lo[i], hi[i] + 1))


def test_short_video_repeats_frames_and_one_frame_video():
  assert uniform_sample(1, 8, test_mode=True).tolist() == [0] * 8
  assert uniform_sample(1, 8, rng=0).tolist() == [0] * 8
  idx = uniform_sample(3, 8, test_mode=True)
  assert idx.max() <= 2 and len(set(idx.tolist())) < 8


def test_train_multiple_clips_and_determinism():
  a = uniform_sample(300, 8, num_clips=2, rng=5)
  assert a.shape == (16,)
  assert np.array_equal(a, uniform_sample(300, 8, num_clips=2, rng=5))
  assert not np.array_equal(a, uniform_sample(300, 8, num_clips=2, rng=6))


def test_empty_video_is_an_error():
  with pytest.raises(ValueError, match="0 frames"):
    uniform_sample(0, 8)

"""Metrics and view aggregation on small examples checked by hand."""

import numpy as np
import pytest

from uniformerv2_jax.evaluation import (ViewAccumulator, aggregate_views, classification_metrics,
                                        mean_class_accuracy, top_classes, topk_accuracy)

# 4 videos, 4 classes; class 3 is never a label but is predicted once.
SCORES = np.array([
    [0.1, 0.5, 0.4, 0.0],   # label 1: top-1 hit
    [0.3, 0.3, 0.4, 0.0],   # label 0: top-1 is 2; tie 0/1 at rank 2 -> 0 first -> top-2 hit
    [0.5, 0.5, 0.0, 0.0],   # label 1: tie with class 0 for the best -> 0 wins -> top-1 miss
    [0.2, 0.2, 0.2, 0.4],   # label 2: ranks 3, 0, 1, 2 -> only a top-4 hit
])
LABELS = np.array([1, 0, 1, 2])


def test_top_classes_ties_lower_id_first():
  np.testing.assert_array_equal(top_classes(SCORES, 4), [[1, 2, 0, 3], [2, 0, 1, 3],
                                                         [0, 1, 2, 3], [3, 0, 1, 2]])
  # k beyond the class count is clipped.
  assert top_classes(SCORES, 5).shape == (4, 4)


def test_topk_accuracy_by_hand():
  assert topk_accuracy(SCORES, LABELS, 1) == pytest.approx(1 / 4)
  assert topk_accuracy(SCORES, LABELS, 2) == pytest.approx(3 / 4)
  assert topk_accuracy(SCORES, LABELS, 3) == pytest.approx(3 / 4)
  assert topk_accuracy(SCORES, LABELS, 4) == pytest.approx(1.0)


def test_mean_class_accuracy_over_present_classes_only():
  # class 0: 0/1, class 1: 1/2, class 2: 0/1; class 3 (absent) does not count.
  assert mean_class_accuracy(SCORES, LABELS) == pytest.approx((0 + 0.5 + 0) / 3)
  # Imbalanced: 3 videos of class 0 all right, 1 video of class 1 wrong -> 0.5 (top-1 is 0.75).
  s = np.array([[1., 0], [1, 0], [1, 0], [1, 0]])
  assert mean_class_accuracy(s, [0, 0, 0, 1]) == pytest.approx(0.5)
  m = classification_metrics(s, np.array([0, 0, 0, 1]))
  assert m["top1"] == pytest.approx(0.75) and m["top5"] == pytest.approx(1.0)


def test_aggregate_views_mean_and_sum_same_ranking():
  views = np.array([[[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]]])  # one video, 3 views
  np.testing.assert_allclose(aggregate_views(views), [[1.3 / 3, 1.7 / 3]])
  np.testing.assert_allclose(aggregate_views(views, "sum"), [[1.3, 1.7]])
  with pytest.raises(ValueError, match="aggregate"):
    aggregate_views(views, "max")


def test_accumulator_any_order_equals_mean_over_views():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(5), size=(3, 4))  # 3 videos x 4 views
  rows = [(v, k) for v in range(3) for k in range(4)]
  order = rng.permutation(len(rows))
  acc = ViewAccumulator(4)
  for chunk in np.array_split(order, 5):  # views of one video spread over "batches"
    acc.add(np.stack([probs[rows[i]] for i in chunk]), [10 + rows[i][0] for i in chunk],
            [rows[i][0] % 2 for i in chunk], [rows[i][1] for i in chunk])
  res = acc.result()
  np.testing.assert_array_equal(res.video_ids, [10, 11, 12])
  np.testing.assert_array_equal(res.labels, [0, 1, 0])
  np.testing.assert_allclose(res.scores, probs.mean(1), rtol=1e-12)
  np.testing.assert_allclose(acc.result("sum").scores, probs.sum(1), rtol=1e-12)


def test_accumulator_masks_and_rejects_missing_or_duplicate_views():
  p = np.full((3, 2), 0.5)
  acc = ViewAccumulator(2)
  acc.add(p, [0, 0, 7], [1, 1, 1], [0, 1, 0], mask=[1, 1, 0])  # row 3 is padding
  assert len(acc) == 1 and acc.views_seen == 2
  with pytest.raises(ValueError, match="seen twice"):
    acc.add(p[:1], [0], [1], [1])
  acc = ViewAccumulator(2)
  acc.add(p[:1], [0], [1], [0])
  with pytest.raises(ValueError, match="did not get all 2 views"):
    acc.result()
  with pytest.raises(ValueError, match="outside"):
    acc.add(p[:1], [0], [1], [2])

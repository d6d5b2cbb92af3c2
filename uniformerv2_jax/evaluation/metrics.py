"""Metrics and per-video aggregation of view probabilities (numpy, host side).

Ties. Classes with equal scores rank by class id, lower id first (``np.argmax``'s rule), so
top-k is deterministic: a video whose label ties with a lower-id class for the best score is a
top-1 miss.

Mean class accuracy is the mean over the classes PRESENT in the labels of the per-class top-1
recall. (mmaction2's ``mean_class_accuracy`` also averages a 0 for classes that are only
predicted, never labelled; on a full validation set every class is present and the two agree.)

Aggregation: the per-video score is the mean over views of the softmax probabilities
(``"mean"``, mmaction2, the seed tables) or their sum (``"sum"``, the original repository; the
same ranking).
"""

from __future__ import annotations

import dataclasses

import numpy as np

AGGREGATES = ("mean", "sum")

def top_classes(scores: np.ndarray, k: int) -> np.ndarray:
  """Class ids of the k best scores per row (N, k); ties: lower class id first."""
  scores = np.asarray(scores)
  k = min(int(k), scores.shape[-1])
  return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the k best classes (ties: lower id first)."""
  labels = np.asarray(labels).reshape(-1)
  if not labels.size:
    return float("nan")
  return float(np.mean(np.any(top_classes(scores, k) == labels[:, None], axis=-1)))


def mean_class_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
  """Mean over the classes present in ``labels`` of their top-1 recall."""
  labels = np.asarray(labels).reshape(-1)
  if not labels.size:
    return float("nan")
  hit = top_classes(scores, 1)[:, 0] == labels
  classes = np.unique(labels)
  return float(np.mean([hit[labels == c].mean() for c in classes]))


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  return dict(top1=topk_accuracy(scores, labels, 1), top5=topk_accuracy(scores, labels, 5),
              mean_class_accuracy=mean_class_accuracy(scores, labels))


def aggregate_views(view_probs: np.ndarray, aggregate: str = "mean") -> np.ndarray:
  """(..., views, classes) per-view probabilities -> (..., classes) per-video score."""
  if aggregate not in AGGREGATES:
    raise ValueError(f"aggregate={aggregate!r}: use one of {AGGREGATES}")
  view_probs = np.asarray(view_probs, np.float64)
  return view_probs.sum(-2) if aggregate == "sum" else view_probs.mean(-2)



# Per-video accumulation of view probabilities.



@dataclasses.dataclass
class EvalResult:
  video_ids: np.ndarray   # (N,) int64, sorted
  labels: np.ndarray      # (N,) int64
  scores: np.ndarray      # (N, classes) float64: mean (or sum) of the views' probabilities
  num_views: int
  aggregate: str = "mean"
  seconds: float = 0.0

  @property
  def metrics(self) -> dict[str, float]:
    return classification_metrics(self.scores, self.labels)


class ViewAccumulator:
  """Sums per-view probabilities by video id; checks every video gets each view exactly once."""

  def __init__(self, num_views: int):
    self.num_views = int(num_views)
    self._sum: dict[int, np.ndarray] = {}
    self._label: dict[int, int] = {}
    self._views: dict[int, set] = {}

  def __len__(self) -> int:
    return len(self._sum)

  @property
  def views_seen(self) -> int:
    return sum(len(v) for v in self._views.values())

  def add(self, probs, video_ids, labels, views, mask=None) -> None:
    probs = np.asarray(probs, np.float64)
    video_ids, labels, views = (np.asarray(a).reshape(-1).astype(np.int64)
                                for a in (video_ids, labels, views))
    mask = np.ones(len(video_ids), bool) if mask is None else np.asarray(mask).reshape(-1) > 0
    for p, vid, label, view in zip(probs[mask], video_ids[mask], labels[mask], views[mask]):
      vid, label, view = int(vid), int(label), int(view)
      if not 0 <= view < self.num_views:
        raise ValueError(f"video {vid}: view {view} outside [0, {self.num_views}); does the "
                         "dataset's num_clips x num_crops match config.eval?")
      if vid not in self._sum:
        self._sum[vid], self._label[vid], self._views[vid] = np.zeros_like(p), label, set()
      if view in self._views[vid]:
        raise ValueError(f"video {vid}: view {view} was seen twice (padding or sharding bug)")
      if label != self._label[vid]:
        raise ValueError(f"video {vid}: views disagree on the label ({self._label[vid]} vs {label})")
      self._views[vid].add(view)
      self._sum[vid] += p

  def result(self, aggregate: str = "mean", seconds: float = 0.0,
             complete_only: bool = False) -> EvalResult:
    """Per-video scores. A video missing views is an error, or, with ``complete_only`` (an
    evaluation stopped early), left out."""
    if aggregate not in AGGREGATES:
      raise ValueError(f"aggregate={aggregate!r}: use one of {AGGREGATES}")
    incomplete = {v: sorted(s) for v, s in self._views.items() if len(s) != self.num_views}
    if incomplete and not complete_only:
      vid, seen = next(iter(incomplete.items()))
      raise ValueError(f"{len(incomplete)} videos did not get all {self.num_views} views "
                       f"(e.g. video {vid} has views {seen})")
    ids = np.array(sorted(set(self._sum) - set(incomplete)), np.int64)
    scores = np.stack([self._sum[i] for i in ids]) if len(ids) else np.zeros((0, 0))
    if aggregate == "mean":
      scores = scores / self.num_views
    labels = np.array([self._label[i] for i in ids], np.int64)
    return EvalResult(ids, labels, scores, self.num_views, aggregate, seconds)

"""Multi-view evaluation (docs/recipes.md, "Test-time spatial views").

Every video is seen as ``num_clips x num_crops`` views; the per-video score is the mean over
views of the softmax probabilities; metrics are top-1, top-5 and mean class accuracy.
``metrics``: numpy metrics and aggregation; ``runner``: the sharded eval step, the loop, result
files; ``driver``: ``evaluate_checkpoint(config, checkpoint, workdir)`` behind ``eval.py``.
"""

from uniformerv2_jax.evaluation.metrics import (AGGREGATES, EvalResult, ViewAccumulator,
                                                aggregate_views, classification_metrics,
                                                mean_class_accuracy, top_classes, topk_accuracy)
from uniformerv2_jax.evaluation.runner import (Evaluator, array_batches, evaluate,
                                               global_batch_size, pad_batch, video_records,
                                               write_results)

__all__ = ["AGGREGATES", "EvalResult", "ViewAccumulator", "aggregate_views",
           "classification_metrics", "mean_class_accuracy", "top_classes", "topk_accuracy",
           "Evaluator", "array_batches", "evaluate", "global_batch_size", "pad_batch",
           "video_records", "write_results"]

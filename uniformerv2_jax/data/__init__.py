"""Video data: TFDS datasets, tf.data input pipelines, sampling, augmentation.

Light helpers (numpy) import eagerly; video decoding (PyAV), the TensorFlow pipeline and the JAX
augmentations load on first use, so ``predict`` and build workers do not pay for TensorFlow and
the train step's normalisation needs neither PyAV nor TensorFlow.
"""

import importlib

from .sampling import segment_bounds, uniform_sample
from .spatial import eval_views, resize_bilinear

_LAZY = {
    "decode_video": "video_io", "VideoDecodeError": "video_io",
    "normalize": "augment", "randaugment": "augment", "StoredVideos": "reader",
    "DamagedDataError": "reader", "numpy_batches": "pipeline",
    "train_dataset": "pipeline", "eval_dataset": "pipeline", "steps_per_epoch": "pipeline",
    "eval_batches": "pipeline", "load_builder": "pipeline",
    "VideoConfig": "builder", "VideoClassification": "builder", "build_dataset": "builder",
    "skipped_videos": "builder",
    "prepare_synthetic_dataset": "synthetic", "write_synthetic_videos": "synthetic",
}

__all__ = ["uniform_sample", "segment_bounds", "eval_views", "resize_bilinear", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

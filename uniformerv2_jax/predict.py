"""What does the model say about my video? Top classes of video files, by name.

    python -m uniformerv2_jax.predict --checkpoint=DIR VIDEO [VIDEO ...] [--top 5] [--json]
        [--class-names FILE] [--num-clips 4 --num-crops 3] [--spatial mmaction2|original]
        [--head-map k400|k600|k700|FILE]

Each file is decoded with PyAV (any format it reads), sampled and cropped as the test protocol
does (``uniform_sample(test_mode=True)``: ``num_clips`` clips of ``t_size`` frames, then
``eval_views``: short side -> input resolution, ``num_crops`` crops), and the per-video score is
the mean of the views' softmax probabilities. Class names come from ``--class-names``, else from
the head map's built-in list, else from the checkpoint's ``class_names.txt``. A file that cannot
be decoded gets a one-line error on stderr; the other files still get their answers; the exit
status is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

import numpy as np

from uniformerv2_jax.data import eval_views, uniform_sample
from uniformerv2_jax.data.video_io import VideoDecodeError, decode_video, iter_frames


@dataclasses.dataclass(frozen=True)
class Protocol:
  clip_len: int
  crop_size: int
  num_clips: int = 4
  num_crops: int = 3
  spatial: str = "mmaction2"
  max_fps: float | None = None


def count_frames(path, max_fps: float | None = None) -> int:
  """Number of decodable frames (decodes the file once without converting frames)."""
  return sum(1 for _ in iter_frames(path, max_fps=max_fps))


def video_views(path, protocol: Protocol) -> tuple[np.ndarray, np.ndarray]:
  """(views (clips*crops, T, S, S, 3) uint8 in clip-major order, sampled frame indices)."""
  p = protocol
  n = count_frames(path, p.max_fps)
  if n == 0:
    raise VideoDecodeError(path, "contains no decodable frames")
  idx = uniform_sample(n, p.clip_len, p.num_clips, test_mode=True)
  frames, _ = decode_video(path, idx, max_fps=p.max_fps)
  clips = frames.reshape(p.num_clips, p.clip_len, *frames.shape[1:])
  views = np.stack([eval_views(c, p.crop_size, p.num_crops, spatial=p.spatial) for c in clips])
  return views.reshape(-1, *views.shape[2:]), idx


class Predictor:
  """A loaded model and its jitted eval step over the local devices."""

  def __init__(self, checkpoint: str, *, head_map=None, dtype=None, mesh=None):
    import jax
    from uniformerv2_jax.checkpoint import load_pretrained
    from uniformerv2_jax.evaluation.runner import Evaluator
    from uniformerv2_jax.sharding import make_mesh
    mesh = mesh or make_mesh({"data": -1, "fsdp": 1, "model": 1}, jax.local_devices())
    self.model = load_pretrained(checkpoint, mesh=mesh, dtype=dtype, head_map=head_map)
    self.evaluator = Evaluator(self.model, mesh)

  def probabilities(self, views: np.ndarray) -> np.ndarray:
    """(V, T, S, S, 3) uint8 -> per-view probabilities (V, classes) float32."""
    d = self.evaluator.batch_divisor
    pad = -len(views) % d
    batch = np.concatenate([views, np.zeros((pad, *views.shape[1:]), views.dtype)]) if pad \
        else views
    return self.evaluator(batch)[:len(views)]


def class_names_for(checkpoint: str, class_names_file=None, head_map=None,
                    num_classes: int | None = None) -> list[str] | None:
  """Names for the predicted head: ``--class-names`` > the head map's or checkpoint's list."""
  from uniformerv2_jax import heads
  from uniformerv2_jax.checkpoint import head_class_names
  if class_names_file:
    names = heads.read_class_names_file(class_names_file)
  else:
    names = head_class_names(checkpoint, head_map)
  if names is not None and num_classes is not None and len(names) != num_classes:
    raise ValueError(f"{class_names_file or checkpoint}: {len(names)} class names for a "
                     f"{num_classes}-way head")
  return names


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m uniformerv2_jax.predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("videos", nargs="+", metavar="VIDEO")
  p.add_argument("--checkpoint", required=True,
                 help="model directory (save_pretrained, convert) or training run (WORKDIR: "
                 "its latest step, or WORKDIR/checkpoints/STEP)")
  p.add_argument("--top", type=int, default=5)
  p.add_argument("--json", action="store_true", help="one JSON object per video on stdout")
  p.add_argument("--class-names", default=None, help="file with one class name per line, or a "
                 "packaged list: k400|k600|k700|k710|mit|sthv2")
  p.add_argument("--head-map", default=None, help="read a K710 head as k400|k600|k700|FILE")
  p.add_argument("--num-clips", type=int, default=4)
  p.add_argument("--num-crops", type=int, default=3, choices=(1, 3))
  p.add_argument("--spatial", default="mmaction2", choices=("mmaction2", "original"))
  p.add_argument("--max-fps", type=float, default=None,
                 help="drop frames above this rate first (datasets are built at <= 30 fps)")
  p.add_argument("--dtype", default=None, help="computation dtype (default: the checkpoint's)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  for flag, value in (("--num-clips", args.num_clips), ("--top", args.top)):
    if value < 1:
      print(f"predict: error: {flag} {value}: must be at least 1", file=sys.stderr)
      return 2
  try:  # the model, its class names: anything wrong here is the user's to fix, in one line
    from uniformerv2_jax.checkpoint import resolve
    checkpoint = resolve(args.checkpoint)  # a training run: its latest step, for every read
    predictor = Predictor(checkpoint, head_map=args.head_map, dtype=args.dtype)
    cfg = predictor.model.config
    names = class_names_for(checkpoint, args.class_names, args.head_map, cfg.num_classes)
  except (ValueError, OSError) as e:  # CheckpointError and config errors are ValueErrors
    print(f"predict: error: {e}", file=sys.stderr)
    return 2
  protocol = Protocol(cfg.t_size, cfg.input_resolution, args.num_clips, args.num_crops,
                      args.spatial, args.max_fps)
  failed = 0
  for path in args.videos:
    try:
      views, idx = video_views(path, protocol)
    except VideoDecodeError as e:  # its message names the file
      failed += 1
      print(f"predict: error: {e}", file=sys.stderr, flush=True)
      continue
    except Exception as e:  # noqa: BLE001 -- one odd file must not stop the others
      failed += 1
      print(f"predict: error: {path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
      continue
    score = predictor.probabilities(views).astype(np.float64).mean(0)
    top = np.argsort(-score, kind="stable")[:args.top]
    label = (lambda c: names[c]) if names else (lambda c: f"class {c}")
    if args.json:
      print(json.dumps(dict(video=path, num_views=len(views), frames=idx.tolist(), top=[
          dict(id=int(c), name=label(c), probability=round(float(score[c]), 6)) for c in top])),
            flush=True)
    else:
      print(path)
      for rank, c in enumerate(top, 1):
        print(f"  {rank}. {label(c):<40s} {score[c]:.4f}")
      sys.stdout.flush()
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

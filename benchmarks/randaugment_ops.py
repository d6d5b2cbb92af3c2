"""Host RandAugment, op by op: milliseconds per clip on one CPU core (TensorFlow, whole frames),
with every op as TensorFlow kernels and with each op's pixel arithmetic XLA-compiled (the
default).

    python benchmarks/randaugment_ops.py [--frames 8 --height 320 --width 427] [--repeats 9]

Times each op of ``uniformerv2_jax/data/tf_augment.py`` as the input pipeline runs it (uint8 in,
float32 arithmetic, ``tf.switch_case`` on the op drawn) on random frames of the given size (the
default: 8 frames of a 4:3 video stored at short side 320), one intra-op thread, so that the
numbers are CPU time per clip (the median of the repeats: a shared machine's noise is
one-sided). The last row is the expected RandAugment cost of a clip: the
mean over the ops times the ops a clip gets on average (layers x probability, timm's m7-n4
with probability 0.5). Prints one table naming the CPU.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import argparse
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--frames", type=int, default=8)
  ap.add_argument("--height", type=int, default=320)
  ap.add_argument("--width", type=int, default=427)
  ap.add_argument("--magnitude", type=float, default=7.0)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--prob", type=float, default=0.5)
  ap.add_argument("--repeats", type=int, default=9)
  args = ap.parse_args()
  import tensorflow as tf
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  from benchmarks.input_pipeline import cpu_name
  from uniformerv2_jax.data import tf_augment
  from uniformerv2_jax.data.augment import OPS

  rng = np.random.default_rng(0)
  clip = tf.constant(rng.integers(0, 256, (args.frames, args.height, args.width, 3), np.uint8))
  ms = {}
  for compiled in (False, True):
    run = tf.function(lambda x, op, compiled=compiled: tf.cast(
        tf_augment.apply_op(x, op, args.magnitude, 1.0, compiled=compiled), tf.uint8))
    for i, name in enumerate(OPS):
      op = tf.constant(i)
      run(clip, op).numpy()  # trace, compile, warm up
      times = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        run(clip, op).numpy()
        times.append(time.perf_counter() - start)
      ms[name, compiled] = float(np.median(times)) * 1e3
  mean = [sum(ms[n, c] for n in OPS) / len(OPS) for c in (False, True)]
  print(f"\nCPU: {cpu_name()}, one core, TensorFlow {tf.__version__}; clip "
        f"{args.frames}x{args.height}x{args.width}x3 uint8, magnitude {args.magnitude}")
  print("| op | kernels ms per clip | compiled ms per clip |\n|---|---|---|")
  for name in sorted(OPS, key=lambda n: -ms[n, False]):
    print(f"| {name} | {ms[name, False]:.1f} | {ms[name, True]:.1f} |")
  print(f"| mean over ops | {mean[0]:.1f} | {mean[1]:.1f} |")
  n = args.layers * args.prob
  print(f"| expected per clip ({args.layers} layers x p {args.prob}) | {mean[0] * n:.1f} | "
        f"{mean[1] * n:.1f} |")


if __name__ == "__main__":
  main()

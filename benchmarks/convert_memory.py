"""Time and peak memory of converting a full-size UniFormerV2 checkpoint (random weights).

  PYTHONPATH=. python benchmarks/convert_memory.py --model l14 --workdir /tmp/convert_bench

Writes an original-layout `.pyth` of random float32 tensors with the preset's shapes,
then runs `python -m convert uniformerv2` on it in a child process and reports wall
time and the child's peak resident memory against the checkpoint's size (goal < 3x),
then `python -m convert export` the same way.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import argparse
import json
import shutil
import subprocess
import time


def make_checkpoint(model: str, path: str) -> int:
  import torch

  from uniformerv2_jax.config import model_config
  from uniformerv2_jax.torch_layout import torch_shapes
  from uniformerv2_jax.weights import flatten, weight_shapes
  cfg = model_config(model)
  shapes = torch_shapes(cfg, flatten(weight_shapes(cfg)))
  gen = torch.Generator().manual_seed(0)
  sd = {f"backbone.{k}": torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
  torch.save({"model_state": sd}, path)
  return sum(v.numel() for v in sd.values())


_RUNNER = ("import atexit, resource, runpy, sys\n"
           "atexit.register(lambda: print('PEAK_RSS_KIB=%d' % "
           "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True))\n"
           "sys.argv = ['convert'] + sys.argv[1:]\n"
           "runpy.run_module('convert', run_name='__main__')\n")


def run_child(args: list[str]) -> tuple[float, float]:
  """(seconds, peak RSS in bytes) of `python -m convert ARGS` in a child process."""
  t = time.perf_counter()
  p = subprocess.run([sys.executable, "-W", "ignore", "-c", _RUNNER, *args], check=True,
                     capture_output=True, text=True,
                     env=dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu"))
  seconds = time.perf_counter() - t
  print(p.stdout.strip())
  peak = [int(line.split("=")[1]) for line in p.stdout.splitlines()
          if line.startswith("PEAK_RSS_KIB=")][-1]
  return seconds, peak * 1024  # Linux reports KiB


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="l14", help="preset whose shapes the checkpoint has")
  p.add_argument("--workdir", default="/tmp/convert_bench",
                 help="scratch folder for the checkpoint and the converted model")
  a = p.parse_args()
  os.makedirs(a.workdir, exist_ok=True)
  src = os.path.join(a.workdir, f"{a.model}.pyth")
  out = os.path.join(a.workdir, f"{a.model}_jax")
  shutil.rmtree(out, ignore_errors=True)
  code = ("import sys; sys.path.insert(0, '.'); from benchmarks.convert_memory import "
          f"make_checkpoint; print(make_checkpoint({a.model!r}, {src!r}))")
  if not os.path.exists(src):
    subprocess.run([sys.executable, "-c", code], check=True)
  size = os.path.getsize(src)
  seconds, peak = run_child(["uniformerv2", "--input", src, "--model", a.model, "--output", out])
  result = {"model": a.model, "checkpoint_bytes": size, "convert_seconds": round(seconds, 1),
            "convert_peak_rss_bytes": peak, "convert_peak_over_size": round(peak / size, 2)}
  exported = os.path.join(a.workdir, f"{a.model}_export.pyth")
  seconds, peak = run_child(["export", "--input", out, "--layout", "original", "--output", exported,
                             "--overwrite"])
  result.update(export_seconds=round(seconds, 1), export_peak_rss_bytes=peak,
                export_peak_over_size=round(peak / size, 2))
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()

"""Model throughput: train step (fwd + bwd + AdamW) and inference clips/s, TFLOP/s, MFU.

  python benchmarks/model_throughput.py                       # B/16 and L/14, 8x224, bf16
  python benchmarks/model_throughput.py --models b16 --train_batch 32 --infer_batch 64 \
      --attention xla,cudnn --remat none

Uint8 clips go to the device and are normalised there, as in training. Prints one
table naming the device. On CPU use --tiny (a small model) unless you have hours.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from uniformerv2_jax import UniFormerV2, layers, model_config
from uniformerv2_jax.flops import device_peak_flops, inference_flops_per_clip, train_flops_per_clip

TINY = dict(input_resolution=64, patch_size=16, width=192, layers=4, heads=3,
            return_list=(2, 3), n_head=3, t_size=8)


def normalize(video):
  """uniformerv2_jax.data.normalize's arithmetic, without importing the data package (PyAV,
  TensorFlow), which a bare GPU machine may lack."""
  return (video.astype(jnp.float32) - 114.75) / 57.375


def build(name, args, attention, remat):
  overrides = TINY if name == "tiny" else {}
  cfg = model_config(None if name == "tiny" else name, **overrides, num_classes=400,
                     dtype=args.dtype, scan_layers=args.scan, remat=remat, attention=attention)
  return cfg, UniFormerV2(cfg, rngs=nnx.Rngs(0))


def make_train_step(graphdef, tx):
  def train_step(state, opt_state, video, label, key):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, state["rest"])
      logits = model(normalize(video).astype(model.config.dtype), train=True, key=key)
      return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, opt_state, state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(params=params, rest=state["rest"]), opt_state, loss
  return jax.jit(train_step, donate_argnums=(0, 1))


def make_infer_step(graphdef):
  def infer(state, video):
    model = nnx.merge(graphdef, state["params"], state["rest"])
    return jax.nn.softmax(model(normalize(video).astype(model.config.dtype)))
  return jax.jit(infer)


def timed(fn, steps):
  out = fn()
  jax.block_until_ready(out)  # compile + warm-up
  out = fn()
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def prepare(name, mode, batch, args, attention="auto", remat="none"):
  """(config, compiled step, a function running it once, FLOPs per clip) on random clips."""
  cfg, model = build(name, args, attention, remat)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = dict(params=params, rest=rest)
  res = cfg.input_resolution
  rng = np.random.default_rng(0)
  video = jax.device_put(rng.integers(0, 256, (batch, cfg.t_size, res, res, 3), np.uint8))
  if mode != "train":
    compiled = make_infer_step(graphdef).lower(state, video).compile()
    return cfg, compiled, lambda: compiled(state, video), inference_flops_per_clip(cfg)
  label = jax.device_put(rng.integers(0, 400, (batch,)).astype(np.int32))
  tx = optax.adamw(1e-5, weight_decay=0.05)
  holder = dict(state=state, opt=tx.init(params), key=jax.random.key(0))
  compiled = make_train_step(graphdef, tx).lower(
      state, holder["opt"], video, label, holder["key"]).compile()

  def run():
    holder["key"], k = jax.random.split(holder["key"])
    holder["state"], holder["opt"], loss = compiled(holder["state"], holder["opt"], video, label, k)
    return loss
  return cfg, compiled, run, train_flops_per_clip(cfg)


def bench_one(name, mode, batch, attention, remat, dpe, args):
  layers.DEPTHWISE_IMPL = dpe
  t_compile = time.perf_counter()
  _, _, run, flops = prepare(name, mode, batch, args, attention, remat)
  jax.block_until_ready(run())
  t_compile = time.perf_counter() - t_compile
  sec = timed(run, args.steps)
  clips = batch / sec
  peak = device_peak_flops()
  return dict(model=name, mode=mode, batch=batch, attention=attention, remat=remat,
              dpe=dpe, compile_s=t_compile, step_ms=sec * 1e3, clips_s=clips,
              tflops=clips * flops / 1e12 / jax.device_count(),
              mfu=None if peak is None else clips * flops / jax.device_count() / peak)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default="b16,l14")
  p.add_argument("--modes", default="train,inference")
  p.add_argument("--train_batch", default="32", help="comma list, e.g. 32,64")
  p.add_argument("--infer_batch", default="64")
  p.add_argument("--l14_train_batch", default="8,24", help="24: the best measured on an H100")
  p.add_argument("--l14_infer_batch", default="32")
  p.add_argument("--attention", default="auto", help="auto|xla|cudnn (comma list)")
  p.add_argument("--remat", default="none")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--scan", action="store_true")
  p.add_argument("--dpe", default=layers.DEPTHWISE_IMPL,
                 help="depthwise conv of the global blocks: conv|shift (comma list)")
  p.add_argument("--attn_pad", type=int, default=layers.TOKEN_PAD_MULTIPLE["cudnn"],
                 help="cuDNN attention pads tokens to a multiple of this (1: no padding)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--tiny", action="store_true", help="a small model, for CPU smoke runs")
  args = p.parse_args()
  layers.TOKEN_PAD_MULTIPLE["cudnn"] = args.attn_pad
  models = ["tiny"] if args.tiny else args.models.split(",")
  ints = lambda s: [int(b) for b in s.split(",")]
  rows = []
  for name, mode, attention, remat, dpe in itertools.product(
      models, args.modes.split(","), args.attention.split(","), args.remat.split(","),
      args.dpe.split(",")):
    big = name.startswith("l14")
    key = ("l14_" if big else "") + ("train_batch" if mode == "train" else "infer_batch")
    for batch in ints(getattr(args, key)):
      try:
        rows.append(bench_one(name, mode, batch, attention, remat, dpe, args))
      except Exception as e:  # noqa: BLE001 - report and keep benchmarking the rest
        rows.append(dict(model=name, mode=mode, batch=batch, attention=attention, remat=remat,
                         dpe=dpe, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
      print(rows[-1], flush=True)
  dev = jax.devices()[0]
  print(f"\nDevice: {jax.device_count()} x {dev.device_kind} ({dev.platform}), "
        f"jax {jax.__version__}, dtype {args.dtype}, scan={args.scan}, attn_pad={args.attn_pad}; "
        f"MFU vs peak {device_peak_flops()}")
  print("| model | mode | batch | attention | remat | dpe | clips/s | step ms | TFLOP/s/dev | MFU "
        "| compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    head = (f"| {r['model']} | {r['mode']} | {r['batch']} | {r['attention']} | {r['remat']} | "
            f"{r['dpe']} |")
    if "error" in r:
      print(f"{head} {r['error']} | | | | |")
      continue
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(f"{head} {r['clips_s']:.1f} | {r['step_ms']:.1f} | {r['tflops']:.1f} | {mfu} | "
          f"{r['compile_s']:.1f} |")


if __name__ == "__main__":
  main()

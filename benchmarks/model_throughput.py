"""Model throughput: train step (fwd + bwd + optimiser) and inference clips/s, TFLOP/s, MFU.

  python benchmarks/model_throughput.py                       # B/16 and L/14, 8x224, bf16
  python benchmarks/model_throughput.py --models b16 --train_batch 32 --infer_batch 64 \
      --attention xla,cudnn --remat none,full --step recipe,bare

The train step is, by default, the one train.py runs (`--step recipe`): the model's K710 recipe
(configs/k710_*.py, its optimiser: gradient clipping, AdamW with the weight-decay mask, the
schedule; the train metrics), jitted with the state's shardings over all devices and donated.
`--step bare` times forward + backward + plain AdamW only, the step of issue 7's upstream table
(and of this project's GPU numbers before the recipe step was benchmarked). RandAugment runs on
the host in the recipes and is left out (`--randaugment crops` adds it to the step, as
`--config.input.randaugment_on=crops` does). Inference is eval.py's step (`Evaluator`). Uint8
clips go to the device once and are normalised there, as in training. Needs ml_collections
(the recipe configs). Prints one table naming the device. On CPU use --tiny (a small model)
unless you have hours.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import argparse
import dataclasses
import importlib
import itertools
import time

import jax
import numpy as np
import optax
from flax import nnx

from uniformerv2_jax import layers
from uniformerv2_jax import sharding as shd
from uniformerv2_jax.data import normalize  # JAX only: no PyAV, no TensorFlow
from uniformerv2_jax.flops import device_peak_flops, inference_flops_per_clip, train_flops_per_clip

TINY = dict(input_resolution=64, patch_size=16, width=192, layers=4, heads=3,
            return_list=(2, 3), n_head=3, t_size=8)
RECIPES = {"b16": "configs.k710_b16", "l14": "configs.k710_l14", "l14_336": "configs.k710_l14_336",
           "tiny": "configs.k710_b16"}


def recipe_config(name, batch, args, attention, remat):
  """The K710 recipe of `name` on fake data, `batch` clips a step, with the benchmark's knobs
  (remat "recipe" and remat_blocks None keep the recipe's)."""
  config = importlib.import_module(RECIPES[name]).get_config()
  config.model.update(dtype=args.dtype, scan_layers=args.scan, attention=attention,
                      **(TINY if name == "tiny" else {}))
  if remat != "recipe":
    config.model.remat = remat
  if args.remat_blocks is not None:
    config.model.remat_blocks = args.remat_blocks
  if name == "tiny":
    config.input.crop_size = TINY["input_resolution"]
  config.dataset.name = "fake"
  config.init_from = None
  config.train.global_batch_size = batch
  config.input.randaugment_on = "crops"
  config.input.randaugment = args.randaugment == "crops"
  return config


def bare_train_step(graphdef, tx):
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


def _clips(cfg, batch, sharding=None):
  rng = np.random.default_rng(0)
  res = cfg.input_resolution
  video = rng.integers(0, 256, (batch, cfg.t_size, res, res, 3), np.uint8)
  label = rng.integers(0, cfg.num_classes, (batch,)).astype(np.int32)
  put = lambda x, k: jax.device_put(x, (sharding or {}).get(k))
  return put(video, "video"), put(label, "label")


def prepare(name, mode, batch, args, attention="auto", remat="recipe", step="recipe"):
  """(config, compiled step, a function running it once, FLOPs per clip) on random clips."""
  from uniformerv2_jax.training import config_check
  from uniformerv2_jax.training.state import create_train_state
  from uniformerv2_jax.training.step import setup_training
  config = recipe_config(name, batch, args, attention, remat)
  cfg = config_check.check(config)
  mesh = shd.make_mesh({a: config.mesh[a] for a in shd.MESH_AXES})
  if mode != "train":
    return (cfg, *_inference(cfg, mesh, batch), inference_flops_per_clip(cfg))
  if step == "bare":
    return (cfg, *_bare_train(cfg, batch), train_flops_per_clip(cfg))
  setup = setup_training(config, cfg, mesh, total_steps=1000, steps_per_epoch=100)
  state, _ = create_train_state(setup.mdef, setup.tx, mesh, seed=0, frozen=cfg.frozen)
  video, label = _clips(cfg, batch, setup.batch_shardings)
  batch_ = {"video": video, "label": label}
  compiled = setup.train_step.lower(state, batch_).compile()
  holder = dict(state=state)

  def run():
    holder["state"], metrics = compiled(holder["state"], batch_)
    return metrics["loss"]
  return cfg, compiled, run, train_flops_per_clip(cfg)


def _inference(cfg, mesh, batch):
  from uniformerv2_jax.evaluation.runner import Evaluator
  from uniformerv2_jax.model import UniFormerV2
  evaluator = Evaluator(UniFormerV2(cfg, rngs=nnx.Rngs(0)), mesh)
  video, _ = _clips(cfg, batch, {"video": shd.batch_sharding(mesh, 5)})
  compiled = evaluator.step.lower(evaluator.state, video).compile()
  return compiled, lambda: compiled(evaluator.state, video)


def _bare_train(cfg, batch):
  from uniformerv2_jax.model import UniFormerV2
  cfg = dataclasses.replace(cfg, num_classes=400)  # as measured before the recipe step
  graphdef, params, rest = nnx.split(UniFormerV2(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  video, label = _clips(cfg, batch)
  tx = optax.adamw(1e-5, weight_decay=0.05)
  holder = dict(state=dict(params=params, rest=rest), opt=tx.init(params), key=jax.random.key(0))
  compiled = bare_train_step(graphdef, tx).lower(
      holder["state"], holder["opt"], video, label, holder["key"]).compile()

  def run():
    holder["key"], k = jax.random.split(holder["key"])
    holder["state"], holder["opt"], loss = compiled(holder["state"], holder["opt"], video, label, k)
    return loss
  return compiled, run


def bench_one(name, mode, batch, attention, remat, dpe, step, args):
  layers.DEPTHWISE_IMPL = dpe
  t_compile = time.perf_counter()
  cfg, _, run, flops = prepare(name, mode, batch, args, attention, remat, step)
  jax.block_until_ready(run())
  t_compile = time.perf_counter() - t_compile
  sec = timed(run, args.steps)
  clips = batch / sec
  peak = device_peak_flops()
  devices = 1 if step == "bare" and mode == "train" else jax.device_count()  # bare: unsharded
  remat = cfg.remat + (f" (first {cfg.remat_blocks})"
                       if cfg.remat != "none" and cfg.remat_blocks >= 0 else "")
  return dict(model=name, mode=mode, step=step if mode == "train" else "eval", batch=batch,
              devices=devices, attention=attention, remat=remat, dpe=dpe, compile_s=t_compile,
              step_ms=sec * 1e3, clips_s=clips, tflops=clips * flops / 1e12 / devices,
              mfu=None if peak is None else clips * flops / devices / peak)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default="b16,l14", help="b16|l14|l14_336 (comma list)")
  p.add_argument("--modes", default="train,inference")
  p.add_argument("--step", default="recipe", help="train step: recipe|bare (comma list)")
  p.add_argument("--train_batch", default="32", help="comma list, e.g. 32,64")
  p.add_argument("--infer_batch", default="64")
  p.add_argument("--l14_train_batch", default="8,24", help="24: the best measured on an H100")
  p.add_argument("--l14_infer_batch", default="32")
  p.add_argument("--attention", default="auto", help="auto|xla|cudnn (comma list)")
  p.add_argument("--remat", default="recipe",
                 help="recipe (the recipe's: none, full for L/14@336)|none|full|... (comma list)")
  p.add_argument("--remat_blocks", type=int, default=None,
                 help="remat only the first N backbone blocks (-1: all; default: the recipe's)")
  p.add_argument("--randaugment", default="none", choices=("none", "crops"),
                 help="crops: RandAugment on the device inside the train step")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--scan", action="store_true")
  p.add_argument("--dpe", default=layers.DEPTHWISE_IMPL,
                 help="depthwise conv of the global blocks: conv|shift (comma list)")
  p.add_argument("--attn_pad", type=int, default=layers.TOKEN_PAD_MULTIPLE["cudnn"],
                 help="cuDNN attention pads tokens to a multiple of this (1: no padding)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--tiny", action="store_true", help="a small model, for CPU smoke runs")
  args = p.parse_args()
  steps = args.step.split(",")
  if set(steps) - {"recipe", "bare"}:
    p.error(f"--step {args.step}: use recipe, bare or both")
  layers.TOKEN_PAD_MULTIPLE["cudnn"] = args.attn_pad
  models = ["tiny"] if args.tiny else args.models.split(",")
  ints = lambda s: [int(b) for b in s.split(",")]
  rows = []
  for name, mode, attention, remat, dpe in itertools.product(
      models, args.modes.split(","), args.attention.split(","), args.remat.split(","),
      args.dpe.split(",")):
    big = name.startswith("l14")
    key = ("l14_" if big else "") + ("train_batch" if mode == "train" else "infer_batch")
    for batch, step in itertools.product(ints(getattr(args, key)),
                                         steps if mode == "train" else ["-"]):
      try:
        rows.append(bench_one(name, mode, batch, attention, remat, dpe, step, args))
      except Exception as e:  # noqa: BLE001 - report and keep benchmarking the rest
        rows.append(dict(model=name, mode=mode, step=step if mode == "train" else "eval",
                         batch=batch, devices="-", attention=attention,
                         remat=remat, dpe=dpe,
                         error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
      print(rows[-1], flush=True)
  dev = jax.devices()[0]
  print(f"\nDevice: {jax.device_count()} x {dev.device_kind} ({dev.platform}), "
        f"jax {jax.__version__}, dtype {args.dtype}, scan={args.scan}, attn_pad={args.attn_pad}, "
        f"randaugment={args.randaugment}; "
        f"MFU vs peak {device_peak_flops()}")
  print("| model | mode | step | batch | devices | attention | remat | dpe | clips/s | step ms "
        "| TFLOP/s/dev | MFU | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    head = (f"| {r['model']} | {r['mode']} | {r['step']} | {r['batch']} | {r['devices']} | "
            f"{r['attention']} | {r['remat']} | {r['dpe']} |")
    if "error" in r:
      print(f"{head} {r['error']} | | | | |")
      continue
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(f"{head} {r['clips_s']:.1f} | {r['step_ms']:.1f} | {r['tflops']:.1f} | {mfu} | "
          f"{r['compile_s']:.1f} |")


if __name__ == "__main__":
  main()

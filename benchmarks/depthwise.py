"""The DPE's depthwise 3x3x3 convolution alone, at the global blocks' shapes, bfloat16.

  python benchmarks/depthwise.py --shapes b16,l14

Rows: the implementations `layers.depthwise_conv3d` offers ("conv": XLA/cuDNN grouped
convolution; "shift": fused shifted sums in float32 with the hand-written input gradient),
JAX's own derivative of the float32 shifted sums ("shift_autodiff"), the bfloat16 running
sums the model used before ("shift_bf16", kept here as the speed reference), and "shift"
with its kernel gradient written as one explicit float32 reduction a tap ("shift_dk_taps").
Times the forward, forward + input gradient, and forward + all gradients, and counts the
elements of the output and the input gradient that differ from the exact result rounded
once to bfloat16 (float64 on the host). Prints one table naming the device, a row at a time.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.attention import timed
from uniformerv2_jax import layers

SHAPES = {"b16": (32, 8, 14, 14, 768), "l14": (24, 8, 16, 16, 1024),
          "tiny": (2, 8, 14, 14, 64)}  # tiny: a CPU smoke run


def _bf16_sums(x, kernel, bias):
  """The model's summation before the float32 sums: every product and partial sum bfloat16."""
  t, h, w = x.shape[1:4]
  xp = jnp.pad(x, layers._same(kernel.shape))
  out = None
  for a, b, d in itertools.product(*(range(k) for k in kernel.shape[:3])):
    term = xp[:, a:a + t, b:b + h, d:d + w] * kernel[a, b, d]
    out = term if out is None else out + term
  return out + bias


@jax.custom_vjp
def _dk_taps(x, kernel, bias):
  return layers._shifted_conv_fwd(x, kernel, bias)[0]


def _dk_taps_bwd(residuals, g):
  x, kernel, bias = residuals
  dx, _, db = layers._shifted_conv_bwd(residuals, g)
  t, h, w = x.shape[1:4]
  xp = jnp.pad(x, layers._same(kernel.shape))
  dk = jnp.stack([
      jnp.sum(xp[:, a:a + t, b:b + h, d:d + w].astype(jnp.float32) * g.astype(jnp.float32),
              axis=(0, 1, 2, 3))
      for a, b, d in itertools.product(*(range(k) for k in kernel.shape[:3]))])
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype), db


_dk_taps.defvjp(layers._shifted_conv_fwd, _dk_taps_bwd)

VARIANTS = {
    "conv": lambda x, k, b: layers.depthwise_conv3d(x, k, b, impl="conv"),
    "shift": lambda x, k, b: layers.depthwise_conv3d(x, k, b, impl="shift"),
    "shift_autodiff": lambda x, k, b: layers._shifted_conv_fwd(x, k, b)[0],
    "shift_bf16": _bf16_sums,
    "shift_dk_taps": _dk_taps,
}


def exact(x, kernel, bias, g):
  """float64 output, input and kernel gradients on the host (numpy), from the bfloat16 values."""
  x, kernel, bias, g = (np.asarray(a, np.float64) for a in (x, kernel, bias, g))
  t, h, w = x.shape[1:4]
  pads = layers._same(kernel.shape)
  xp, gp = np.pad(x, pads), np.pad(g, pads)
  out, dx, dk = np.zeros_like(x) + bias, np.zeros_like(x), np.zeros_like(kernel)
  flip = kernel[::-1, ::-1, ::-1]
  for a, b, d in itertools.product(*(range(k) for k in kernel.shape[:3])):
    out += xp[:, a:a + t, b:b + h, d:d + w] * kernel[a, b, d]
    dx += gp[:, a:a + t, b:b + h, d:d + w] * flip[a, b, d]
    dk[a, b, d] = np.einsum("nthwc,nthwc->c", xp[:, a:a + t, b:b + h, d:d + w], g)
  return out, dx, dk


def off_share(value, reference):
  once = np.asarray(jnp.asarray(reference, jnp.float32).astype(jnp.bfloat16), np.float64)
  return float(np.mean(np.asarray(value, np.float64) != once))


def inputs(shape):
  """bfloat16 input, kernel, bias and output gradient; float64 references on one clip."""
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], shape, jnp.bfloat16)
  kernel = (jax.random.normal(keys[1], (3, 3, 3, shape[-1])) / 5).astype(jnp.bfloat16)
  bias = (jax.random.normal(keys[2], (shape[-1],)) / 5).astype(jnp.bfloat16)
  g = jax.random.normal(keys[3], shape, jnp.bfloat16)
  return (x, kernel, bias, g), exact(x[:1], kernel, bias, g[:1])


def bench(name, tensors, refs, steps):
  x, kernel, bias, g = tensors
  fn = VARIANTS[name]
  # The output is returned with the gradients, as training keeps it: gradients alone of a loss
  # linear in the output would not need the forward, and XLA would drop it.
  def fwd_dx(x, k, b, g):
    out, vjp = jax.vjp(lambda x: fn(x, k, b), x)
    return out, vjp(g)

  def fwd_all(x, k, b, g):
    out, vjp = jax.vjp(fn, x, k, b)
    return out, vjp(g)

  fwd, dx_only, grads = jax.jit(fn), jax.jit(fwd_dx), jax.jit(fwd_all)
  row = dict(fwd=timed(fwd, x, kernel, bias, steps=steps),
             dx=timed(dx_only, x, kernel, bias, g, steps=steps),
             all=timed(grads, x, kernel, bias, g, steps=steps))
  out = fwd(x[:1], kernel, bias)
  dx, dk, _ = grads(x[:1], kernel, bias, g[:1])[1]
  dk_err = np.linalg.norm(np.asarray(dk, np.float64) - refs[2]) / np.linalg.norm(refs[2])
  return dict(row, out_off=off_share(out, refs[0]), dx_off=off_share(dx, refs[1]), dk_err=dk_err)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--shapes", default="b16,l14", help=f"comma list of {sorted(SHAPES)}")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--steps", type=int, default=10)
  args = p.parse_args()
  dev = jax.devices()[0]
  print(f"Device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; bfloat16, "
        "3x3x3 kernel; 'off': share of elements (one clip) not equal to the exact result "
        "rounded once; dk err: the kernel gradient's relative error")
  print("| shape | variant | fwd ms | fwd+dx ms | fwd+all grads ms | out off | dx off | dk err |")
  print("|---|---|---|---|---|---|---|---|", flush=True)
  for shape_name in args.shapes.split(","):
    tensors, refs = inputs(SHAPES[shape_name])
    for name in args.variants.split(","):  # each row as it is measured: a cut run keeps them
      r = bench(name, tensors, refs, args.steps)
      print(f"| {shape_name} | {name} | {r['fwd']:.2f} | {r['dx']:.2f} | {r['all']:.2f} | "
            f"{100 * r['out_off']:.2f}% | {100 * r['dx_off']:.3f}% | {r['dk_err']:.1e} |",
            flush=True)


if __name__ == "__main__":
  main()

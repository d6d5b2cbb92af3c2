"""Self-attention alone at the backbone's shapes: XLA vs cuDNN, and how cuDNN is padded.

  python benchmarks/attention.py --batch 256 --seq 197 --heads 12 --head_dim 64

Rows: XLA (einsum + float32 softmax), then cuDNN with the tokens padded to a multiple
of 64, 16, 8 or not at all (padding masked through the sequence lengths; unpadded is what
evaluation runs). Times the forward and the forward + backward, and checks each result
against XLA in float32. Prints one table naming the device. On an H100 (JAX 0.11.2)
cuDNN rejected the unpadded backward of 197 and 257 tokens (odd lengths).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import argparse
import time

import jax
import jax.numpy as jnp

from uniformerv2_jax import layers


def timed(fn, *args, steps=20):
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps * 1e3


def _bench_variant(impl, multiple, tensors, refs, seq):
  """(forward ms, forward+backward ms, max relative error) or (None, None, error message).

  cuDNN variants get inputs already padded to `multiple` (as the model's projections
  produce them) and mask the padding; multiple 1 is the unpadded call evaluation makes.
  """
  q, k, v, g = tensors
  pad = 0
  if multiple is not None:
    layers.TOKEN_PAD_MULTIPLE["cudnn"] = multiple
    pad = layers.token_padding(seq, "cudnn")
  q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
  fwd = jax.jit(lambda q, k, v: layers.attention(q, k, v, impl, valid_len=seq)[:, :seq])
  loss = lambda q, k, v: jnp.vdot(fwd(q, k, v).astype(jnp.float32), g.astype(jnp.float32))
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  rel = lambda a, b: float(jnp.linalg.norm((a.astype(jnp.float32) - b).ravel())
                           / jnp.linalg.norm(b.ravel()))
  try:
    out, grads = fwd(q, k, v), bwd(q, k, v)
    err = max([rel(out, refs[0])] + [rel(a[:, :seq], b) for a, b in zip(grads, refs[1])])
    return timed(fwd, q, k, v), timed(bwd, q, k, v), err
  except Exception as e:  # noqa: BLE001 - a rejected shape is a result too
    return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=256, help="images (clips x frames)")
  p.add_argument("--seq", type=int, default=197)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--pads", default="64,16,8,1", help="cuDNN padding multiples to try")
  args = p.parse_args()
  shape = (args.batch, args.seq, args.heads, args.head_dim)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys)
  ref = layers.attention(*(a.astype(jnp.float32) for a in (q, k, v)), "xla")
  ref_grads = jax.grad(lambda q, k, v: jnp.vdot(layers.attention(q, k, v, "xla"), g.astype(
      jnp.float32)), argnums=(0, 1, 2))(*(a.astype(jnp.float32) for a in (q, k, v)))
  rows = []
  variants = [("xla", None)] + [("cudnn", int(m)) for m in args.pads.split(",")]
  for impl, multiple in variants:
    name = impl if multiple is None else f"cudnn pad {multiple}"
    row = _bench_variant(impl, multiple, (q, k, v, g), (ref, ref_grads), args.seq)
    rows.append((name, *row))
    print(rows[-1], flush=True)
  dev = jax.devices()[0]
  print(f"\nDevice: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; "
        f"q/k/v {shape} bfloat16")
  print("| attention | forward ms | forward+backward ms | max rel. error vs float32 |")
  print("|---|---|---|---|")
  for name, f, b, err in rows:
    if f is None:
      print(f"| {name} | {err} | | |")
    else:
      print(f"| {name} | {f:.2f} | {b:.2f} | {err:.1e} |")


if __name__ == "__main__":
  main()

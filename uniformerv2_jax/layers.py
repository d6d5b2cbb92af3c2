"""Small building blocks with PyTorch numerics and logical axis names.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (one name per
dimension, None for replicated), which `uniformerv2_jax.sharding` maps onto a mesh.
Parameters are stored in `param_dtype`; computation runs in `dtype`, except norms
and softmax, which never run below float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def compute_dtype_at_least_f32(dtype) -> jnp.dtype:
  """float32 for low-precision compute; float64 stays float64."""
  return jnp.promote_types(dtype, jnp.float32)


def precision(dtype):
  """Full-precision matmuls for float32/float64 compute (GPUs default to TF32), fast ones below."""
  return (jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4
          else jax.lax.Precision.DEFAULT)


def uniform(bound: float):
  """U(-bound, bound): PyTorch's default Linear/Conv init has bound 1/sqrt(fan_in)."""
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def xavier_bound(fan_in: int, fan_out: int) -> float:
  return math.sqrt(6.0 / (fan_in + fan_out))


def param(rngs: nnx.Rngs | None, init, shape, dtype, axes) -> nnx.Param:
  value = jnp.zeros(shape, dtype) if init is None else init(rngs.params(), shape, dtype)
  assert len(axes) == len(shape), (axes, shape)
  return nnx.Param(value, logical_axes=tuple(axes))


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm (eps 1e-5), computed in at least float32."""

  def __init__(self, dim: int, *, param_dtype, dtype, axis_name="embed"):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(axis_name,))
    self.dtype = dtype

  def __call__(self, x):
    ct = compute_dtype_at_least_f32(x.dtype)
    x32 = x.astype(ct)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5)
    y = y * self.scale[...].astype(ct) + self.bias[...].astype(ct)
    return y.astype(self.dtype)


class Dense(nnx.Module):
  """y = x @ kernel + bias, with `kernel` of shape (in, *out) (torch's weight.T)."""

  def __init__(self, d_in: int, d_out, *, rngs, param_dtype, dtype, axes,
               kernel_init=None, bias_init=None, use_bias=True):
    d_out = tuple(d_out) if isinstance(d_out, (tuple, list)) else (d_out,)
    torch_default = uniform(1.0 / math.sqrt(d_in))
    self.kernel = param(rngs, torch_default if kernel_init == "torch" else kernel_init,
                        (d_in, *d_out), param_dtype, axes)
    self.bias = (param(rngs, torch_default if bias_init == "torch" else bias_init,
                       d_out, param_dtype, axes[1:]) if use_bias else None)
    self.dtype = dtype

  def __call__(self, x):
    kernel = self.kernel[...].astype(self.dtype)
    y = jnp.tensordot(x.astype(self.dtype), kernel, axes=((x.ndim - 1,), (0,)),
                      precision=precision(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def drop_path(x, rate, key, mask_shape):
  """timm DropPath (scaled by 1/keep): one Bernoulli per element of `mask_shape`.

  `rate` may be a traced scalar (per-layer rates under scan). `mask_shape` is
  broadcast against x; the caller chooses it to match the upstream's semantics.
  """
  if key is None or (isinstance(rate, (int, float)) and rate == 0):
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, mask_shape)
  return jnp.where(mask, x / jnp.maximum(keep, 1e-12).astype(x.dtype), jnp.zeros_like(x))


def dropout(x, rate: float, key):
  if key is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def attention(q, k, v, impl: str = "xla"):
  """Multi-head attention on (B, S, H, D) tensors, softmax in >= float32."""
  if impl == "cudnn":
    return _cudnn_attention(q, k, v)
  scale = 1.0 / math.sqrt(q.shape[-1])
  prec = precision(q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k, precision=prec)
  ct = compute_dtype_at_least_f32(logits.dtype)
  probs = jax.nn.softmax(logits.astype(ct), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=prec)


def _cudnn_attention(q, k, v, multiple: int = 64):
  """cuDNN flash attention; pads the key/query length to a multiple of 64 with a mask."""
  s_q, s_k = q.shape[1], k.shape[1]
  pad_q, pad_k = -s_q % multiple, -s_k % multiple
  if pad_q or pad_k:
    q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
  b = q.shape[0]
  out = jax.nn.dot_product_attention(
      q, k, v, implementation="cudnn",
      query_seq_lengths=jnp.full((b,), s_q, jnp.int32),
      key_value_seq_lengths=jnp.full((b,), s_k, jnp.int32))
  return out[:, :s_q]


# How depthwise 3-D convolutions run: "conv" (XLA/cuDNN grouped convolution) or "shift"
# (a sum of shifted, scaled copies, which XLA fuses into one loop). Same numbers.
DEPTHWISE_IMPL = "shift"  # measured faster on H100 (benchmarks/model_throughput.py --dpe)


def depthwise_conv3d(x, kernel, impl=None):
  """Depthwise 3-D cross-correlation, 'same' padding. x: (N, T, H, W, C); kernel (kt, kh, kw, C)."""
  impl = impl or DEPTHWISE_IMPL
  kt, kh, kw, c = kernel.shape
  pads = ((0, 0), (kt // 2, kt // 2), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0))
  if impl == "conv":
    return jax.lax.conv_general_dilated(
        x, kernel[..., None, :], window_strides=(1, 1, 1), padding=pads[1:4],
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), feature_group_count=c,
        precision=precision(x.dtype))
  _, t, h, w, _ = x.shape
  xp = jnp.pad(x, pads)
  out = None
  for a in range(kt):
    for b in range(kh):
      for d in range(kw):
        term = xp[:, a:a + t, b:b + h, d:d + w] * kernel[a, b, d]
        out = term if out is None else out + term
  return out

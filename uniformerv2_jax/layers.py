"""Small building blocks with PyTorch numerics and logical axis names.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (one name per
dimension, None for replicated), which `uniformerv2_jax.sharding` maps onto a mesh.
Parameters are stored in `param_dtype`; computation runs in `dtype`, except norms
and softmax, which never run below float32.
"""

from __future__ import annotations

import functools
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
    return layer_norm(x, self.scale[...], self.bias[...], jnp.dtype(self.dtype))


def _layer_norm_stats(x32):
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return mean, jax.lax.rsqrt(var + 1e-5)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, dtype):
  """LayerNorm over the last axis in >= float32, returned in `dtype`.

  Its backward (below) is written out by hand: it keeps only x and two numbers per
  row from the forward and reads x and the cotangent a couple of times, where
  differentiating the float32 forward kept and re-read several float32 copies of
  the activations.
  """
  return _layer_norm_fwd(x, scale, bias, dtype)[0]


def _layer_norm_fwd(x, scale, bias, dtype):
  ct = compute_dtype_at_least_f32(x.dtype)
  x32 = x.astype(ct)
  mean, rstd = _layer_norm_stats(x32)
  y = (x32 - mean) * rstd * scale.astype(ct) + bias.astype(ct)
  return y.astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(dtype, residuals, g):
  """On a (rows, C) view: XLA then reduces the scale/bias gradients over one row axis
  instead of transposing float32 copies of the activations first (measured on an H100:
  B/16 train step 94.5 -> 86.1 ms)."""
  x, mean, rstd, scale, bias = residuals
  ct = mean.dtype
  rows = lambda a: a.reshape(-1, a.shape[-1]).astype(ct)
  g32 = rows(g)
  xhat = (rows(x) - rows(mean)) * rows(rstd)
  gx = g32 * scale.astype(ct)
  dx = rows(rstd) * (gx - gx.mean(-1, keepdims=True)
                     - xhat * (gx * xhat).mean(-1, keepdims=True))
  return (dx.reshape(x.shape).astype(x.dtype), (g32 * xhat).sum(0).astype(scale.dtype),
          g32.sum(0).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


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
  """CLIP's x * sigmoid(1.702 x), rounded like PyTorch does in 16-bit dtypes: each op in
  float32, its result rounded to x's dtype (bitwise equal to torch's bf16 result; a bf16
  constant would have been 1.703)."""
  ct = compute_dtype_at_least_f32(x.dtype)
  scaled = (x.astype(ct) * 1.702).astype(x.dtype)
  return x * jax.nn.sigmoid(scaled.astype(ct)).astype(x.dtype)


def drop_path(x, rate, key, mask_shape, groups: int = 1):
  """timm DropPath (scaled by 1/keep): one Bernoulli per element of `mask_shape`.

  `rate` may be a traced scalar (per-layer rates under scan). `mask_shape` is
  broadcast against x; the caller chooses it to match the upstream's semantics.
  `groups` > 1 splits x's leading axis into that many consecutive groups, each with its
  own mask (the upstream drew one per GPU); `mask_shape` then has 1 on that axis.
  """
  if key is None or (isinstance(rate, (int, float)) and rate == 0):
    return x
  keep = 1.0 - rate
  if groups > 1:
    grouped = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    return drop_path(grouped, rate, key, (groups, *mask_shape)).reshape(x.shape)
  # float32 p: the same draws whether the rate is a Python float (loop) or a traced float32
  # (scan), also under jax_enable_x64
  mask = jax.random.bernoulli(key, jnp.asarray(keep, jnp.float32), mask_shape)
  return jnp.where(mask, x / jnp.maximum(keep, 1e-12).astype(x.dtype), jnp.zeros_like(x))


def replica_groups(batch: int, replica_batch: int) -> int:
  """How many upstream GPU replicas `batch` clips make (ModelConfig.replica_batch; 0: one)."""
  if not replica_batch:
    return 1
  if batch % replica_batch:
    raise ValueError(f"replica_batch={replica_batch} does not divide the batch of {batch} "
                     "clips; use a divisor of the (micro-)batch, or 0 for one group")
  return batch // replica_batch


def dropout(x, rate: float, key):
  if key is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, x.shape)
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


# Tokens are padded to a multiple of this before cuDNN attention (cuDNN's backward
# rejects odd lengths such as 197 and 257); the padding is masked through the sequence
# lengths. Measured on an H100 (benchmarks/attention.py): 8 beats 64 (B/16 fwd+bwd
# 1.19 vs 1.34 ms a layer; L/14 1.23 vs 1.31). XLA attention needs no padding.
TOKEN_PAD_MULTIPLE = {"xla": 1, "cudnn": 8}


def attention_impl(name: str, dtype, head_dim: int) -> str:
  """Resolves "auto": cuDNN flash attention where it runs (NVIDIA GPU of compute capability
  >= 8.0, 16-bit compute, head dim a multiple of 8 up to 128), XLA everywhere else."""
  if name != "auto":
    return name
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "xla"
  if head_dim % 8 or head_dim > 128:
    return "xla"
  device = jax.devices()[0]
  if device.platform != "gpu":
    return "xla"
  try:  # CUDA reports "8.0", "9.0", ...; other GPUs report something else or nothing
    return "cudnn" if float(device.compute_capability) >= 8.0 else "xla"
  except (AttributeError, TypeError, ValueError):
    return "xla"


def token_padding(seq_len: int, impl: str) -> int:
  """How many padding tokens `attention(impl)` wants after `seq_len` real ones."""
  return -seq_len % TOKEN_PAD_MULTIPLE[impl]


def attention(q, k, v, impl: str = "xla", valid_len: int | None = None):
  """Multi-head attention on (B, S, H, D) tensors, softmax in >= float32.

  `valid_len` (self-attention over padded tokens): only the first valid_len keys are
  real, the rest is masked out; rows of padded queries are left for the caller to drop.
  """
  s_k = k.shape[1]
  valid_len = s_k if valid_len is None else valid_len
  if impl == "cudnn":
    return _cudnn_attention(q, k, v, valid_len)
  scale = 1.0 / math.sqrt(q.shape[-1])
  prec = precision(q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k, precision=prec)
  ct = compute_dtype_at_least_f32(logits.dtype)
  logits = logits.astype(ct)
  if valid_len < s_k:
    logits = jnp.where(jnp.arange(s_k) < valid_len, logits, jnp.finfo(ct).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=prec)


def _fused(q, k, v, q_len=None, kv_len=None):
  """The cuDNN kernel; with lengths, later keys are masked and later query rows unspecified.

  The one call into cuDNN: tests substitute a masked XLA attention here to run the
  "cudnn" path's padding logic on a CPU.
  """
  if q_len is None:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  b = q.shape[0]
  return jax.nn.dot_product_attention(
      q, k, v, implementation="cudnn", query_seq_lengths=jnp.full((b,), q_len, jnp.int32),
      key_value_seq_lengths=jnp.full((b,), kv_len, jnp.int32))


def _cudnn_attention(q, k, v, valid_len):
  """cuDNN flash attention (bf16/fp16).

  Unpadded tokens of an odd count (197, 257) run as they are: cuDNN's forward accepts
  them and is faster there than on padded ones (B/16 inference 1091 vs 1056 clips/s on
  an H100); its backward does not, so differentiating recomputes through the padded
  kernel. Training pads once upstream (see Block) and lands in `_padded_fused`.
  """
  s_q, s_k = q.shape[1], k.shape[1]
  if valid_len == s_q == s_k:
    return _unpadded_fused(q, k, v) if token_padding(s_q, "cudnn") else _fused(q, k, v)
  return _padded_fused(q, k, v, valid_len)


def _padded_fused(q, k, v, valid_len):
  """Pads the token axes to the cuDNN multiple; padded keys masked through the key length.

  Every query row, padding included, is declared valid: cuDNN leaves the output of rows
  past the query length unspecified, and a NaN there would reach the out-projection's
  weight gradient (as 0 * NaN) even though the rows themselves are dropped.
  """
  s_q, s_k = q.shape[1], k.shape[1]
  pad_q, pad_k = token_padding(s_q, "cudnn"), token_padding(s_k, "cudnn")
  q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
  k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
  return _fused(q, k, v, q_len=s_q + pad_q, kv_len=valid_len)[:, :s_q]


@jax.custom_vjp
def _unpadded_fused(q, k, v):
  return _fused(q, k, v)


def _unpadded_fused_fwd(q, k, v):
  return _fused(q, k, v), (q, k, v)


def _unpadded_fused_bwd(residuals, g):
  q, k, v = residuals
  return jax.vjp(lambda q, k, v: _padded_fused(q, k, v, q.shape[1]), q, k, v)[1](g)


_unpadded_fused.defvjp(_unpadded_fused_fwd, _unpadded_fused_bwd)


# How depthwise 3-D convolutions run: "conv" (XLA/cuDNN grouped convolution) or "shift"
# (a sum of shifted, scaled copies, which XLA fuses into one loop). Same numbers.
# Measured on an H100 (B/16 train step, bfloat16 sums): shift 102 ms vs conv 121 ms. The kernel
# gradient by hand was slower than JAX's own derivative (from the convolution's backward 104 vs
# 95 ms, from one stacked reduction 112 vs 101 ms), so it stays JAX's; the input gradient is by
# hand since the float32 sums (see _shifted_conv). On an H200 with the float32 sums, the kernel
# gradient from the convolution's backward was again slower: 97.7 vs 87.8 ms (README, Speed).
DEPTHWISE_IMPL = "shift"


def depthwise_conv3d(x, kernel, bias=None, impl=None):
  """Depthwise 3-D cross-correlation, 'same' padding (odd kernel sizes), plus bias.
  x: (N, T, H, W, C); kernel (kt, kh, kw, C); bias (C,) or None. Low-precision inputs are
  summed, bias included, in float32 and rounded once, as a convolution under autocast is."""
  impl = impl or DEPTHWISE_IMPL
  c = kernel.shape[-1]
  bias = jnp.zeros((c,), x.dtype) if bias is None else bias
  if impl == "conv":
    acc = compute_dtype_at_least_f32(x.dtype)
    out = jax.lax.conv_general_dilated(
        x, kernel[..., None, :], window_strides=(1, 1, 1), padding=_same(kernel.shape)[1:4],
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), feature_group_count=c,
        precision=precision(x.dtype), preferred_element_type=acc)
    return (out + bias.astype(acc)).astype(x.dtype)
  return _shifted_conv(x, kernel, bias)


def _same(kernel_shape):
  kt, kh, kw, _ = kernel_shape
  return ((0, 0), (kt // 2, kt // 2), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0))


def _tap_sum(xp, kernel, size):
  """sum over (a, b, d) of xp[:, a:a+t, b:b+h, d:d+w] * kernel[a, b, d], each product and
  the sum in >= float32 (unrounded); size = (t, h, w). One fused loop: the casts happen
  per slice, so no float32 copy of xp is made."""
  t, h, w = size
  acc = compute_dtype_at_least_f32(xp.dtype)
  out = None
  for a in range(kernel.shape[0]):
    for b in range(kernel.shape[1]):
      for d in range(kernel.shape[2]):
        term = xp[:, a:a + t, b:b + h, d:d + w].astype(acc) * kernel[a, b, d].astype(acc)
        out = term if out is None else out + term
  return out


# The elementwise depthwise convolutions (DPE, Local MHRA taps) sum in >= float32 and round
# once, forward and backward, as torch's kernels do under autocast: a bfloat16 running sum of
# the DPE's 27 terms was ~4x off, and so was JAX's own derivative of the per-slice casts for
# the input's gradient (it rounds each tap's share to bfloat16 before adding). Casting the
# whole input once instead cost B/16 a float32 copy, ~1 GiB a chip on v5p.
@jax.custom_vjp
def _shifted_conv(x, kernel, bias):
  return _shifted_conv_fwd(x, kernel, bias)[0]


def _shifted_conv_fwd(x, kernel, bias):
  out = _tap_sum(jnp.pad(x, _same(kernel.shape)), kernel, x.shape[1:4])
  return (out + bias.astype(out.dtype)).astype(x.dtype), (x, kernel, bias)


def _shifted_conv_bwd(residuals, g):
  x, kernel, bias = residuals
  size, acc = x.shape[1:4], compute_dtype_at_least_f32(x.dtype)
  # d/dx: the same correlation of the output's gradient with the flipped kernel
  dx = _tap_sum(jnp.pad(g, _same(kernel.shape)), kernel[::-1, ::-1, ::-1], size)
  # d/dkernel: JAX's own derivative (one float32 reduction a tap)
  xp = jnp.pad(x, _same(kernel.shape))
  dk = jax.vjp(lambda k: _tap_sum(xp, k, size), kernel)[1](g.astype(acc))[0]
  db = g.astype(acc).sum(axis=(0, 1, 2, 3))
  return dx.astype(x.dtype), dk.astype(kernel.dtype), db.astype(bias.dtype)


_shifted_conv.defvjp(_shifted_conv_fwd, _shifted_conv_bwd)


def temporal_taps(x, kernel, bias):
  """Depthwise Conv3d((3, 1, 1), padding (1, 0, 0)) over axis 1 of x (N, T, L, C): kernel
  (3, C), bias (C,); summed as the DPE's depthwise convolution."""
  n, t, length, c = x.shape
  out = _shifted_conv(x.reshape(n, t, length, 1, c), kernel.reshape(3, 1, 1, c), bias)
  return out.reshape(n, t, length, c)

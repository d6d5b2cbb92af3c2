"""UniFormerV2 in Flax NNX, numerically faithful to the original PyTorch model.

Structure (names of the parameter tree):
  backbone   CLIP ViT with optional Local MHRA: patch_embed, class_embedding,
             pos_embedding, ln_pre, blocks[i] (lmhra1, ln_1, attn, lmhra2, ln_2, mlp)
  temporal   Global MHRA: cls_token, dpe[j], dec[j], balance (absent when frozen)
  head       norm, fc

Tokens stay batch-first, (N*T, 1+H*W, C) with rows ordered video-major then time,
so none of the upstream's sequence-first transposes are needed. Upstream quirks that
affect training are kept on purpose: DropPath on the upstream's sequence-first tensors
draws one mask per token position (shared by every clip and frame) in the backbone's
attention/MLP branches, one per video in the Local MHRA branches, and one per batch in
the global blocks.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from uniformerv2_jax.config import ModelConfig
from uniformerv2_jax.layers import (Dense, LayerNorm, attention, attention_impl,
                                    depthwise_conv3d, drop_path, dropout, param, precision,
                                    quick_gelu, replica_groups, temporal_taps, token_padding,
                                    uniform, xavier_bound)


def _dtypes(cfg: ModelConfig):
  return dict(param_dtype=jnp.dtype(cfg.param_dtype), dtype=jnp.dtype(cfg.dtype))


def _split(key, n):
  return [None] * n if key is None else list(jax.random.split(key, n))


class BatchNorm(nnx.Module):
  """torch.nn.BatchNorm3d over the channel (last) axis: momentum 0.1, eps 1e-5.

  Train mode normalises with the biased batch variance and folds the UNBIASED one
  into `var`, as PyTorch does. With `axis_name`, batch statistics are averaged over
  that mapped axis (pmap/shard_map); under jit with sharded arrays they are global
  already. `replica_batch` > 0: each group of that many clips (the leading axis) takes its
  own statistics, as each GPU under the upstream's DDP; the running statistics move by
  their mean over the groups.
  """

  def __init__(self, dim, *, param_dtype, dtype, axis_name=None, replica_batch: int = 0):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("embed",))
    self.mean = nnx.BatchStat(jnp.zeros((dim,), param_dtype), logical_axes=("embed",))
    self.var = nnx.BatchStat(jnp.ones((dim,), param_dtype), logical_axes=("embed",))
    self.dtype, self.axis_name, self.replica_batch = dtype, axis_name, replica_batch

  def __call__(self, x, train: bool):
    ct = jnp.promote_types(x.dtype, jnp.float32)
    if train:  # one group of clips per upstream GPU (a single group by default)
      groups = replica_groups(x.shape[0], self.replica_batch)
      xs = x.astype(ct).reshape(groups, x.shape[0] // groups, *x.shape[1:])
      mean, var = self._batch_statistics(xs)
    else:
      xs, mean, var = x.astype(ct), self.mean[...].astype(ct), self.var[...].astype(ct)
    y = (xs - mean) * jax.lax.rsqrt(var + 1e-5)
    y = y * self.scale[...].astype(ct) + self.bias[...].astype(ct)
    return y.reshape(x.shape).astype(self.dtype)

  def _batch_statistics(self, xs):
    """Per-group mean and biased variance of xs (groups, clips, ..., C); folds their mean over
    the groups, with the unbiased variance, into the running statistics."""
    axes = tuple(range(1, xs.ndim - 1))
    mean = xs.mean(axes, keepdims=True)
    if self.axis_name is not None:
      mean = jax.lax.pmean(mean, self.axis_name)
    # two passes, as PyTorch: E[x^2] - E[x]^2 loses float32 digits when |mean| >> std
    var = jnp.square(xs - mean).mean(axes, keepdims=True)
    count = math.prod(xs.shape[1:-1])
    if self.axis_name is not None:
      var = jax.lax.pmean(var, self.axis_name)
      count *= jax.lax.psum(1, self.axis_name)
    unbiased = var * (count / max(count - 1, 1))
    sd = self.mean[...].dtype
    batch_mean, batch_var = (v.reshape(len(xs), -1).mean(0).astype(sd) for v in (mean, unbiased))
    self.mean[...] = (0.9 * self.mean[...] + 0.1 * batch_mean).astype(sd)
    self.var[...] = (0.9 * self.var[...] + 0.1 * batch_var).astype(sd)
    return mean, var


class LocalMHRA(nnx.Module):
  """BatchNorm3d -> 1x1x1 conv -> depthwise (3,1,1) temporal conv -> 1x1x1 conv (zero init)."""

  def __init__(self, cfg: ModelConfig, *, rngs):
    c, r, dt = cfg.width, cfg.lmhra_width, _dtypes(cfg)
    self.bn = BatchNorm(c, **dt, replica_batch=cfg.replica_batch)
    self.down = Dense(c, r, rngs=rngs, axes=("embed", None), kernel_init="torch",
                      bias_init="torch", **dt)
    bound = 1.0 / math.sqrt(3)  # torch default for a depthwise (3,1,1) kernel
    self.dw_kernel = param(rngs, uniform(bound), (3, r), dt["param_dtype"], (None, None))
    self.dw_bias = param(rngs, uniform(bound), (r,), dt["param_dtype"], (None,))
    self.up = Dense(r, c, rngs=rngs, axes=(None, "embed"), **dt)  # zero init (upstream)
    self.dtype = dt["dtype"]

  def __call__(self, x, train: bool):
    """x: (N, T, H*W, C)."""
    h = self.down(self.bn(x, train))
    return self.up(temporal_taps(h, self.dw_kernel[...].astype(self.dtype),
                                 self.dw_bias[...].astype(self.dtype)))


class MLP(nnx.Module):

  def __init__(self, d, hidden, *, rngs, dt, fc_init="torch", proj_init="torch",
               proj_bias_init="torch", rate=0.0):
    self.fc = Dense(d, hidden, rngs=rngs, axes=("embed", "mlp"), kernel_init=fc_init,
                    bias_init="torch", **dt)
    self.proj = Dense(hidden, d, rngs=rngs, axes=("mlp", "embed"), kernel_init=proj_init,
                      bias_init=proj_bias_init, **dt)
    self.rate = rate

  def __call__(self, x, key=None):
    return self.proj(dropout(quick_gelu(self.fc(x)), self.rate, key))


class Block(nnx.Module):
  """CLIP residual attention block with optional Local MHRA before attention and MLP."""

  def __init__(self, cfg: ModelConfig, *, rngs):
    c, dt = cfg.width, _dtypes(cfg)
    self.cfg = cfg
    self.lmhra1 = None if cfg.no_lmhra else LocalMHRA(cfg, rngs=rngs)
    self.lmhra2 = LocalMHRA(cfg, rngs=rngs) if not cfg.no_lmhra and cfg.double_lmhra else None
    self.ln_1 = LayerNorm(c, **dt)
    # nn.MultiheadAttention: xavier on the fused (3C, C) in_proj, zero biases.
    self.qkv = Dense(c, (3, c), rngs=rngs, axes=("embed", None, "heads"),
                     kernel_init=uniform(xavier_bound(c, 3 * c)), **dt)
    self.out = Dense(c, c, rngs=rngs, axes=("heads", "embed"), kernel_init="torch", **dt)
    self.ln_2 = LayerNorm(c, **dt)
    self.mlp = MLP(c, 4 * c, rngs=rngs, dt=dt)

  def _qkv(self, h):
    """Three (B, S, heads, head_dim) projections, each from its own contiguous matmul."""
    b, s, c = h.shape
    dt = self.qkv.dtype
    kernel, bias = self.qkv.kernel[...].astype(dt), self.qkv.bias[...].astype(dt)
    h = h.astype(dt)
    return [(jnp.dot(h, kernel[:, i], precision=precision(dt)) + bias[i]).reshape(
        b, s, self.cfg.heads, c // self.cfg.heads) for i in range(3)]

  def _lmhra(self, lmhra, x, n, key, rate, train):
    b, s, c = x.shape
    tokens = x[:, 1:].reshape(n, b // n, s - 1, c)
    tokens = tokens + drop_path(lmhra(tokens, train), rate, key, (n, 1, 1, 1))
    return jnp.concatenate([x[:, :1], tokens.reshape(b, s - 1, c)], axis=1)

  def __call__(self, x, *, n: int, key=None, rate=0.0, train: bool = False):
    """x: (N*T, 1+H*W, C) -> same shape."""
    b, s, c = x.shape
    k1, k2, k3, k4 = _split(key, 4)
    token_mask = (1, s, 1)  # upstream DropPath on (L, NT, C): one draw per token position
    # ... per upstream GPU (only drawn in training)
    groups = replica_groups(n, self.cfg.replica_batch) if train and key is not None else 1
    if self.lmhra1 is not None:
      x = self._lmhra(self.lmhra1, x, n, k1, rate, train)
    # Training pads the tokens once, in the LayerNorm's output, for attention kernels
    # whose backward wants it; the projections run on the padded rows and the residual
    # drops them again. Evaluation runs unpadded (see layers._cudnn_attention).
    impl = attention_impl(self.cfg.attention, self.qkv.dtype, c // self.cfg.heads)
    pad = token_padding(s, impl) if train else 0
    h = jnp.pad(self.ln_1(x), ((0, 0), (0, pad), (0, 0))) if pad else self.ln_1(x)
    q, k, v = self._qkv(h)
    a = attention(q, k, v, impl, valid_len=s)
    a = self.out(a.reshape(b, s + pad, c))[:, :s]
    x = x + drop_path(a, rate, k2, token_mask, groups)
    if self.lmhra2 is not None:
      x = self._lmhra(self.lmhra2, x, n, k3, rate, train)
    return x + drop_path(self.mlp(self.ln_2(x)), rate, k4, token_mask, groups)


class GlobalBlock(nnx.Module):
  """The upstream `Extractor`: the temporal class token attends to all video tokens."""

  def __init__(self, cfg: ModelConfig, mlp_rate: float, *, rngs):
    c, dt = cfg.width, _dtypes(cfg)
    self.heads, self.replica_batch = cfg.n_head, cfg.replica_batch
    self.ln_1, self.ln_2, self.ln_3 = (LayerNorm(c, **dt) for _ in range(3))
    xavier = uniform(xavier_bound(c, 3 * c))  # xavier on the fused (3C, C) in_proj
    self.q = Dense(c, c, rngs=rngs, axes=("embed", "heads"), kernel_init=xavier, **dt)
    self.kv = Dense(c, (2, c), rngs=rngs, axes=("embed", None, "heads"), kernel_init=xavier, **dt)
    self.out = Dense(c, c, rngs=rngs, axes=("heads", "embed"), **dt)  # zero init (upstream)
    hidden = cfg.mlp_width
    self.mlp = MLP(c, hidden, rngs=rngs, dt=dt, fc_init=uniform(xavier_bound(c, hidden)),
                   proj_init=None, proj_bias_init=None, rate=mlp_rate)

  def __call__(self, cls, y, *, key=None, rate=0.0):
    """cls: (N, 1, C); y: (N, M, C) tokens of one backbone layer.

    One query per video: plain XLA attention (a fused kernel would pad it to 64).
    """
    n, m, c = y.shape
    hd = c // self.heads
    k1, k2, k3 = _split(key, 3)
    q = self.q(self.ln_1(cls)).reshape(n, 1, self.heads, hd)
    kv = self.kv(self.ln_3(y)).reshape(n, m, 2, self.heads, hd)
    a = attention(q, kv[:, :, 0], kv[:, :, 1], "xla")
    groups = replica_groups(n, self.replica_batch) if key is not None else 1  # one per GPU
    cls = cls + drop_path(self.out(a.reshape(n, 1, c)), rate, k1, (1, 1, 1), groups)
    return cls + drop_path(self.mlp(self.ln_2(cls), k2), rate, k3, (1, 1, 1), groups)


class DepthwiseConv3d(nnx.Module):
  """Conv3d(C, C, 3, padding=1, groups=C): the dynamic positional encoding (DPE)."""

  def __init__(self, c, *, rngs, param_dtype, dtype):
    self.kernel = param(rngs, uniform(1.0 / math.sqrt(27)), (3, 3, 3, c), param_dtype,
                        (None, None, None, "embed"))
    self.bias = param(rngs, None, (c,), param_dtype, ("embed",))
    self.dtype = dtype

  def __call__(self, x):
    """x: (N, T, H, W, C)."""
    return depthwise_conv3d(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                            self.bias[...].astype(self.dtype))


class GlobalAggregator(nnx.Module):
  """Global MHRA: DPE + class-token cross attention on the return_list layers."""

  def __init__(self, cfg: ModelConfig, *, rngs):
    c, dt = cfg.width, _dtypes(cfg)
    self.cfg = cfg
    self.cls_token = param(rngs, None, (1, 1, c), dt["param_dtype"], (None, None, "embed"))
    self.dpe = nnx.List([DepthwiseConv3d(c, rngs=rngs, **dt) for _ in range(cfg.n_layers)])
    self.dec = nnx.List([GlobalBlock(cfg, cfg.mlp_dropout[j], rngs=rngs)
                         for j in range(cfg.n_layers)])
    self.balance = None if cfg.frozen else param(rngs, None, (c,), dt["param_dtype"], ("embed",))

  def __call__(self, layer_tokens, n: int, key=None):
    """layer_tokens: the outputs of the return_list layers, each (N*T, 1+H*W, C)."""
    cfg = self.cfg
    rates = [cfg.drop_path_rate * j / max(cfg.n_layers - 1, 1) for j in range(cfg.n_layers)]
    keys = _split(key, cfg.n_layers)
    # The class-token stream stays in the parameters' precision (float32), as under the
    # upstream's autocast: the blocks' bf16 outputs are added to a float32 token. Float64
    # compute keeps it in float64 from the start, float32 parameters or not.
    token = self.cls_token[...]
    token = token.astype(jnp.promote_types(token.dtype, cfg.dtype))
    cls = jnp.broadcast_to(token, (n, 1, cfg.width))
    for j, x in enumerate(layer_tokens):
      b, s, c = x.shape
      t = b // n
      x = x.reshape(n, t, s, c)
      feats = x[:, :, 1:].reshape(n, t, cfg.grid, cfg.grid, c)
      feats = (feats + self.dpe[j](feats)).reshape(n, t, s - 1, c)
      x = jnp.concatenate([x[:, :, :1], feats.astype(x.dtype)], axis=2).reshape(n, t * s, c)
      cls = self.dec[j](cls, x, key=keys[j], rate=rates[j])
    return cls


class UniFormerV2(nnx.Module):
  """UniFormerV2 video classifier. `model(x, train=False)`: (N, T, H, W, 3) -> (N, classes)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    cfg = config.validate()
    self.config = cfg
    self.backbone = Backbone(cfg, rngs=rngs)
    self.temporal = GlobalAggregator(cfg, rngs=rngs)
    self.head = Head(cfg, rngs=rngs)
    self.dropout_rngs = nnx.Rngs(dropout=rngs.dropout() if "dropout" in rngs else rngs.params())

  def features(self, x, train: bool = False, key=None) -> dict[str, Any]:
    """All intermediate results (for tests and feature extraction)."""
    cfg = self.config
    n = x.shape[0]
    if train and key is None:
      key = self.dropout_rngs.dropout()
    k_backbone, k_global, k_head = _split(key if train else None, 3)
    tokens = self.backbone.embed(x)
    last, returned = self.backbone.run_blocks(tokens, n, key=k_backbone, train=train)
    cls = self.temporal(returned, n, key=k_global)[:, 0]
    if cfg.frozen:
      pooled = cls
    else:
      w = jax.nn.sigmoid(self.temporal.balance[...].astype(cls.dtype))
      residual = last.reshape(n, -1, *last.shape[1:])[:, :, 0].mean(1)
      pooled = (1 - w) * cls + w * residual
    logits = self.head(pooled, key=k_head)
    return dict(tokens=tokens, backbone_out=last, cls_token=cls, pooled=pooled, logits=logits)

  def __call__(self, x, train: bool = False, key=None):
    return self.features(x, train=train, key=key)["logits"]


class Backbone(nnx.Module):
  """CLIP image tower, inflated to video, with Local MHRA inside each block."""

  def __init__(self, cfg: ModelConfig, *, rngs):
    c, dt = cfg.width, _dtypes(cfg)
    self.cfg = cfg
    kt = cfg.kernel_size if cfg.temporal_downsample else 1
    fan_in = 3 * kt * cfg.patch_size ** 2
    self.patch_embed = param(rngs, uniform(1.0 / math.sqrt(fan_in)),
                             (kt, cfg.patch_size, cfg.patch_size, 3, c), dt["param_dtype"],
                             (None, None, None, None, "embed"))
    scale = c ** -0.5
    normal = lambda key, shape, dtype: scale * jax.random.normal(key, shape, dtype)
    self.class_embedding = param(rngs, normal, (c,), dt["param_dtype"], ("embed",))
    self.pos_embedding = param(rngs, normal, (cfg.grid ** 2 + 1, c), dt["param_dtype"],
                               (None, "embed"))
    self.ln_pre = LayerNorm(c, **dt)
    blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.layers)]
    self.blocks = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)

  def embed(self, x):
    """(N, T, H, W, 3) -> tokens after ln_pre, (N*T', 1+H'*W', C)."""
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    if x.shape[1:] != (cfg.t_size, cfg.input_resolution, cfg.input_resolution, 3):
      raise ValueError(f"UniFormerV2 expects clips of shape (N, {cfg.t_size}, "
                       f"{cfg.input_resolution}, {cfg.input_resolution}, 3), got {x.shape}")
    kt = self.patch_embed.shape[0]
    p = cfg.patch_size
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), self.patch_embed[...].astype(dtype),
        window_strides=(2 if cfg.temporal_downsample else 1, p, p),
        padding=(((kt - 1) // 2,) * 2, (0, 0), (0, 0)),  # upstream: (kernel_size - 1) // 2
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    n, t, h, w, c = y.shape
    y = y.reshape(n * t, h * w, c)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (n * t, 1, c))
    y = jnp.concatenate([cls, y], axis=1) + self.pos_embedding[...].astype(dtype)
    return self.ln_pre(y)

  def run_blocks(self, x, n: int, key=None, train: bool = False):
    """Runs every block; returns (last output, [outputs of return_list layers])."""
    cfg = self.cfg
    rates = [cfg.backbone_drop_path_rate * i / max(cfg.layers - 1, 1) for i in range(cfg.layers)]
    keys = _split(key, cfg.layers)
    if cfg.scan_layers:
      return self._run_scanned(x, n, keys, rates, train)
    returned, remat_end = [], _remat_end(cfg)
    for i, block in enumerate(self.blocks):
      graphdef, state = nnx.split(block)
      step = _block_step(graphdef, n, train, cfg.remat if i < remat_end else "none")
      x, stats = step(x, state, keys[i], rates[i])
      if train:
        nnx.update(block, stats)
      if i in cfg.return_list:
        returned.append(x)
    return x, returned

  def _run_scanned(self, x, n, keys, rates, train):
    """One lax.scan per run of blocks that share remat and whether their outputs are kept."""
    cfg = self.cfg
    graphdef, state = nnx.split(self.blocks)
    steps = {remat: _block_step(graphdef, n, train, remat) for remat in {cfg.remat, "none"}}
    keys = jnp.stack(keys) if train else jnp.zeros((cfg.layers, 2), jnp.uint32)
    rates = jnp.asarray(rates, jnp.float32)
    first, remat_end = cfg.return_list[0], _remat_end(cfg)

    def scan(x, start, stop):
      step, emit = steps[cfg.remat if start < remat_end else "none"], start >= first
      def body(carry, xs):
        layer_state, k, r = xs
        y, stats = step(carry, layer_state, k if train else None, r)
        return y, (stats, y if emit else None)
      sl = lambda a: a[start:stop]
      return jax.lax.scan(body, x, (jax.tree.map(sl, state), keys[start:stop], rates[start:stop]))

    stats, outs = [], []
    bounds = sorted({0, first, remat_end, cfg.layers})
    for start, stop in zip(bounds, bounds[1:]):
      x, (s, o) = scan(x, start, stop)
      stats.append(s)
      if o is not None:
        outs.append(o)
    outs = jnp.concatenate(outs)
    if train and jax.tree.leaves(stats[-1]):
      nnx.update(self.blocks, jax.tree.map(lambda *a: jnp.concatenate(a), *stats))
    return x, [outs[i - first] for i in cfg.return_list]


class Head(nnx.Module):
  """LayerNorm -> Dropout(cls_dropout) -> Linear, as upstream `transformer.proj`."""

  def __init__(self, cfg: ModelConfig, *, rngs):
    dt = _dtypes(cfg)
    self.norm = LayerNorm(cfg.width, **dt)
    self.fc = Dense(cfg.width, cfg.num_classes, rngs=rngs, axes=("embed", "classes"),
                    kernel_init="torch", bias_init="torch", **dt)
    self.rate = cfg.cls_dropout

  def __call__(self, x, key=None):
    logits = self.fc(dropout(self.norm(x), self.rate, key))
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _remat_end(cfg: ModelConfig) -> int:
  """Blocks [0, this) are rematerialised (with cfg.remat), the rest are not."""
  if cfg.remat == "none":
    return 0
  return cfg.layers if cfg.remat_blocks < 0 else cfg.remat_blocks


def _block_step(graphdef, n, train, remat):
  """A pure function (x, block_state, key, rate) -> (x, new BatchNorm stats)."""
  def step(x, state, key, rate):
    block = nnx.merge(graphdef, state)
    y = block(x, n=n, key=key, rate=rate, train=train)
    return y, nnx.state(block, nnx.BatchStat)
  if remat != "none":
    step = jax.checkpoint(step, policy=_REMAT_POLICIES[remat])
  return step


def stack_blocks(blocks: list[Block]) -> Block:
  """One Block whose variables carry a leading `layers` axis (for lax.scan)."""
  graphdef, _ = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(b) for b in blocks])
  for var in jax.tree.leaves(stacked, is_leaf=lambda v: isinstance(v, nnx.Variable)):
    var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
  return nnx.merge(graphdef, stacked)

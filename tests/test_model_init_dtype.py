"""Initialisation and the bfloat16 policy of the model against the upstream's rules.

Initialisation: ORIG (OpenGVLab/UniFormerV2 slowfast/models/uniformerv2_model.py) builds its
modules with torch's defaults and applies its own init statements; the reference below does the
same in torch and computes every bound with torch's own fan functions. bfloat16: README
("dtype"): norms and softmax in float32, matmuls in bfloat16.
"""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx

from uniformerv2_jax import UniFormerV2, model_config
from uniformerv2_jax.weights import abstract_model

T, RES, PATCH = 2, 32, 8


# ---------------------------------------------------------------------------------------------
# 2. Initialisation of the parts new relative to CLIP (and CLIP's own, for training from scratch).


def _fans(t):
  return torch.nn.init._calculate_fan_in_and_fan_out(t)


def _torch_default_weight_bound(weight):
  """nn.Linear/_ConvNd.reset_parameters: kaiming_uniform_(weight, a=sqrt(5)), i.e.
  bound = sqrt(3) * calculate_gain('leaky_relu', sqrt(5)) / sqrt(fan_in)."""
  gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
  return math.sqrt(3.0) * gain / math.sqrt(_fans(weight)[0])


def _torch_default_bias_bound(weight):
  """nn.Linear/_ConvNd.reset_parameters: bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return 1.0 / math.sqrt(_fans(weight)[0])


def _xavier_bound(weight):
  """nn.init.xavier_uniform_ (gain 1): sqrt(6 / (fan_in + fan_out))."""
  fan_in, fan_out = _fans(weight)
  return math.sqrt(6.0 / (fan_in + fan_out))


def _check_rule(w, rule, what):
  w = np.asarray(w, np.float64).ravel()
  kind = rule[0]
  if kind == "zeros":
    assert (w == 0).all(), what
  elif kind == "ones":
    assert (w == 1).all(), what
  elif kind == "uniform":
    b, n = rule[1], w.size
    top = np.abs(w).max()
    assert top <= b * (1 + 1e-6), (what, top, b)
    assert top >= b * (1 - 8.0 / n), (what, top, b)  # P(max below) = (1 - 8/n)^n ~ e^-8
    # U(-b, b): std b/sqrt(3); the sample std's relative sd is ~0.45/sqrt(n).
    assert abs(w.std() / (b / math.sqrt(3)) - 1) < 6 * 0.45 / math.sqrt(n), (what, w.std(), b)
    assert scipy.stats.kstest(w, "uniform", args=(-b, 2 * b)).pvalue > 1e-4, what
  elif kind == "normal":
    std = rule[1]
    assert abs(w.std() / std - 1) < 6 / math.sqrt(2 * w.size), (what, w.std(), std)
    assert scipy.stats.kstest(w / std, "norm").pvalue > 1e-4, what
  else:
    raise AssertionError(rule)


def _upstream_reference(c, r, heads, n_head, d_mlp, classes, kt, patch, grid):
  """Torch modules built as ORIG builds them, with ORIG's init statements applied; returns
  {name: (torch tensor, rule)} with each rule's bound computed by torch's own fan functions."""
  torch.manual_seed(0)
  nn, init = torch.nn, torch.nn.init
  ref = {}
  # Local_MHRA.__init__: Sequential(BatchNorm3d(d), Conv3d(d, re_d, 1),
  #   Conv3d(re_d, re_d, (3, 1, 1), padding=(1, 0, 0), groups=re_d), Conv3d(re_d, d, 1));
  #   nn.init.constant_(self.pos_embed[3].weight, 0); nn.init.constant_(self.pos_embed[3].bias, 0)
  pe = nn.Sequential(nn.BatchNorm3d(c), nn.Conv3d(c, r, 1),
                     nn.Conv3d(r, r, (3, 1, 1), padding=(1, 0, 0), groups=r), nn.Conv3d(r, c, 1))
  init.constant_(pe[3].weight, 0)
  init.constant_(pe[3].bias, 0)
  ref["lmhra.bn.scale"] = (pe[0].weight, ("ones",))
  ref["lmhra.bn.bias"] = (pe[0].bias, ("zeros",))
  ref["lmhra.bn.mean"] = (pe[0].running_mean, ("zeros",))
  ref["lmhra.bn.var"] = (pe[0].running_var, ("ones",))
  ref["lmhra.down.kernel"] = (pe[1].weight, ("uniform", _torch_default_weight_bound(pe[1].weight)))
  ref["lmhra.down.bias"] = (pe[1].bias, ("uniform", _torch_default_bias_bound(pe[1].weight)))
  ref["lmhra.dw_kernel"] = (pe[2].weight, ("uniform", _torch_default_weight_bound(pe[2].weight)))
  ref["lmhra.dw_bias"] = (pe[2].bias, ("uniform", _torch_default_bias_bound(pe[2].weight)))
  ref["lmhra.up.kernel"] = (pe[3].weight, ("zeros",))
  ref["lmhra.up.bias"] = (pe[3].bias, ("zeros",))
  # Extractor.__init__: MultiheadAttention(d, n_head) (in_proj_bias and out_proj.bias zeroed by
  #   its _reset_parameters); xavier_uniform_(attn.in_proj_weight); constant_(out_proj.weight/bias, 0);
  #   mlp = c_fc Linear(d, d_mlp), c_proj Linear(d_mlp, d); xavier_uniform_(mlp[0].weight);
  #   constant_(mlp[-1].weight/bias, 0). LayerNorms ln_1, ln_2, ln_3 default.
  attn = nn.MultiheadAttention(c, n_head)
  c_fc, c_proj = nn.Linear(c, d_mlp), nn.Linear(d_mlp, c)
  init.xavier_uniform_(attn.in_proj_weight)
  init.constant_(attn.out_proj.weight, 0.)
  init.constant_(attn.out_proj.bias, 0.)
  init.xavier_uniform_(c_fc.weight)
  init.constant_(c_proj.weight, 0.)
  init.constant_(c_proj.bias, 0.)
  w = attn.in_proj_weight
  ref["dec.in_proj"] = (w, ("uniform", _xavier_bound(w)))  # fans of the fused (3d, d) matrix
  ref["dec.q.kernel"] = (w[:c], ("uniform", _xavier_bound(w)))
  ref["dec.kv.kernel"] = (w[c:], ("uniform", _xavier_bound(w)))
  ref["dec.q.bias"] = (attn.in_proj_bias[:c], ("zeros",))
  ref["dec.kv.bias"] = (attn.in_proj_bias[c:], ("zeros",))
  ref["dec.out.kernel"] = (attn.out_proj.weight, ("zeros",))
  ref["dec.out.bias"] = (attn.out_proj.bias, ("zeros",))
  ref["dec.mlp.fc.kernel"] = (c_fc.weight, ("uniform", _xavier_bound(c_fc.weight)))
  ref["dec.mlp.fc.bias"] = (c_fc.bias, ("uniform", _torch_default_bias_bound(c_fc.weight)))
  ref["dec.mlp.proj.kernel"] = (c_proj.weight, ("zeros",))
  ref["dec.mlp.proj.bias"] = (c_proj.bias, ("zeros",))
  ln = nn.LayerNorm(c)
  for k in ("ln_1", "ln_2", "ln_3"):
    ref[f"dec.{k}.scale"] = (ln.weight, ("ones",))
    ref[f"dec.{k}.bias"] = (ln.bias, ("zeros",))
  # Transformer.__init__: dpe = Conv3d(n_dim, n_dim, 3, padding=1, bias=True, groups=n_dim),
  #   nn.init.constant_(m.bias, 0.); temporal_cls_token = zeros(1, 1, n_dim);
  #   balance = zeros(n_dim); proj = Sequential(LayerNorm(n_dim), Dropout, Linear(n_dim, classes)).
  dpe = nn.Conv3d(c, c, 3, padding=1, bias=True, groups=c)
  init.constant_(dpe.bias, 0.)
  ref["dpe.kernel"] = (dpe.weight, ("uniform", _torch_default_weight_bound(dpe.weight)))
  ref["dpe.bias"] = (dpe.bias, ("zeros",))
  ref["cls_token"] = (torch.zeros(1, 1, c), ("zeros",))
  ref["balance"] = (torch.zeros(c), ("zeros",))
  proj = nn.Sequential(nn.LayerNorm(c), nn.Dropout(0.5), nn.Linear(c, classes))
  ref["head.norm.scale"] = (proj[0].weight, ("ones",))
  ref["head.norm.bias"] = (proj[0].bias, ("zeros",))
  ref["head.fc.kernel"] = (proj[2].weight, ("uniform", _torch_default_weight_bound(proj[2].weight)))
  ref["head.fc.bias"] = (proj[2].bias, ("uniform", _torch_default_bias_bound(proj[2].weight)))
  # CLIP's parts (VisionTransformer / ResidualAttentionBlock), for training from scratch:
  #   conv1 = Conv3d(3, width, (kernel_size, p, p), ..., bias=False);
  #   class_embedding = scale * randn(width); positional_embedding = scale * randn(grid^2+1, width),
  #   scale = width ** -0.5; attn = MultiheadAttention(d, n_head) (xavier in_proj, zero biases,
  #   out_proj.weight Linear default); c_fc, c_proj Linear defaults; LayerNorms default.
  conv1 = nn.Conv3d(3, c, (kt, patch, patch), (2, patch, patch), (kt // 2, 0, 0), bias=False)
  ref["patch_embed"] = (conv1.weight, ("uniform", _torch_default_weight_bound(conv1.weight)))
  scale = c ** -0.5
  ref["class_embedding"] = (scale * torch.randn(c), ("normal", scale))
  ref["pos_embedding"] = (scale * torch.randn(grid ** 2 + 1, c), ("normal", scale))
  battn = nn.MultiheadAttention(c, heads)
  b_fc, b_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
  w = battn.in_proj_weight
  ref["block.qkv.kernel"] = (w, ("uniform", _xavier_bound(w)))
  ref["block.qkv.bias"] = (battn.in_proj_bias, ("zeros",))
  ref["block.out.kernel"] = (battn.out_proj.weight,
                             ("uniform", _torch_default_weight_bound(battn.out_proj.weight)))
  ref["block.out.bias"] = (battn.out_proj.bias, ("zeros",))
  for name, lin in (("fc", b_fc), ("proj", b_proj)):
    ref[f"block.mlp.{name}.kernel"] = (lin.weight, ("uniform", _torch_default_weight_bound(lin.weight)))
    ref[f"block.mlp.{name}.bias"] = (lin.bias, ("uniform", _torch_default_bias_bound(lin.weight)))
  for k in ("ln_1", "ln_2"):
    ref[f"block.{k}.scale"] = (ln.weight, ("ones",))
    ref[f"block.{k}.bias"] = (ln.bias, ("zeros",))
  ref["ln_pre.scale"] = (ln.weight, ("ones",))  # VisionTransformer.ln_pre = LayerNorm(width)
  ref["ln_pre.bias"] = (ln.bias, ("zeros",))
  return ref


def _ours(model):
  """{name: [arrays of every instance]} named like _upstream_reference."""
  a = lambda v: np.asarray(v[...])
  out = collections.defaultdict(list)
  bb, tp = model.backbone, model.temporal
  out["patch_embed"].append(a(bb.patch_embed))
  out["class_embedding"].append(a(bb.class_embedding))
  out["pos_embedding"].append(a(bb.pos_embedding))
  out["ln_pre.scale"].append(a(bb.ln_pre.scale))
  out["ln_pre.bias"].append(a(bb.ln_pre.bias))
  for blk in bb.blocks:
    for lm in (blk.lmhra1, blk.lmhra2):
      for k, v in (("bn.scale", lm.bn.scale), ("bn.bias", lm.bn.bias), ("bn.mean", lm.bn.mean),
                   ("bn.var", lm.bn.var), ("down.kernel", lm.down.kernel),
                   ("down.bias", lm.down.bias), ("dw_kernel", lm.dw_kernel),
                   ("dw_bias", lm.dw_bias), ("up.kernel", lm.up.kernel), ("up.bias", lm.up.bias)):
        out["lmhra." + k].append(a(v))
    for k, v in (("qkv.kernel", blk.qkv.kernel), ("qkv.bias", blk.qkv.bias),
                 ("out.kernel", blk.out.kernel), ("out.bias", blk.out.bias),
                 ("mlp.fc.kernel", blk.mlp.fc.kernel), ("mlp.fc.bias", blk.mlp.fc.bias),
                 ("mlp.proj.kernel", blk.mlp.proj.kernel), ("mlp.proj.bias", blk.mlp.proj.bias),
                 ("ln_1.scale", blk.ln_1.scale), ("ln_1.bias", blk.ln_1.bias),
                 ("ln_2.scale", blk.ln_2.scale), ("ln_2.bias", blk.ln_2.bias)):
      out["block." + k].append(a(v))
  for dec, dpe in zip(tp.dec, tp.dpe):
    q, kv = a(dec.q.kernel), a(dec.kv.kernel)
    out["dec.in_proj"].append(np.concatenate([q.ravel(), kv.ravel()]))
    for k, v in (("q.kernel", dec.q.kernel), ("kv.kernel", dec.kv.kernel), ("q.bias", dec.q.bias),
                 ("kv.bias", dec.kv.bias), ("out.kernel", dec.out.kernel),
                 ("out.bias", dec.out.bias), ("mlp.fc.kernel", dec.mlp.fc.kernel),
                 ("mlp.fc.bias", dec.mlp.fc.bias), ("mlp.proj.kernel", dec.mlp.proj.kernel),
                 ("mlp.proj.bias", dec.mlp.proj.bias), ("ln_1.scale", dec.ln_1.scale),
                 ("ln_1.bias", dec.ln_1.bias), ("ln_2.scale", dec.ln_2.scale),
                 ("ln_2.bias", dec.ln_2.bias), ("ln_3.scale", dec.ln_3.scale),
                 ("ln_3.bias", dec.ln_3.bias)):
      out["dec." + k].append(a(v))
    out["dpe.kernel"].append(a(dpe.kernel))
    out["dpe.bias"].append(a(dpe.bias))
  out["cls_token"].append(a(tp.cls_token))
  out["balance"].append(a(tp.balance))
  out["head.norm.scale"].append(a(model.head.norm.scale))
  out["head.norm.bias"].append(a(model.head.norm.bias))
  out["head.fc.kernel"].append(a(model.head.fc.kernel))
  out["head.fc.bias"].append(a(model.head.fc.bias))
  return out


def test_initialisation_follows_upstream_rules():
  """Every parameter of UniFormerV2(cfg, rngs=nnx.Rngs(0)) against the rule ORIG applies to its
  counterpart: same element count, zeros/ones exactly, U(-b, b) with b from torch's own fan
  computation (max |w| at b, std b/sqrt(3), KS test), normal std; torch's own tensors pass the same
  checks (the rules are right) and a two-sample KS test against them; separate instances differ."""
  width, classes = 192, 400  # large enough for the statistics, small enough to be quick
  cfg = model_config(None, input_resolution=32, patch_size=16, width=width, layers=2, heads=3,
                     n_head=3, t_size=2, temporal_downsample=True, kernel_size=3, no_lmhra=False,
                     double_lmhra=True, dw_reduction=1.5, return_list=(0, 1), num_classes=classes)
  model = UniFormerV2(cfg, rngs=nnx.Rngs(0))
  ref = _upstream_reference(width, cfg.lmhra_width, cfg.heads, cfg.n_head, cfg.mlp_width, classes,
                            cfg.kernel_size, cfg.patch_size, cfg.grid)
  ours = _ours(model)
  assert set(ours) == set(ref)
  # Every parameter of the model was looked at (the dec.in_proj entry is the q/kv union).
  counted = sum(x.size for k, xs in ours.items() if k != "dec.in_proj" for x in xs)
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat))))
  assert counted == total
  for name, (tensor, rule) in ref.items():
    theirs = tensor.detach().double().numpy().ravel()
    _check_rule(theirs, rule, f"torch {name}")
    for i, w in enumerate(ours[name]):
      assert w.size == theirs.size, (name, w.shape, tuple(tensor.shape))
      _check_rule(w, rule, f"{name}[{i}]")
      if rule[0] in ("uniform", "normal"):
        assert scipy.stats.ks_2samp(w.ravel(), theirs).pvalue > 1e-4, name
    if rule[0] in ("uniform", "normal") and len(ours[name]) > 1:
      assert not np.array_equal(ours[name][0], ours[name][1]), f"{name}: instances share a draw"


# ---------------------------------------------------------------------------------------------
# 3. bfloat16 policy: norms and softmax in float32, matmuls in bfloat16 (README "dtype").


def _eqns(jaxpr):
  """(equation, producers) for every equation of `jaxpr` and of the jaxprs nested in its
  equations (jit, custom_vjp/custom_jvp, scan, remat, cond); producers maps id(var) -> the
  equation of the same jaxpr that produced it."""
  producers = {}
  for e in jaxpr.eqns:
    yield e, producers
    for v in e.outvars:
      producers[id(v)] = e
    for p in e.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _dtype(v):
  return jnp.dtype(v.aval.dtype)


F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)


@pytest.mark.parametrize("train,scan", [(False, False), (True, False), (True, True)])
def test_bfloat16_runs_norms_and_softmax_in_float32(train, scan):
  width = 40
  cfg = model_config(None, input_resolution=RES, patch_size=PATCH, width=width, layers=2, heads=2,
                     n_head=2, t_size=T, no_lmhra=False, double_lmhra=True, return_list=(0, 1),
                     num_classes=7, dtype="bfloat16", attention="xla", scan_layers=scan)
  graphdef, state = nnx.split(abstract_model(cfg))  # shapes only: tracing needs no values

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    return m(x, train=train, key=jax.random.key(0) if train else None), nnx.state(m)

  x = jax.ShapeDtypeStruct((2, T, RES, RES, 3), jnp.float32)
  closed = jax.make_jaxpr(forward)(state, x)
  # The global blocks' class-token stream stays float32 (README; under the upstream's autocast
  # the fp32 temporal_cls_token plus fp16 branch outputs promote to fp32); logits float32.
  feats = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x, train=train), state, x)
  assert (feats["cls_token"].dtype, feats["logits"].dtype) == (F32, F32)
  assert feats["backbone_out"].dtype == BF16
  eqns = list(_eqns(closed.jaxpr))
  prim = lambda name: [(e, p) for e, p in eqns if e.primitive.name == name]
  blocks = 1 if scan else cfg.layers  # a scanned body is traced once
  n_ln = 1 + 2 * blocks + 3 * cfg.n_layers + 1  # ln_pre, ln_1/ln_2, global ln_1..3, head norm
  n_bn = 2 * blocks                             # lmhra1 + lmhra2
  n_attn = blocks + cfg.n_layers

  # Matmuls (projections, attention, MLPs, Local MHRA 1x1x1 convs, head) and the patch conv: bf16.
  dots = prim("dot_general") + prim("conv_general_dilated")
  assert len(dots) >= 2 * n_attn + 4 * blocks + 5 * cfg.n_layers + 2
  for e, _ in dots:
    assert [_dtype(v) for v in e.invars] == [BF16, BF16], (e.primitive, e.invars)
  assert any(e.invars[0].aval.shape[-1] == 4 * width for e, _ in prim("dot_general"))  # MLP proj

  # Softmax: exp, its max and its sum in float32.
  exps = prim("exp")
  assert len(exps) >= n_attn and all(_dtype(e.invars[0]) == F32 for e, _ in exps)
  assert all(_dtype(e.invars[0]) == F32 for e, _ in prim("reduce_max"))
  softmax_sums = [e for e, p in prim("reduce_sum")
                  if id(e.invars[0]) in p and p[id(e.invars[0])].primitive.name == "exp"]
  assert len(softmax_sums) >= n_attn and all(_dtype(e.invars[0]) == F32 for e in softmax_sums)

  # Normalisation: every rsqrt (LayerNorm and BatchNorm) in float32.
  rsqrts = prim("rsqrt")
  assert len(rsqrts) == n_ln + n_bn and all(_dtype(e.invars[0]) == F32 for e, _ in rsqrts)
  # No reduction anywhere runs in bf16.
  assert all(_dtype(e.invars[0]) != BF16 for e, _ in prim("reduce_sum"))

  def fed_by_f32_square(e, p):
    src = p.get(id(e.invars[0]))
    return src is not None and src.primitive.name in ("square", "integer_pow", "mul") and \
        _dtype(src.outvars[0]) == F32

  # LayerNorm variance: a last-axis reduction over `width` of a float32 square (a bf16 square
  # upcast only for the sum, as jnp.mean does, would not count).
  ln_vars = [e for e, p in prim("reduce_sum")
             if e.params["axes"] == (e.invars[0].aval.ndim - 1,)
             and e.invars[0].aval.shape[-1] == width and fed_by_f32_square(e, p)]
  assert len(ln_vars) == n_ln
  if train:
    # BatchNorm batch statistics: reductions over every axis but channels, mean and mean of
    # float32 squares.
    # (JAX may reshape first and finish with a second, width-sized sum: the first one counts.)
    def channel_stat(e):
      a = e.invars[0].aval
      out = math.prod(d for i, d in enumerate(a.shape) if i not in e.params["axes"])
      return a.shape[-1] == width and a.ndim - 1 not in e.params["axes"] and out == width \
          and a.size > width
    bn = [(e, p) for e, p in prim("reduce_sum") if channel_stat(e)]
    assert len(bn) == 2 * n_bn and all(_dtype(e.invars[0]) == F32 for e, _ in bn)
    assert sum(fed_by_f32_square(e, p) for e, p in bn) == n_bn

"""Building blocks against PyTorch: LayerNorm (its hand-written backward), QuickGELU, and
attention over padded tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import golden_case, rel_err, torch_input_to_jax
from test_model import golden_model
from uniformerv2_jax import layers


@pytest.mark.parametrize("shape", [(2, 5, 16), (7, 24)])
def test_layer_norm_value_and_gradients_match_torch(shape, x64):
  rng = np.random.default_rng(0)
  x = 3.0 + 2.0 * rng.standard_normal(shape)  # a mean far from 0, as in CLIP's residual stream
  scale, bias = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
  cot = rng.standard_normal(shape)
  xt, st, bt = (torch.tensor(a, requires_grad=True) for a in (x, scale, bias))
  yt = torch.nn.functional.layer_norm(xt, (shape[-1],), st, bt, eps=1e-5)
  yt.backward(torch.tensor(cot))

  f = lambda x, s, b: layers.layer_norm(x, s, b, jnp.dtype(jnp.float64))
  y, vjp = jax.vjp(f, *(jnp.asarray(a) for a in (x, scale, bias)))
  assert rel_err(y, yt.detach().numpy()) < 1e-13
  for ours, theirs in zip(vjp(jnp.asarray(cot)), (xt.grad, st.grad, bt.grad)):
    assert rel_err(ours, theirs.numpy()) < 1e-12


def test_layer_norm_bfloat16_keeps_dtypes_and_float32_accuracy():
  rng = np.random.default_rng(1)
  x = jnp.asarray(3.0 + rng.standard_normal((64, 32)), jnp.bfloat16)
  scale = jnp.asarray(rng.standard_normal(32), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(32), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
  bf16 = lambda x, s, b: layers.layer_norm(x, s, b, jnp.dtype(jnp.bfloat16))
  y, vjp = jax.vjp(bf16, x, scale, bias)
  dx, ds, db = vjp(cot)
  assert (y.dtype, dx.dtype) == (jnp.bfloat16, jnp.bfloat16)
  assert (ds.dtype, db.dtype) == (jnp.float32, jnp.float32)
  f32 = lambda x, s, b: layers.layer_norm(x, s, b, jnp.dtype(jnp.float32))
  _, vjp32 = jax.vjp(f32, x.astype(jnp.float32), scale, bias)
  for ours, ref in zip((dx, ds, db), vjp32(cot.astype(jnp.float32))):
    assert rel_err(ours, ref) < 2 ** -7  # one bf16 rounding of dx; scale/bias grads in float32


def test_quick_gelu_rounds_like_torch_bfloat16():
  x = (4 * np.random.default_rng(2).standard_normal(50_000)).astype(np.float32)
  xt = torch.tensor(x).bfloat16()
  expected = (xt * torch.sigmoid(1.702 * xt)).float().numpy()
  ours = np.asarray(layers.quick_gelu(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
  np.testing.assert_array_equal(ours, expected)


def test_quick_gelu_float64_is_exact(x64):
  x = np.linspace(-6, 6, 101)
  expected = x / (1 + np.exp(-1.702 * x))
  assert rel_err(layers.quick_gelu(jnp.asarray(x)), expected) < 1e-15


GOLDEN_TOKENS = (lambda c: (c["input_resolution"] // c["patch_size"]) ** 2 + 1)(
    golden_case("tiny_k400")[1])  # 17: odd, so cuDNN pads it


def logits_and_grads(train, **overrides):
  """float64 logits of the golden tiny_k400 model (dropout off) and the gradients of a
  fixed linear function of them with respect to every parameter."""
  model, arrays = golden_model("tiny_k400", mlp_dropout=0.0, cls_dropout=0.0, **overrides)
  video = jnp.asarray(torch_input_to_jax(arrays["input"]), jnp.float64)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits = nnx.merge(graphdef, p, rest)(video, train=train, key=jax.random.key(0))
    return jnp.sum(logits * jnp.arange(logits.shape[-1])), logits

  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return logits, grads


def assert_same_results(reference, other):
  (logits, grads), (other_logits, other_grads) = reference, other
  assert rel_err(other_logits, logits) < 1e-13
  for g, og in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads)):
    assert np.max(np.abs(np.asarray(og) - np.asarray(g))) <= 1e-12 * (np.max(np.abs(g)) + 1e-30)


def test_padded_tokens_change_neither_logits_nor_gradients(monkeypatch, x64):
  """Pad the backbone's tokens as training on the cuDNN path does (here through XLA
  attention with a key mask, so that it runs on a CPU): float64 logits and every gradient
  stay the same. Train mode (padding is for the backward), dropout off."""
  reference = logits_and_grads(train=True)
  assert rel_err(reference[0], golden_case("tiny_k400")[0]["logits"]) < 1e-9
  monkeypatch.setitem(layers.TOKEN_PAD_MULTIPLE, "xla", 8)
  assert layers.token_padding(GOLDEN_TOKENS, "xla") > 0
  assert_same_results(reference, logits_and_grads(train=True))


def test_auto_attention_resolves_per_platform_and_dtype():
  on_cuda = jax.default_backend() == "gpu"
  assert layers.attention_impl("auto", jnp.float32, 64) == "xla"      # cuDNN needs 16-bit
  assert layers.attention_impl("auto", jnp.bfloat16, 12) == "xla"     # head dim not a multiple of 8
  assert layers.attention_impl("auto", jnp.bfloat16, 64) == ("cudnn" if on_cuda else "xla")
  assert layers.attention_impl("cudnn", jnp.float32, 12) == "cudnn"   # explicit names stay


@pytest.mark.parametrize("train", [False, True])
def test_cudnn_path_plumbing_with_xla_kernel(monkeypatch, train, x64):
  """The "cudnn" path with its one cuDNN call swapped for masked float64 XLA attention:
  training pads the tokens in the LayerNorm, evaluation runs them unpadded and
  differentiates through a padded recomputation. Logits and every gradient equal those
  of the plain XLA path. (jax.nn.dot_product_attention's own XLA implementation would
  not do as the stand-in: it runs the softmax in float32 even for float64 inputs.)
  The stand-in fills query rows past q_len with NaN, which cuDNN is free to do: no
  such row may reach a result."""
  calls = []

  def kernel(q, k, v, q_len=None, kv_len=None):
    calls.append((q.shape[1], q_len, kv_len))
    out = layers.attention(q, k, v, "xla", valid_len=kv_len)
    if q_len is None:
      return out
    return jnp.where((jnp.arange(q.shape[1]) < q_len)[:, None, None], out, jnp.nan)

  monkeypatch.setattr(layers, "_fused", kernel)
  reference = logits_and_grads(train, attention="xla")
  fused = logits_and_grads(train, attention="cudnn")
  padded = GOLDEN_TOKENS + layers.token_padding(GOLDEN_TOKENS, "cudnn")
  # Training: padded forward and backward; evaluation: unpadded forward, padded backward.
  assert set(calls) == ({(padded, padded, GOLDEN_TOKENS)} if train else
                        {(GOLDEN_TOKENS, None, None), (padded, padded, GOLDEN_TOKENS)})
  if not train:
    assert rel_err(reference[0], golden_case("tiny_k400")[0]["logits"]) < 1e-9
  assert_same_results(reference, fused)


def _torch_bn(x, scale, bias):
  """torch.nn.BatchNorm3d in train mode on channels-last x (N, T, HW, C): (output, module)."""
  c = x.shape[-1]
  bn = torch.nn.BatchNorm3d(c, momentum=0.1).to(torch.from_numpy(x).dtype)
  with torch.no_grad():
    bn.weight.copy_(torch.from_numpy(scale))
    bn.bias.copy_(torch.from_numpy(bias))
  out = bn.train()(torch.from_numpy(x).permute(0, 3, 1, 2)[..., None])
  return out[..., 0].permute(0, 2, 3, 1).detach().numpy(), bn


def _jax_bn(c, dtype, replica_batch=0):
  from uniformerv2_jax.model import BatchNorm
  return BatchNorm(c, param_dtype=dtype, dtype=dtype, replica_batch=replica_batch)


def test_batchnorm_per_replica_is_torch_per_gpu(x64):
  """replica_batch: each group of clips is normalised as one GPU's BatchNorm3d under DDP; the
  running statistics move by the mean of the GPUs' updates."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3, 5, 4)) * rng.uniform(0.5, 3, 4) + rng.normal(size=4)
  scale, bias = rng.normal(size=4), rng.normal(size=4)
  bn = _jax_bn(4, jnp.float64, replica_batch=2)
  bn.scale[...], bn.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
  got = np.asarray(bn(jnp.asarray(x), train=True))
  per_gpu = [_torch_bn(x[g:g + 2], scale, bias) for g in (0, 2, 4)]
  np.testing.assert_allclose(got, np.concatenate([out for out, _ in per_gpu]), rtol=0, atol=1e-12)
  for name, ours in (("running_mean", bn.mean), ("running_var", bn.var)):
    want = np.mean([getattr(m, name).numpy() for _, m in per_gpu], axis=0)
    np.testing.assert_allclose(np.asarray(ours[...]), want, rtol=1e-12)
  whole = _jax_bn(4, jnp.float64)  # 0: one group, torch on the whole batch (SyncBatchNorm)
  whole.scale[...], whole.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
  np.testing.assert_allclose(np.asarray(whole(jnp.asarray(x), train=True)),
                             _torch_bn(x, scale, bias)[0], rtol=0, atol=1e-12)
  with pytest.raises(ValueError, match="replica_batch=4 does not divide the batch of 6"):
    _jax_bn(4, jnp.float64, replica_batch=4)(jnp.asarray(x), train=True)


def test_batchnorm_float32_variance_as_accurate_as_torch():
  """A channel whose mean is 300x its spread: float32 statistics lose no more than torch's
  (a one-pass E[x^2] - E[x]^2 lost ~100x more)."""
  rng = np.random.default_rng(1)
  x64 = rng.normal(size=(8, 8, 49, 3)) + np.array([300.0, -80.0, 0.5])
  exact = (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-5)
  x = x64.astype(np.float32)
  ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
  torch_err = np.abs(_torch_bn(x, ones, zeros)[0] - exact).max()
  ours = np.asarray(_jax_bn(3, jnp.float32)(jnp.asarray(x), train=True))
  assert np.abs(ours - exact).max() <= 2 * torch_err + 1e-6, (np.abs(ours - exact).max(), torch_err)


def test_drop_path_groups_draw_one_mask_per_replica():
  """groups=G: consecutive groups of the leading axis draw their own masks (one per upstream
  GPU); inside a group the mask is shared as the mask shape says; kept values are x / keep."""
  from uniformerv2_jax.layers import drop_path
  x = jnp.ones((8 * 2, 5, 3))  # 8 groups of 2 rows (videos x frames), 5 token positions
  out = np.asarray(drop_path(x, 0.5, jax.random.PRNGKey(0), (1, 5, 1), groups=8))
  assert set(np.unique(out)) <= {0.0, 2.0}
  groups = out.reshape(8, 2, 5, 3)
  assert (groups == groups[:, :1, :, :1]).all()  # shared by the group's rows and channels
  assert len({g[0, :, 0].tobytes() for g in groups}) > 1  # groups differ (P(all equal) ~ 1e-10)
  single = np.asarray(drop_path(x, 0.5, jax.random.PRNGKey(0), (1, 5, 1)))
  assert (single == single[:1, :, :1]).all()  # one group: one mask for the whole batch

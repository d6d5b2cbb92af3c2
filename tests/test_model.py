"""The model against the original PyTorch implementation's float64 outputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import GOLDEN, golden_case, rel_err, torch_input_to_jax
from uniformerv2_jax import (CheckpointMismatchError, UniFormerV2, from_torch_state_dict,
                             model_config)
from uniformerv2_jax.torch_layout import canonical_state_dict, torch_shapes
from uniformerv2_jax.weights import (WEIGHTS, abstract_model, count_params, flatten,
                                     model_from_tree, stack_layers, torch_tensors_to_tree,
                                     unstack_layers, weight_shapes)

CASES = ["tiny_k400", "tiny_ssv2"]
LAYOUTS = ["{}.pyth", "{}_mmaction.pth"]


def load(case, layout="{}.pyth"):
  return torch.load(GOLDEN / layout.format(case), weights_only=True)


def golden_model(case, dtype=jnp.float64, **overrides):
  arrays, cfg = golden_case(case)
  model = from_torch_state_dict(load(case), model_config(None, **cfg, **overrides), dtype=dtype)
  return model, arrays


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_float64_matches_upstream(case, layout, x64):
  arrays, cfg = golden_case(case)
  model = from_torch_state_dict(load(case, layout), model_config(None, **cfg), dtype=jnp.float64)
  out = model.features(jnp.asarray(torch_input_to_jax(arrays["input"]), jnp.float64))
  assert out["logits"].dtype == jnp.float64
  assert rel_err(out["logits"], arrays["logits"]) < 1e-9
  assert rel_err(out["tokens"], arrays["tokens_ln_pre"]) < 1e-9
  assert rel_err(np.asarray(out["backbone_out"]).transpose(1, 0, 2), arrays["backbone_out"]) < 1e-9
  assert rel_err(out["cls_token"][None], arrays["cls_token"]) < 1e-9


@pytest.mark.parametrize("case", CASES)
def test_float64_compute_with_float32_parameters(case, x64):
  """load_pretrained(dtype="float64") keeps float32 parameters: the golden weights are float32
  values, so float64 compute must still match; the class token stream included."""
  arrays, cfg = golden_case(case)
  cfg = model_config(None, **cfg).replace(dtype="float64", param_dtype="float32")
  model = model_from_tree(cfg, torch_tensors_to_tree(canonical_state_dict(load(case))[0], cfg))
  assert model.temporal.cls_token[...].dtype == jnp.float32
  out = model.features(jnp.asarray(torch_input_to_jax(arrays["input"]), jnp.float64))
  assert out["logits"].dtype == jnp.float64
  assert rel_err(out["cls_token"][None], arrays["cls_token"]) < 1e-9
  assert rel_err(out["logits"], arrays["logits"]) < 1e-9


def test_train_mode_batchnorm(x64):
  """Train mode: batch statistics in the forward, PyTorch's running-statistics update.

  The forward is checked against the golden train-mode logits. The running statistics
  are checked against torch.nn.BatchNorm3d itself, fed the same block-0 input: the
  golden `block0_lmhra1_bn_running_*_after` arrays are bitwise equal to the checkpoint's
  values before the forward (the reference run did not fold its batch statistics in),
  so they cannot witness the momentum-0.1 / unbiased-variance update the upstream does.
  """
  model, arrays = golden_model("tiny_ssv2", mlp_dropout=0.0, cls_dropout=0.0)
  x = jnp.asarray(torch_input_to_jax(arrays["input"]), jnp.float64)
  tokens = np.asarray(model.backbone.embed(x))  # block 0's Local MHRA input
  logits = model(x, train=True)
  assert rel_err(logits, arrays["train_logits_no_dropout"]) < 1e-9

  sd = canonical_state_dict(load("tiny_ssv2"))[0]
  prefix = "transformer.resblocks.0.lmhra1.pos_embed.0."
  bn = torch.nn.BatchNorm3d(48, momentum=0.1).double()
  bn.load_state_dict({k: sd[prefix + k].double() for k in
                      ("weight", "bias", "running_mean", "running_var")}, strict=False)
  n, t = 2, 4
  grid = tokens[:, 1:].reshape(n, t, 4, 4, 48).transpose(0, 4, 1, 2, 3)
  bn.train()(torch.from_numpy(np.array(grid)))
  stats = model.backbone.blocks[0].lmhra1.bn
  assert rel_err(stats.mean.get_value(), bn.running_mean.numpy()) < 1e-12
  assert rel_err(stats.var.get_value(), bn.running_var.numpy()) < 1e-12
  # Eval mode now uses the updated statistics (and so differs from the golden logits).
  assert rel_err(model(x), arrays["logits"]) > 1e-6


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_upstream(case):
  model, arrays = golden_model(case, dtype=jnp.float32)
  logits = model(jnp.asarray(torch_input_to_jax(arrays["input"])))
  assert logits.dtype == jnp.float32
  assert rel_err(logits, arrays["logits"]) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_compute(case):
  """bf16 matmuls/convs with float32 params, norms and softmax.

  bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3). Activations and
  weights are rounded at every matmul of 4 backbone and 2-4 global blocks, so the
  max-normalised logit error is a few u; measured 0.9-1.1e-2. Bound: 8u = 3.1e-2.
  """
  arrays, c = golden_case(case)
  cfg = model_config(None, **c, dtype="bfloat16")
  model = model_from_tree(cfg, torch_tensors_to_tree(canonical_state_dict(load(case))[0], cfg))
  logits = model(jnp.asarray(torch_input_to_jax(arrays["input"])))
  assert logits.dtype == jnp.float32
  assert rel_err(logits, arrays["logits"]) < 8 * 2.0 ** -8


def _tree(model):
  return nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))


def test_scanned_equals_unscanned(x64):
  ref, arrays = golden_model("tiny_ssv2", mlp_dropout=0.0, cls_dropout=0.0)
  scanned, _ = golden_model("tiny_ssv2", mlp_dropout=0.0, cls_dropout=0.0, scan_layers=True)
  x = jnp.asarray(torch_input_to_jax(arrays["input"]), jnp.float64)
  assert rel_err(scanned(x), arrays["logits"]) < 1e-9
  assert rel_err(scanned(x, train=True), ref(x, train=True)) < 1e-12
  # BatchNorm statistics were updated identically in both layouts.
  a, b = flatten(_tree(ref)), flatten(unstack_layers(_tree(scanned)))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-12, atol=1e-15)
  # Layout conversions are exact inverses.
  restacked = flatten(stack_layers(unstack_layers(_tree(scanned))))
  for k, v in flatten(_tree(scanned)).items():
    np.testing.assert_array_equal(np.asarray(restacked[k]), np.asarray(v))


@functools.lru_cache  # the remat="none" reference of a (case, scan) serves several cases
def _loss_and_grads(case, scan, remat, blocks):
  """(loss, {path: gradient}) of sum(logits ** 2) in train mode, float64 (call under x64)."""
  arrays, _ = golden_case(case)
  x = jnp.asarray(torch_input_to_jax(arrays["input"]), jnp.float64)
  model, _ = golden_model(case, mlp_dropout=0.0, cls_dropout=0.0,
                          scan_layers=scan, remat=remat, remat_blocks=blocks)
  loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x, train=True) ** 2))(model)
  return float(loss), {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(grads)).items()}


@pytest.mark.xdist_group("remat")  # one worker computes each reference once (--dist loadgroup)
@pytest.mark.parametrize("case,scan,remat,blocks", [
    ("tiny_ssv2", False, "full", -1), ("tiny_ssv2", True, "dots", -1),
    ("tiny_ssv2", False, "full", 1), ("tiny_ssv2", True, "full", 2),
    ("tiny_k400", True, "full", 1)])
def test_remat_same_outputs_and_gradients(case, scan, remat, blocks, x64):
  """remat_blocks=N: the first N blocks rematerialised (scanned: tiny_ssv2 in scans [0, 2)
  and [2, 4); tiny_k400, return_list 2, 3, in [0, 1), [1, 2), [2, 4))."""
  loss0, g0 = _loss_and_grads(case, scan, "none", -1)  # remat_blocks applies to remat only
  loss, g = _loss_and_grads(case, scan, remat, blocks)
  assert abs(loss - loss0) <= 1e-12 * abs(loss0)
  assert g.keys() == g0.keys()
  for k in g0:
    np.testing.assert_allclose(g[k], g0[k], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("case,scan,blocks,expected", [
    ("tiny_ssv2", False, 1, [True, False, False, False]), ("tiny_ssv2", False, -1, [True] * 4),
    ("tiny_ssv2", True, 2, [True, False]), ("tiny_ssv2", True, -1, [True]),
    ("tiny_ssv2", True, 0, [False]),
    ("tiny_k400", True, 1, [True, False, False]),  # scans [0, 1) [1, 2) [2, 4): return_list 2, 3
    ("tiny_k400", True, 3, [True, True, False])])
def test_remat_blocks_are_the_first_n(case, scan, blocks, expected):
  """Which blocks (unscanned) or scans of blocks recompute: the first remat_blocks of them."""
  model, arrays = golden_model(case, dtype=jnp.float32, scan_layers=scan, remat="full",
                               remat_blocks=blocks)
  x = jnp.asarray(torch_input_to_jax(arrays["input"]), jnp.float32)
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x))(state)
  is_remat = lambda eqn: eqn.primitive.name in ("remat2", "checkpoint")
  if scan:
    found = [any(map(is_remat, e.params["jaxpr"].jaxpr.eqns))
             for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  else:  # a block without remat is inlined: count the rematerialised ones
    found = [True] * sum(map(is_remat, jaxpr.jaxpr.eqns))
    found += [False] * (4 - len(found))
  assert found == expected


def test_dropout_is_active_in_train_mode_only():
  model, arrays = golden_model("tiny_k400", dtype=jnp.float32, backbone_drop_path_rate=0.2,
                               drop_path_rate=0.4)
  x = jnp.asarray(torch_input_to_jax(arrays["input"]))
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
  a, b = model(x, train=True), model(x, train=True)
  assert not np.allclose(np.asarray(a), np.asarray(b))  # fresh masks each call
  key = jax.random.key(3)
  np.testing.assert_array_equal(np.asarray(model(x, train=True, key=key)),
                                np.asarray(model(x, train=True, key=key)))


def test_upstream_parameter_counts():
  assert count_params(abstract_model(model_config("b16", num_classes=400))) == 114_552_208
  assert round(count_params(abstract_model(model_config("l14", num_classes=400))) / 1e6, 2) == 354.10
  assert round(count_params(abstract_model(model_config("l14_336"))) / 1e6, 2) == 354.43
  ssv2 = model_config("b16", no_lmhra=False, temporal_downsample=True, t_size=16,
                      return_list=tuple(range(4, 12)), num_classes=174)
  assert round(count_params(abstract_model(ssv2)) / 1e6, 2) == 162.99


@pytest.mark.parametrize("name,frames,classes", [("b16", 8, 400), ("l14", 16, 710),
                                                 ("l14_336", 32, 339)])
def test_presets_any_frames_any_classes(name, frames, classes):
  cfg = model_config(name, t_size=frames, num_classes=classes)
  model = abstract_model(cfg)
  res = cfg.input_resolution
  out = nnx.eval_shape(lambda m: m(jnp.zeros((2, frames, res, res, 3))), model)
  assert out.shape == (2, classes)


def test_config_speaks_upstream_names():
  cfg = model_config("l14", t_size=16, no_lmhra=False, temporal_downsample=True, n_dim=1024,
                     return_list=[8, 9, 10], mlp_dropout=0.3)
  assert (cfg.frames, cfg.n_layers, cfg.mlp_dropout) == (8, 3, (0.3, 0.3, 0.3))
  with pytest.raises(ValueError, match="Unknown UniFormerV2 config field.*'depth'"):
    model_config("b16", depth=3)
  with pytest.raises(ValueError, match="n_layers=2 but return_list has 3"):
    model_config("b16", return_list=[1, 2, 3], n_layers=2)
  with pytest.raises(ValueError, match=r"remat_blocks=13 must lie in \[0, layers=12\]"):
    model_config("b16", remat="full", remat_blocks=13)


def test_wrong_input_shape_is_explained():
  model, arrays = golden_model("tiny_k400", dtype=jnp.float32)
  with pytest.raises(ValueError, match=r"expects clips of shape \(N, 4, 32, 32, 3\)"):
    model(jnp.zeros((1, 8, 32, 32, 3)))


def test_checkpoint_of_another_model_names_keys_and_shapes():
  _, k400 = golden_case("tiny_k400")
  with pytest.raises(CheckpointMismatchError) as err:
    from_torch_state_dict(load("tiny_ssv2"), model_config(None, **k400))
  msg = str(err.value)
  assert "conv1.weight: checkpoint has (48, 3, 3, 8, 8), config expects (64, 3, 1, 8, 8)" in msg
  assert "unexpected: transformer.dec.2." in msg  # tiny_ssv2 has 4 global blocks, tiny_k400 2


def test_head_of_another_label_space():
  _, cfg = golden_case("tiny_k400")
  sd = dict(load("tiny_k400")["model_state"])
  sd["backbone.transformer.proj.2.weight"] = torch.zeros(710, 64)
  sd["backbone.transformer.proj.2.bias"] = torch.zeros(710)
  with pytest.raises(CheckpointMismatchError,
                     match=r"transformer.proj.2.weight: checkpoint has \(710, 64\), "
                           r"config expects \(10, 64\)"):
    from_torch_state_dict({"model_state": sd}, model_config(None, **cfg))


def test_every_file_wrapper_reads_the_same_weights():
  """{"module": ...} (some training scripts save so) too, as the command line reads it."""
  _, cfg = golden_case("tiny_k400")
  sd = load("tiny_k400")["model_state"]
  weights = lambda d: nnx.to_pure_dict(nnx.state(
      from_torch_state_dict(d, model_config(None, **cfg)), WEIGHTS))
  want = weights(sd)
  for wrapped in ({"module": sd}, {"model": sd}, {"state_dict": {"module": sd}}):
    jax.tree.map(np.testing.assert_array_equal, weights(wrapped), want)


def test_truncated_state_dict_lists_missing_keys():
  _, cfg = golden_case("tiny_k400")
  sd = dict(load("tiny_k400", "{}_mmaction.pth")["state_dict"])
  del sd["cls_head.fc_cls.weight"], sd["backbone.transformer.dec.1.ln_3.bias"]
  with pytest.raises(CheckpointMismatchError,
                     match="2 missing: transformer.dec.1.ln_3.bias, transformer.proj.2.weight"):
    from_torch_state_dict({"state_dict": sd}, model_config(None, **cfg))


def test_l14_weights_into_b16_config():
  l14 = model_config("l14")
  shapes = torch_shapes(l14, flatten(weight_shapes(l14)))
  sd = {f"backbone.{k}": torch.empty(s) for k, s in shapes.items()}  # never touched
  with pytest.raises(CheckpointMismatchError) as err:
    from_torch_state_dict({"model_state": sd}, model_config("b16"))
  msg = str(err.value)
  assert "conv1.weight: checkpoint has (1024, 3, 1, 14, 14), config expects (768, 3, 1, 16, 16)" in msg
  assert "unexpected: transformer.resblocks.12." in msg


def test_depthwise_conv_implementations_agree(x64):
  from uniformerv2_jax.layers import depthwise_conv3d
  x = jax.random.normal(jax.random.key(0), (2, 4, 5, 5, 6), jnp.float64)
  k = jax.random.normal(jax.random.key(1), (3, 3, 3, 6), jnp.float64)
  b = jax.random.normal(jax.random.key(2), (6,), jnp.float64)
  loss = lambda impl: lambda x, k, b: jnp.sum(depthwise_conv3d(x, k, b, impl=impl) ** 2)
  assert rel_err(depthwise_conv3d(x, k, b, impl="shift"), depthwise_conv3d(x, k, b, impl="conv")) < 1e-13
  for g_shift, g_conv in zip(jax.grad(loss("shift"), (0, 1, 2))(x, k, b),
                             jax.grad(loss("conv"), (0, 1, 2))(x, k, b)):
    assert rel_err(g_shift, g_conv) < 1e-13


def _rounded_once(got, exact):
  """Share of the bfloat16 `got` that is not `exact` (float64) rounded once to bfloat16."""
  want = np.asarray(exact.astype(jnp.bfloat16).astype(jnp.float64))
  return (np.asarray(got.astype(jnp.float64)) != want).mean()


@pytest.mark.parametrize("impl", ["shift", "conv"])
def test_depthwise_conv_in_bfloat16_rounds_once(x64, impl):
  """bfloat16 in and out, summed as a convolution under autocast sums (float32, bias
  included): the output and the input's gradient are the exact results of the bfloat16
  values rounded once (a bfloat16 running sum of the 27 terms is not, for ~70% of them)."""
  from uniformerv2_jax.layers import depthwise_conv3d
  x = jax.random.normal(jax.random.key(0), (2, 8, 14, 14, 64), jnp.bfloat16)
  k = (0.2 * jax.random.normal(jax.random.key(1), (3, 3, 3, 64))).astype(jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (64,), jnp.bfloat16)
  g = jax.random.normal(jax.random.key(3), x.shape, jnp.bfloat16)  # a cotangent
  f64 = lambda a: a.astype(jnp.float64)
  conv = lambda impl: lambda x: depthwise_conv3d(x, k.astype(x.dtype), b.astype(x.dtype), impl=impl)
  got, vjp = jax.vjp(conv(impl), x)
  exact, vjp64 = jax.vjp(conv("shift"), f64(x))
  assert got.dtype == vjp(g)[0].dtype == jnp.bfloat16
  assert _rounded_once(got, exact) < 1e-3  # float32 sums land off a bfloat16 tie only rarely
  assert _rounded_once(vjp(g)[0], vjp64(f64(g))[0]) < 1e-3


def test_temporal_taps_in_bfloat16_round_once(x64):
  """The Local MHRA's (3, 1, 1) depthwise convolution: as a float64 Conv3d of the bfloat16
  values (torch's, an independent reference), rounded once."""
  from uniformerv2_jax.layers import temporal_taps
  x = jax.random.normal(jax.random.key(0), (2, 8, 50, 16), jnp.bfloat16)
  k = jax.random.normal(jax.random.key(1), (3, 16), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(2), (16,), jnp.bfloat16)
  conv = torch.nn.Conv3d(16, 16, (3, 1, 1), padding=(1, 0, 0), groups=16).double()
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(np.asarray(k, np.float64).T.reshape(16, 1, 3, 1, 1)))
    conv.bias.copy_(torch.from_numpy(np.asarray(b, np.float64)))
    exact = conv(torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2)[..., None])
  exact = jnp.asarray(exact[..., 0].permute(0, 2, 3, 1).numpy())
  assert _rounded_once(temporal_taps(x, k, b), exact) < 1e-3


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4, 5])
def test_temporal_kernel_pads_as_upstream_conv3d(kernel_size):
  """Conv3d(kernel (k, p, p), stride (2, p, p), padding ((k - 1) // 2, 0, 0)) as upstream: the
  number of token frames torch's own Conv3d gives, for odd and even kernels."""
  cfg = model_config(None, input_resolution=32, patch_size=16, width=32, layers=1, heads=2,
                     return_list=(0,), n_head=2, t_size=8, temporal_downsample=True,
                     kernel_size=kernel_size)
  conv = torch.nn.Conv3d(3, 4, (kernel_size, 16, 16), (2, 16, 16), ((kernel_size - 1) // 2, 0, 0))
  want = conv(torch.zeros(1, 3, 8, 32, 32)).shape[2]
  model = UniFormerV2(cfg, rngs=nnx.Rngs(0))
  tokens = model.backbone.embed(jnp.zeros((1, 8, 32, 32, 3)))
  assert tokens.shape[0] == want == cfg.frames
  assert model(jnp.zeros((1, 8, 32, 32, 3))).shape == (1, cfg.num_classes)

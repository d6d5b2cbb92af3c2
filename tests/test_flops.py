"""The analytic cost behind MFU and the TPU sizing (uniformerv2_jax/flops.py): FLOPs counted
against the matmuls and convolutions in the model's jaxpr and XLA's cost model of the compiled
forward; device peaks by jax's device kinds; what the TPU compilation asks libtpu for."""

import math
import types

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jex_core


FLOPS_MODELS = {
    # Local MHRA twice a block + temporal downsampling (kernel 3, stride 2) + 2 global blocks
    "lmhra-downsample": dict(no_lmhra=False, double_lmhra=True, temporal_downsample=True),
    # one Local MHRA a block, a narrower global-block MLP
    "single-lmhra": dict(no_lmhra=False, double_lmhra=False, mlp_factor=2.0),
    # the Kinetics recipe's backbone: no Local MHRA, no downsampling
    "plain": dict(no_lmhra=True, temporal_downsample=False),
}
N_CLIPS = 2


def _flops_model(name):
  from uniformerv2_jax import model_config
  return model_config(None, input_resolution=32, patch_size=8, width=128, layers=2, heads=4,
                      return_list=(0, 1), n_head=4, t_size=8, num_classes=10,
                      **FLOPS_MODELS[name])


def _forward(cfg):
  """(f(weights, video) -> logits, abstract weights, abstract video): inference, no memory."""
  from flax import nnx

  from uniformerv2_jax.weights import abstract_model
  graph, weights, rest = nnx.split(abstract_model(cfg), (nnx.Param, nnx.BatchStat), ...)
  video = jax.ShapeDtypeStruct((N_CLIPS, cfg.t_size, cfg.input_resolution,
                                cfg.input_resolution, 3), jnp.float32)
  return lambda w, x: nnx.merge(graph, w, rest)(x, train=False), weights, video


def _matmul_macs(jaxpr) -> int:
  """Multiply-adds of every dot_general and convolution in a jaxpr (nested ones included)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    assert name not in ("while", "cond"), name  # no trip counts or branches to guess
    if name == "dot_general":
      (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      total += math.prod(lhs) * math.prod(
          d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // out_features
    times = eqn.params["length"] if name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          total += times * _matmul_macs(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          total += times * _matmul_macs(sub)
  return total


@pytest.mark.parametrize("name", FLOPS_MODELS)
def test_forward_macs_count_the_model_matmuls(name, monkeypatch):
  """forward_macs is exactly the multiply-adds of every matmul and convolution the model
  traces, plus the Local MHRA's depthwise temporal taps (the one convolution computed
  elementwise), counted from the traced shapes and the weights, not from the formula."""
  from uniformerv2_jax import layers
  from uniformerv2_jax.flops import forward_macs
  monkeypatch.setattr(layers, "DEPTHWISE_IMPL", "conv")  # the DPE as a grouped conv (same numbers)
  cfg = _flops_model(name)
  f, weights, video = _forward(cfg)
  traced = _matmul_macs(jax.make_jaxpr(f)(weights, video).jaxpr)
  # Local MHRA: a (taps, channels) depthwise kernel applied at every non-class token
  dw = [leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(weights)[0]
        if "dw_kernel" in jax.tree_util.keystr(path)]
  assert len(dw) == (0 if cfg.no_lmhra else (2 if cfg.double_lmhra else 1) * cfg.layers)
  tokens = N_CLIPS * cfg.frames * cfg.grid ** 2
  assert N_CLIPS * forward_macs(cfg) == traced + sum(tokens * math.prod(s) for s in dw)


@pytest.mark.parametrize("name", ["lmhra-downsample", "plain"])
def test_inference_flops_match_xla_cost_analysis(name):
  """XLA's cost model of the compiled forward counts 2 FLOPs a multiply-add plus every
  elementwise op (LayerNorm, softmax, GELU, bias and residual adds): never less than the
  analytic count, and more by O(width) elementwise flops per O(width^2) matmul ones, a share
  of about k / width (B/16, width 768: 148.73 vs 148.10 GMACs, k = 3.3; here, width 128:
  k = 2.6 and 4.3). Allowed: 0 <= share <= 8 / width."""
  from uniformerv2_jax.flops import inference_flops_per_clip
  cfg = _flops_model(name)
  f, weights, video = _forward(cfg)
  cost = jax.jit(f).lower(weights, video).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = N_CLIPS * inference_flops_per_clip(cfg)
  excess = float(cost["flops"]) / analytic - 1
  assert 0 <= excess <= 8 / cfg.width, (name, float(cost["flops"]), analytic, excess)


@pytest.mark.parametrize("name", ["plain", "lmhra-downsample"])
@pytest.mark.parametrize("frozen", [False, True])
def test_train_flops_bound_the_traced_gradient_matmuls(name, frozen, monkeypatch):
  """train_flops_per_clip (the training log's MFU) against the multiply-adds autodiff traces
  for the gradient of the trainable parameters: at most the analytic count, which includes
  input gradients autodiff prunes (the patch embedding's; with a frozen backbone, the global
  blocks' inputs) and at least 95% of it (the Local MHRA's depthwise taps are elementwise,
  not traced as matmuls). A frozen backbone runs forward only: 1.3 forwards here, not 3."""
  import dataclasses

  from uniformerv2_jax import layers
  from uniformerv2_jax.flops import train_flops_per_clip
  from uniformerv2_jax.training.optim import merge_trainable, trainable
  monkeypatch.setattr(layers, "DEPTHWISE_IMPL", "conv")
  cfg = dataclasses.replace(_flops_model(name), frozen=frozen)
  f, weights, video = _forward(cfg)
  grad = jax.grad(lambda tw, w, x: f(merge_trainable(w, tw), x).sum())
  traced = _matmul_macs(jax.make_jaxpr(grad)(trainable(weights, frozen), weights, video).jaxpr)
  analytic = N_CLIPS * train_flops_per_clip(cfg) / 2
  assert 0.95 * analytic <= traced <= analytic, (traced / analytic)


@pytest.mark.parametrize("kind,peak", [
    ("TPU v5", 459e12),  # a v5p chip: the device_kind of libtpu's v5p:4x4x4 topology
    ("TPU v5 lite", 197e12),  # v5e: not a v5p
    ("TPU v4", 275e12),
    ("NVIDIA H100 80GB HBM3", 797e12),  # the lent H100's name; its measured bf16 matmul peak
    ("cpu", None)])
def test_device_peaks_follow_jax_device_kinds(kind, peak):
  """MFU and the TPU compilation's step times divide by these: a v5p chip, whose kind does
  not say "v5p", had none (and the training log had another H100 peak than the benchmark)."""
  from uniformerv2_jax.flops import device_peak_flops
  assert device_peak_flops(types.SimpleNamespace(device_kind=kind)) == peak


@pytest.mark.parametrize("topology,chip_config", [
    ("v4:4x4x4", "megacore"), ("v5p:4x4x4", "megacore"), ("v5e:4x4", None)])
def test_tpu_compilation_describes_chips_as_a_real_slice_runs_them(topology, chip_config,
                                                                    monkeypatch):
  """libtpu's default v4 description makes each TensorCore a device (128 of 15.25 GiB for
  v4:4x4x4, measured with libtpu 0.0.42.1); a v4 job runs one megacore device a chip (64 of
  30.75 GiB). libtpu is not installed here: what the tool asks of it is what is checked."""
  from jax.experimental import topologies

  from uniformerv2_jax.training import aot
  asked = []
  monkeypatch.setattr(topologies, "get_topology_desc", lambda name, platform, **kw: asked.append(
      (name, platform, kw)) or types.SimpleNamespace(devices=["device"]))
  assert aot.topology_devices(topology) == ["device"]
  assert asked == [(topology, "tpu", {"chip_config_name": chip_config} if chip_config else {})]

"""Parameter names and layouts of the PyTorch UniFormerV2 checkpoints, both ways.

Canonical torch names are the original repository's names without the `backbone.`
prefix (`conv1.weight`, `transformer.resblocks.0.attn.in_proj_weight`,
`transformer.proj.2.weight`, ...). mmaction2 differs only in the head:
`backbone.transformer.norm.*` is `transformer.proj.0.*` and `cls_head.fc_cls.*` is
`transformer.proj.2.*`.

Every rule maps one torch tensor to one leaf of the JAX parameter tree (the
unscanned layout of `nnx.to_pure_dict(nnx.state(model))`) with a function and its
inverse, so import and export are the same table read in two directions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from uniformerv2_jax.config import ModelConfig

Path = tuple[Any, ...]


class CheckpointMismatchError(ValueError):
  """Weights that do not fit the model config; the message lists the keys."""


@dataclasses.dataclass(frozen=True)
class Rule:
  torch: str
  path: Path
  to_jax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


_same = (lambda a: a, lambda a: a)
_linear = (lambda w: w.T, lambda k: k.T)  # torch (out, in) <-> jax (in, out)
_conv1x1 = (lambda w: w[:, :, 0, 0, 0].T, lambda k: k.T[:, :, None, None, None])


def _fused_in(n):
  """in_proj (n*C, C) <-> (C, n, C); bias (n*C,) <-> (n, C)."""
  return ((lambda w: w.reshape(n, w.shape[1], w.shape[1]).transpose(2, 0, 1)),
          (lambda k: k.transpose(1, 2, 0).reshape(n * k.shape[0], k.shape[0])))


def _fused_bias(n):
  return (lambda b: b.reshape(n, -1)), (lambda b: b.reshape(-1))


def _ln(torch_prefix, path) -> list[Rule]:
  return [Rule(f"{torch_prefix}.weight", path + ("scale",), *_same),
          Rule(f"{torch_prefix}.bias", path + ("bias",), *_same)]


def _dense(torch_prefix, path) -> list[Rule]:
  return [Rule(f"{torch_prefix}.weight", path + ("kernel",), *_linear),
          Rule(f"{torch_prefix}.bias", path + ("bias",), *_same)]


def _lmhra(t, path) -> list[Rule]:
  pe = f"{t}.pos_embed"
  return [
      Rule(f"{pe}.0.weight", path + ("bn", "scale"), *_same),
      Rule(f"{pe}.0.bias", path + ("bn", "bias"), *_same),
      Rule(f"{pe}.0.running_mean", path + ("bn", "mean"), *_same),
      Rule(f"{pe}.0.running_var", path + ("bn", "var"), *_same),
      Rule(f"{pe}.1.weight", path + ("down", "kernel"), *_conv1x1),
      Rule(f"{pe}.1.bias", path + ("down", "bias"), *_same),
      Rule(f"{pe}.2.weight", path + ("dw_kernel",),
           lambda w: w[:, 0, :, 0, 0].T, lambda k: k.T[:, None, :, None, None]),
      Rule(f"{pe}.2.bias", path + ("dw_bias",), *_same),
      Rule(f"{pe}.3.weight", path + ("up", "kernel"), *_conv1x1),
      Rule(f"{pe}.3.bias", path + ("up", "bias"), *_same),
  ]


def backbone_rules(cfg: ModelConfig) -> list[Rule]:
  """The CLIP image tower (+ Local MHRA): names shared by CLIP and UniFormerV2."""
  rules = [
      Rule("conv1.weight", ("backbone", "patch_embed"),
           lambda w: w.transpose(2, 3, 4, 1, 0), lambda k: k.transpose(4, 3, 0, 1, 2)),
      Rule("class_embedding", ("backbone", "class_embedding"), *_same),
      Rule("positional_embedding", ("backbone", "pos_embedding"), *_same),
      *_ln("ln_pre", ("backbone", "ln_pre")),
  ]
  for i in range(cfg.layers):
    t, p = f"transformer.resblocks.{i}", ("backbone", "blocks", i)
    rules += [
        Rule(f"{t}.attn.in_proj_weight", p + ("qkv", "kernel"), *_fused_in(3)),
        Rule(f"{t}.attn.in_proj_bias", p + ("qkv", "bias"), *_fused_bias(3)),
        *_dense(f"{t}.attn.out_proj", p + ("out",)),
        *_ln(f"{t}.ln_1", p + ("ln_1",)),
        *_ln(f"{t}.ln_2", p + ("ln_2",)),
        *_dense(f"{t}.mlp.c_fc", p + ("mlp", "fc")),
        *_dense(f"{t}.mlp.c_proj", p + ("mlp", "proj")),
    ]
    if not cfg.no_lmhra:
      rules += _lmhra(f"{t}.lmhra1", p + ("lmhra1",))
      if cfg.double_lmhra:
        rules += _lmhra(f"{t}.lmhra2", p + ("lmhra2",))
  return rules


def global_rules(cfg: ModelConfig) -> list[Rule]:
  """Global MHRA and head."""
  q_in = (lambda w: w[: w.shape[1]].T, None)
  kv_in = (lambda w: _fused_in(2)[0](w[w.shape[1]:]), None)
  rules = [Rule("transformer.temporal_cls_token", ("temporal", "cls_token"), *_same)]
  for j in range(cfg.n_layers):
    t, p = f"transformer.dec.{j}", ("temporal", "dec", j)
    rules += [
        Rule(f"transformer.dpe.{j}.weight", ("temporal", "dpe", j, "kernel"),
             lambda w: w[:, 0].transpose(1, 2, 3, 0), lambda k: k.transpose(3, 0, 1, 2)[:, None]),
        Rule(f"transformer.dpe.{j}.bias", ("temporal", "dpe", j, "bias"), *_same),
        # The fused in_proj feeds two leaves (q and kv); see `_split_fused`.
        Rule(f"{t}.attn.in_proj_weight", p + ("q", "kernel"), *q_in),
        Rule(f"{t}.attn.in_proj_weight", p + ("kv", "kernel"), *kv_in),
        Rule(f"{t}.attn.in_proj_bias", p + ("q", "bias"), lambda b: b[: b.shape[0] // 3], None),
        Rule(f"{t}.attn.in_proj_bias", p + ("kv", "bias"),
             lambda b: b[b.shape[0] // 3:].reshape(2, -1), None),
        *_dense(f"{t}.attn.out_proj", p + ("out",)),
        *_ln(f"{t}.ln_1", p + ("ln_1",)),
        *_ln(f"{t}.ln_2", p + ("ln_2",)),
        *_ln(f"{t}.ln_3", p + ("ln_3",)),
        *_dense(f"{t}.mlp.c_fc", p + ("mlp", "fc")),
        *_dense(f"{t}.mlp.c_proj", p + ("mlp", "proj")),
    ]
  if not cfg.frozen:
    rules.append(Rule("transformer.balance", ("temporal", "balance"), *_same))
  rules += _ln("transformer.proj.0", ("head", "norm"))
  rules += _dense("transformer.proj.2", ("head", "fc"))
  return rules


def model_rules(cfg: ModelConfig) -> list[Rule]:
  return backbone_rules(cfg) + global_rules(cfg)


# ---------------------------------------------------------------------------------------
# Reading the upstream files' structure.

_IGNORED_SUFFIXES = ("num_batches_tracked",)
_MMACTION_RENAMES = (("transformer.norm.", "transformer.proj.0."),)


def to_numpy(t) -> np.ndarray:
  """A torch tensor (any float dtype, incl. bfloat16/float16) or array -> numpy."""
  if hasattr(t, "detach"):
    t = t.detach().cpu()
    if not t.is_floating_point() or t.dtype.itemsize < 4:
      t = t.float() if t.is_floating_point() else t
    return t.numpy()
  return np.asarray(t)


# Keys that hold the state dict in a saved file, outermost first: the original repository's
# checkpoints, mmaction2's and other training scripts' (DistributedDataParallel's "module."
# key prefix is removed below).
WRAPPERS = ("model_state", "state_dict", "model", "module")


def canonical_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
  """Unwraps either upstream layout into canonical names; returns (dict, layout name).

  Accepts the original repository's training checkpoint (`{"model_state": ...}`) or
  plain state dict with `backbone.` names, and mmaction2's `{"state_dict": ...}` with
  `backbone.*` and `cls_head.fc_cls.*`.
  """
  sd = state_dict
  for wrapper in WRAPPERS:
    if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
      sd = sd[wrapper]
  if not isinstance(sd, Mapping) or not sd:
    raise CheckpointMismatchError("not a state dict: expected a mapping of parameter names "
                                  "to tensors (or one under 'model_state'/'state_dict')")
  keys = list(sd)
  if keys and all(k.startswith("module.") for k in keys):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  layout = "mmaction2" if any(k.startswith("cls_head.") for k in sd) or any(
      k.startswith("backbone.transformer.norm.") for k in sd) else "original"
  out = {}
  for k, v in sd.items():
    if k.startswith("cls_head.fc_cls."):
      k = "transformer.proj.2." + k[len("cls_head.fc_cls."):]
    elif k.startswith("backbone."):
      k = k[len("backbone."):]
      for old, new in _MMACTION_RENAMES:
        if k.startswith(old):
          k = new + k[len(old):]
    out[k] = v
  return out, layout


def _expected_torch_shape(rule: Rule, jax_shape) -> tuple[int, ...] | None:
  if rule.to_torch is None:
    return None
  # np.zeros is lazily allocated and the layout functions are views or small copies.
  return tuple(rule.to_torch(np.zeros(jax_shape, np.float32)).shape)


def apply_rules(rules: list[Rule], tensors: Mapping[str, Any], expected: Mapping[Path, Any],
                source: str = "checkpoint", ignore_unexpected=lambda k: False
                ) -> dict[Path, np.ndarray]:
  """Maps torch tensors to {jax path: array}; raises one error listing every problem."""
  missing, shape_errors, out = [], [], {}
  used = set()
  for rule in rules:
    if rule.torch not in tensors:
      missing.append(rule.torch)
      continue
    used.add(rule.torch)
    arr = to_numpy(tensors[rule.torch])
    want = tuple(expected[rule.path].shape)
    try:
      value = rule.to_jax(arr)
    except (ValueError, IndexError):
      value = None
    if value is None or tuple(value.shape) != want:
      exp = _expected_torch_shape(rule, want) or f"(jax {want})"
      shape_errors.append(f"{rule.torch}: {source} has {tuple(arr.shape)}, config expects {exp}")
      continue
    out[rule.path] = value
  unexpected = sorted(k for k in tensors if k not in used
                      and not k.endswith(_IGNORED_SUFFIXES) and not ignore_unexpected(k))
  if missing or shape_errors or unexpected:
    parts = []
    if shape_errors:
      parts.append(f"{len(shape_errors)} mis-shaped: " + "; ".join(shape_errors[:20]))
    if missing:
      parts.append(f"{len(missing)} missing: " + ", ".join(missing[:20])
                   + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected: " + ", ".join(unexpected[:20])
                   + (" ..." if len(unexpected) > 20 else ""))
    raise CheckpointMismatchError(
        f"{source} does not fit the model config; " + ". ".join(parts)
        + ". Check the preset/overrides (width, layers, Local MHRA, temporal_downsample, "
          "n_layers, num_classes, frozen) against the checkpoint.")
  return out


def export_tensors(tree: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Unscanned JAX tree -> canonical torch names (fused in_proj re-assembled)."""
  def get(path):
    node = tree
    for p in path:
      node = node[p]
    return np.asarray(node)

  out = {}
  for rule in model_rules(cfg):
    if rule.to_torch is not None:
      out[rule.torch] = rule.to_torch(get(rule.path))
  for j in range(cfg.n_layers):
    p = ("temporal", "dec", j)
    q_k, kv_k = get(p + ("q", "kernel")), get(p + ("kv", "kernel"))
    out[f"transformer.dec.{j}.attn.in_proj_weight"] = np.concatenate(
        [q_k.T, _fused_in(2)[1](kv_k)], axis=0)
    out[f"transformer.dec.{j}.attn.in_proj_bias"] = np.concatenate(
        [get(p + ("q", "bias")), get(p + ("kv", "bias")).reshape(-1)])
  return out


def to_layout(tensors: Mapping[str, np.ndarray], layout: str) -> dict[str, Any]:
  """Canonical names -> the structure the upstream code loads."""
  if layout == "original":
    return {"model_state": {f"backbone.{k}": v for k, v in tensors.items()}}
  if layout == "mmaction2":
    sd = {}
    for k, v in tensors.items():
      if k.startswith("transformer.proj.2."):
        sd["cls_head.fc_cls." + k[len("transformer.proj.2."):]] = v
      elif k.startswith("transformer.proj.0."):
        sd["backbone.transformer.norm." + k[len("transformer.proj.0."):]] = v
      else:
        sd[f"backbone.{k}"] = v
    return {"meta": {}, "state_dict": sd}
  raise ValueError(f"unknown layout {layout!r}; use 'original' or 'mmaction2'")


def torch_shapes(cfg: ModelConfig, jax_shapes: Mapping[Path, Any]) -> dict[str, tuple[int, ...]]:
  """Canonical torch name -> shape that a checkpoint for `cfg` must have."""
  shapes = {}
  for rule in model_rules(cfg):
    if rule.to_torch is not None:
      shapes[rule.torch] = _expected_torch_shape(rule, tuple(jax_shapes[rule.path].shape))
  c = cfg.width
  for j in range(cfg.n_layers):
    shapes[f"transformer.dec.{j}.attn.in_proj_weight"] = (3 * c, c)
    shapes[f"transformer.dec.{j}.attn.in_proj_bias"] = (3 * c,)
  return shapes

"""CLIP image tower -> a complete initial UniFormerV2, initialised as the upstream does.

Accepted layouts: OpenAI's full CLIP (`visual.*`, TorchScript `.pt` or plain state
dict; the text tower is ignored even where its names collide), and the extracted image
tower (no prefix; upstream `vit_b16.pth`, mmaction2's `clipVisualEncoder` files, also
under `backbone.` or `state_dict`). `proj` and `ln_post.*` (unused by UniFormerV2) are
dropped. Everything the CLIP tower does not hold comes from a freshly initialised
`UniFormerV2(cfg, rngs=nnx.Rngs(seed))`, whose initialisation mirrors the upstream
(Local MHRA last conv zero, global blocks' output projection zero, zero temporal
class token and balance, ...).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from uniformerv2_jax.config import ModelConfig
from uniformerv2_jax.torch_layout import apply_rules, backbone_rules, to_numpy
from uniformerv2_jax.weights import flatten, nest, weight_shapes

from convert.io import ConversionError

_UNUSED = ("proj", "ln_post.weight", "ln_post.bias")


def image_tower(tensors: Mapping[str, Any], source: str) -> dict[str, Any]:
  """Canonical CLIP image-tower names (conv1.weight, transformer.resblocks.*, ...)."""
  keys = list(tensors)
  if any("transformer.dec." in k for k in keys):  # either upstream layout
    raise ConversionError(f"{source} is a UniFormerV2 model (it has transformer.dec.*); "
                          "convert it with `python -m convert uniformerv2`")
  if any(k.startswith("visual.") for k in keys):
    out = {k[len("visual."):]: v for k, v in tensors.items() if k.startswith("visual.")}
  elif keys and all(k.startswith("backbone.") for k in keys):
    out = {k[len("backbone."):]: v for k, v in tensors.items()}
  elif keys and all(k.startswith("module.") for k in keys):
    out = {k[len("module."):]: v for k, v in tensors.items()}
  else:
    out = dict(tensors)
  if "conv1.weight" not in out or "class_embedding" not in out:
    raise ConversionError(
        f"{source}: unknown layout, not a CLIP image tower (no conv1.weight / class_embedding "
        f"with or without 'visual.'); first keys: {keys[:8]}")
  return {k: v for k, v in out.items() if k not in _UNUSED}


def inflate_conv1(w: np.ndarray, kt: int) -> np.ndarray:
  """(C, 3, p, p) -> (C, 3, kt, p, p) with the 2D kernel on the centre tap, zeros elsewhere."""
  out = np.zeros((w.shape[0], w.shape[1], kt, *w.shape[2:]), w.dtype)
  out[:, :, kt // 2] = w
  return out


def resize_pos_embedding(pos: np.ndarray, grid: int) -> np.ndarray:
  """(1 + g*g, C) -> (1 + grid*grid, C): bicubic on the patch grid (class position kept).

  Same as torch.nn.functional.interpolate(mode="bicubic", align_corners=False).
  """
  import torch
  cls, tokens = pos[:1], pos[1:]
  g = int(round(np.sqrt(tokens.shape[0])))
  x = torch.from_numpy(np.ascontiguousarray(tokens.reshape(g, g, -1).transpose(2, 0, 1)))
  x = torch.nn.functional.interpolate(x[None].double(), size=(grid, grid), mode="bicubic",
                                      align_corners=False)[0]
  x = x.numpy().astype(pos.dtype).transpose(1, 2, 0).reshape(grid * grid, -1)
  return np.concatenate([cls, x], axis=0)


def convert_clip(tensors: Mapping[str, Any], cfg: ModelConfig,
                 init: Callable[[frozenset], Mapping[tuple, Any]], source: str,
                 log: Callable[[str], None] = print) -> dict:
  """CLIP tensors -> the initial UniFormerV2 tree; `init(paths)` gives the other weights.

  `init` returns {path: array} for the weight paths the tower does not hold (the upstream
  initialisation: `convert.fresh_weights(cfg, seed, paths)`).
  """
  tower = image_tower(tensors, source)
  conv = to_numpy(tower["conv1.weight"])
  kt = cfg.kernel_size if cfg.temporal_downsample else 1
  if conv.ndim == 4:
    conv = inflate_conv1(conv, kt)
  elif conv.ndim != 5 or conv.shape[2] != kt:
    raise ConversionError(f"{source}: conv1.weight {tuple(conv.shape)} is neither a 2D patch "
                          f"kernel nor a 3D one with {kt} temporal taps")
  tower["conv1.weight"] = conv
  pos = to_numpy(tower["positional_embedding"])
  want = cfg.grid * cfg.grid + 1
  if pos.shape[0] != want:
    g = int(round(np.sqrt(pos.shape[0] - 1)))
    tower["positional_embedding"] = resize_pos_embedding(pos, cfg.grid)
    log(f"note: {source} has a {g}x{g} positional grid; resized (bicubic) to "
        f"{cfg.grid}x{cfg.grid} for input_resolution {cfg.input_resolution}")
  rules = [r for r in backbone_rules(cfg) if ".lmhra" not in r.torch]
  expected = flatten(weight_shapes(cfg))
  found = apply_rules(rules, tower, expected, source=source)
  fresh = init(frozenset(expected) - set(found))
  return nest({path: np.asarray(found[path] if path in found else fresh[path]).astype(
      s.dtype, copy=False) for path, s in expected.items()})

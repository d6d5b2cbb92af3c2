"""Model configuration: the upstream constructor's arguments, plus speed knobs.

Field names follow `VisionTransformer(...)` in the original repository
(`slowfast/models/uniformerv2_model.py`), so an upstream config carries over:
`model_config("b16", t_size=16, no_lmhra=False, temporal_downsample=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Backbone sizes of the CLIP towers the paper builds on. Everything else defaults
# to the Kinetics recipe (no Local MHRA, no temporal downsampling, global blocks
# on the last four layers; docs/recipes.md "Model settings per family").
PRESETS: dict[str, dict[str, Any]] = {
    "b16": dict(input_resolution=224, patch_size=16, width=768, layers=12, heads=12,
                return_list=(8, 9, 10, 11), n_head=12),
    "l14": dict(input_resolution=224, patch_size=14, width=1024, layers=24, heads=16,
                return_list=(20, 21, 22, 23), n_head=16),
    "l14_336": dict(input_resolution=336, patch_size=14, width=1024, layers=24, heads=16,
                    return_list=(20, 21, 22, 23), n_head=16),
}

DTYPES = ("float32", "bfloat16", "float16", "float64")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every option of the upstream constructor, with the Kinetics B/16 recipe as default."""
  # Backbone (CLIP image tower).
  input_resolution: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  t_size: int = 8  # number of INPUT frames (halved inside when temporal_downsample)
  temporal_downsample: bool = False
  kernel_size: int = 3  # temporal kernel of the patch embedding when downsampling
  # Local MHRA.
  no_lmhra: bool = True
  double_lmhra: bool = True
  dw_reduction: float = 1.5
  backbone_drop_path_rate: float = 0.0
  # Global MHRA (the "decoder" of temporal class-token blocks).
  return_list: tuple[int, ...] = (8, 9, 10, 11)
  n_layers: int = 4
  n_head: int = 12
  mlp_factor: float = 4.0
  drop_path_rate: float = 0.0
  mlp_dropout: tuple[float, ...] = (0.5, 0.5, 0.5, 0.5)
  cls_dropout: float = 0.5
  num_classes: int = 400
  frozen: bool = False
  # Training semantics (not a constructor argument upstream): clips per upstream GPU. The
  # upstream trained with DDP, so each GPU drew its own DropPath masks (timm's DropPath on
  # sequence-first tensors: one per token position, or one per batch in the global blocks)
  # and took its own BatchNorm statistics; with replica_batch > 0 each consecutive group of
  # that many clips does the same (running statistics: the mean over groups). 0: the whole
  # (global) batch is one group, like SyncBatchNorm. The (micro-)batch must divide by it.
  replica_batch: int = 0
  # Speed and scale (not in the upstream).
  dtype: str = "float32"        # computation dtype; norms and softmax stay >= float32
  param_dtype: str = "float32"  # storage dtype of parameters
  scan_layers: bool = False     # lax.scan over backbone blocks (compile time flat in depth)
  remat: str = "none"           # rematerialise backbone blocks: none|full|dots|dots_no_batch
  remat_blocks: int = -1        # ... the first this many of them (the upstream's checkpoint_num);
                                # -1: all
  attention: str = "auto"       # auto (cudnn where it runs, else xla) | xla (einsum + float32
                                # softmax) | cudnn (fused flash attention, bf16/fp16 only)

  @property
  def n_dim(self) -> int:
    return self.width

  @property
  def grid(self) -> int:
    return self.input_resolution // self.patch_size

  @property
  def frames(self) -> int:
    """Temporal length of the token grid (input frames after downsampling)."""
    return self.t_size // 2 if self.temporal_downsample else self.t_size

  @property
  def lmhra_width(self) -> int:
    return int(self.width // self.dw_reduction)

  @property
  def mlp_width(self) -> int:
    return round(self.mlp_factor * self.width)

  def validate(self) -> "ModelConfig":
    problems = []
    if self.input_resolution % self.patch_size:
      problems.append(f"input_resolution {self.input_resolution} is not a multiple of "
                      f"patch_size {self.patch_size}")
    if self.width % self.heads or self.width % self.n_head:
      problems.append(f"width {self.width} must divide by heads {self.heads} and n_head {self.n_head}")
    if len(self.return_list) != self.n_layers:
      problems.append(f"n_layers={self.n_layers} but return_list has {len(self.return_list)} "
                      "entries (the upstream asserts they are equal)")
    if any(not 0 <= i < self.layers for i in self.return_list):
      problems.append(f"return_list {list(self.return_list)} must lie in [0, {self.layers})")
    if list(self.return_list) != sorted(set(self.return_list)):
      problems.append(f"return_list {list(self.return_list)} must be strictly increasing")
    if len(self.mlp_dropout) != self.n_layers:
      problems.append(f"mlp_dropout has {len(self.mlp_dropout)} entries for n_layers={self.n_layers}")
    if self.frames < 1 or (self.temporal_downsample and self.t_size % 2):
      problems.append(f"t_size={self.t_size} must be >= 1 (and even with temporal_downsample, "
                      "which halves it)")
    if not -1 <= self.remat_blocks <= self.layers:
      problems.append(f"remat_blocks={self.remat_blocks} must lie in [0, layers={self.layers}] "
                      "(-1: all)")
    if self.replica_batch < 0:
      problems.append(f"replica_batch={self.replica_batch} must be >= 0 (0: whole batch)")
    for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES),
                          ("remat", REMAT_POLICIES), ("attention", ATTENTION_IMPLS)):
      if getattr(self, name) not in allowed:
        problems.append(f"{name}={getattr(self, name)!r} is not one of {allowed}")
    if problems:
      raise ValueError("Invalid UniFormerV2 config: " + "; ".join(problems))
    return self

  def replace(self, **overrides) -> "ModelConfig":
    return _build(dataclasses.asdict(self), overrides)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["return_list"] = list(d["return_list"])
    d["mlp_dropout"] = list(d["mlp_dropout"])
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    return _build(dataclasses.asdict(cls()), d)


FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
# Upstream/golden arguments that carry no information for us.
_IGNORED = {"n_dim", "pretrained", "output_dim", "use_checkpoint", "checkpoint_num", "batch",
            "frames", "name"}


def _check_types(fields: dict[str, Any]) -> None:
  """Scalars of the right kind (an integer field gets an integer, ...), converted in place."""
  problems = []
  for f in dataclasses.fields(ModelConfig):
    value, default = fields[f.name], f.default
    number = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if isinstance(default, bool):
      ok = isinstance(value, (bool, np.bool_)) or (number and value in (0, 1))
    elif isinstance(default, int):
      ok = number and float(value).is_integer()
      value = int(value) if ok else value
    elif isinstance(default, float):
      ok = number
      value = float(value) if ok else value
    elif isinstance(default, str):
      ok = isinstance(value, str)
    else:  # return_list, mlp_dropout: numbers or sequences of them, converted by _build
      ok = isinstance(value, (numbers.Real, Sequence, np.ndarray)) and not isinstance(value, str)
    if not ok:
      problems.append(f"{f.name}={value!r} is not {_KINDS.get(type(default), 'a list')}")
    fields[f.name] = value
  if problems:
    raise ValueError("Invalid UniFormerV2 config: " + "; ".join(problems))


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_fields(fields: Mapping[str, Any]) -> None:
  """The names and value kinds of some config fields (upstream names), as a config built from
  them would check them; raises ValueError."""
  unknown = sorted(set(fields) - set(FIELDS) - _IGNORED)
  if unknown:
    raise ValueError(f"Unknown UniFormerV2 config field(s) {unknown}; valid fields: {list(FIELDS)}")
  _check_types({**dataclasses.asdict(ModelConfig()),
                **{k: v for k, v in fields.items() if k in FIELDS}})


def _build(base: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
  check_fields(overrides)
  fields = dict(base)
  fields.update({k: v for k, v in overrides.items() if k in FIELDS})
  if "n_dim" in overrides and int(overrides["n_dim"]) != int(fields["width"]):
    raise ValueError(f"n_dim={overrides['n_dim']} must equal width={fields['width']} "
                     "(the global blocks read the backbone's tokens)")
  _check_types(fields)
  fields["return_list"] = tuple(int(i) for i in fields["return_list"])
  if "return_list" in overrides and "n_layers" not in overrides:
    fields["n_layers"] = len(fields["return_list"])
  drop = fields["mlp_dropout"]
  if isinstance(drop, numbers.Real):
    drop = [drop] * fields["n_layers"]
  elif "mlp_dropout" not in overrides and len(drop) != fields["n_layers"]:
    drop = [drop[0] if drop else 0.5] * fields["n_layers"]
  fields["mlp_dropout"] = tuple(float(p) for p in drop)
  for name in ("temporal_downsample", "no_lmhra", "double_lmhra", "frozen", "scan_layers"):
    fields[name] = bool(fields[name])
  return ModelConfig(**fields).validate()


def model_config(name: str | None = "b16", **overrides) -> ModelConfig:
  """A preset ("b16", "l14", "l14_336") with any field overridden by its upstream name.

  `name=None` starts from the dataclass defaults (the B/16 Kinetics recipe).
  """
  base = dataclasses.asdict(ModelConfig())
  if name is not None:
    if name not in PRESETS:
      raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    base.update(PRESETS[name])
  return _build(base, overrides)

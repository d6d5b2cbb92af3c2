"""What a checkpoint's tensor shapes reveal about the model, checked against the config.

Shapes reveal width, depth, patch size, resolution, Local MHRA (single/double and its
reduction), temporal downsampling (and its kernel), the number of global blocks, the
MLP factor of the global blocks, the number of classes and whether the backbone was
frozen (no `balance`). They cannot reveal the frame count, the head counts or which
layers feed the global blocks: those come from the config, defaulting to the recipes'
conventions (global blocks on the LAST n_layers layers; heads = width // 64).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from typing import Any, Mapping

from uniformerv2_jax.config import FIELDS, PRESETS, ModelConfig, check_fields, model_config

from convert.io import ConversionError

# Preset fields that are facts about a CLIP tower (a mismatch means "another model").
_PRESET_FACTS = ("input_resolution", "patch_size", "width", "layers")


def parse_sets(items) -> dict[str, Any]:
  """["t_size=16", "return_list=[8,9,10,11]", "no_lmhra=false"] -> dict."""
  out = {}
  for item in items or ():
    if "=" not in item:
      raise ConversionError(f"--set {item!r}: expected FIELD=VALUE")
    key, text = item.split("=", 1)
    key = key.strip()
    if key not in FIELDS:
      raise ConversionError(f"--set {key}: unknown field; valid fields: {list(FIELDS)}")
    value: Any = text.strip()
    for parse in (json.loads, ast.literal_eval):
      try:
        value = parse(text.strip())
        break
      except (ValueError, SyntaxError):
        continue
    if isinstance(value, str) and value.lower() in ("true", "false"):
      value = value.lower() == "true"
    if isinstance(value, str) and "," in value:
      value = [int(v) for v in value.split(",") if v.strip()]
    out[key] = value
  return out


def base_fields(model: str) -> tuple[str | None, dict[str, Any], set[str]]:
  """--model b16|l14|l14_336|CONFIG.json -> (preset, fields, names stated explicitly)."""
  if model in PRESETS:
    return model, {}, set(_PRESET_FACTS)
  if os.path.isfile(os.path.join(model, "config.json")):
    model = os.path.join(model, "config.json")  # a model directory: its config
  if not os.path.isfile(model):
    what = ("no such file" if model.endswith(".json") or os.sep in model
            else "neither a preset nor a file")
    raise ConversionError(f"--model {model!r}: {what}; give a preset {sorted(PRESETS)} or a "
                          "JSON config file (a model directory's config.json)")
  try:
    with open(model) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{model}: not a JSON config ({e})") from None
  if isinstance(data, dict) and isinstance(data.get("config"), dict):
    data = data["config"]  # the golden files' {"name":..., "config": {...}}
  if not isinstance(data, dict):
    raise ConversionError(f"{model}: expected a JSON object of model fields")
  preset = data.get("name") if data.get("name") in PRESETS else None
  fields = {k: v for k, v in data.items() if k != "name"}
  explicit = set(fields) | (set(_PRESET_FACTS) if preset else set())
  return preset, fields, explicit


def check_model_spec(model: str, sets: Mapping[str, Any]) -> None:
  """--model and --set on their own, before the checkpoint is read: unknown fields and values of
  the wrong kind are named where they were given."""
  _, fields, _ = base_fields(model)
  for where, given in ((f"--model {model}", fields), ("--set", dict(sets))):
    try:
      check_fields(given)
    except ValueError as e:
      raise ConversionError(f"{where}: {e}") from None


def is_frozen_export(tensors: Mapping[str, Any], model: str, sets: Mapping[str, Any]) -> bool:
  """A frozen model as `export --layout mmaction2` writes it (balance -inf everywhere, which
  mmaction2's head needs), converted with a config that says frozen: its balance is dropped."""
  import torch
  balance = tensors.get("transformer.balance")
  if balance is None or not bool(torch.isneginf(balance).all()):
    return False
  _, fields, _ = base_fields(model)
  return {**fields, **dict(sets)}.get("frozen") is True


def _block_ids(tensors, prefix) -> list[int]:
  pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
  return sorted({int(m.group(1)) for k in tensors for m in [pat.match(k)] if m})


def infer_backbone(tensors: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
  """{field: (value, evidence)} from canonical backbone names (CLIP or UniFormerV2)."""
  need = ("class_embedding", "positional_embedding", "conv1.weight")
  missing = [k for k in need if k not in tensors]
  if missing:
    raise ConversionError(f"missing {missing}")
  shape = lambda k: tuple(tensors[k].shape)
  facts: dict[str, tuple[Any, str]] = {}
  width = shape("class_embedding")[0]
  facts["width"] = (width, f"class_embedding {shape('class_embedding')}")
  conv = shape("conv1.weight")
  facts["patch_size"] = (conv[-1], f"conv1.weight {conv}")
  tokens = shape("positional_embedding")[0] - 1
  grid = math.isqrt(tokens)
  if grid * grid != tokens:
    raise ConversionError(f"positional_embedding {shape('positional_embedding')} is not "
                          "1 + a square grid")
  facts["input_resolution"] = (grid * conv[-1], f"positional_embedding "
                               f"{shape('positional_embedding')} with patch {conv[-1]}")
  blocks = _block_ids(tensors, "transformer.resblocks")
  facts["layers"] = (len(blocks), f"transformer.resblocks.0..{len(blocks) - 1}")
  if len(conv) == 5:
    kt = conv[2]
    facts["temporal_downsample"] = (kt > 1, f"conv1.weight {conv}")
    if kt > 1:
      facts["kernel_size"] = (kt, f"conv1.weight {conv}")
  lm1 = "transformer.resblocks.0.lmhra1.pos_embed.1.weight"
  lm2 = "transformer.resblocks.0.lmhra2.pos_embed.1.weight"
  if len(conv) == 5:
    facts["no_lmhra"] = (lm1 not in tensors, "transformer.resblocks.*.lmhra1 "
                         + ("absent" if lm1 not in tensors else "present"))
  if lm1 in tensors:
    facts["double_lmhra"] = (lm2 in tensors, "transformer.resblocks.*.lmhra2 "
                             + ("present" if lm2 in tensors else "absent"))
    facts["lmhra_width"] = (tuple(tensors[lm1].shape)[0], f"{lm1} {tuple(tensors[lm1].shape)}")
  return facts


def infer_uniformerv2(tensors: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
  facts = infer_backbone(tensors)
  dec = _block_ids(tensors, "transformer.dec")
  facts["n_layers"] = (len(dec), f"transformer.dec.0..{len(dec) - 1}")
  if "transformer.proj.2.weight" in tensors:
    w = tuple(tensors["transformer.proj.2.weight"].shape)
    facts["num_classes"] = (w[0], f"transformer.proj.2.weight (head) {w}")
  facts["frozen"] = ("transformer.balance" not in tensors, "transformer.balance "
                     + ("absent" if "transformer.balance" not in tensors else "present"))
  fc = "transformer.dec.0.mlp.c_fc.weight"
  if fc in tensors:
    facts["mlp_hidden"] = (tuple(tensors[fc].shape)[0], f"{fc} {tuple(tensors[fc].shape)}")
  return facts


def _agrees(field, fact, cfg_fields) -> bool:
  width = cfg_fields.get("width")
  if field == "lmhra_width":
    return int(width // float(cfg_fields["dw_reduction"])) == fact
  if field == "mlp_hidden":
    return round(float(cfg_fields["mlp_factor"]) * width) == fact
  value = cfg_fields[field]
  return (bool(value) == fact) if isinstance(fact, bool) else value == fact


def _derived(field, fact, width) -> dict[str, Any]:
  if field == "lmhra_width":
    return {"dw_reduction": 1.5 if int(width // 1.5) == fact else width / fact}
  if field == "mlp_hidden":
    return {"mlp_factor": fact / width}
  return {field: fact}


_DERIVED_NAME = {"lmhra_width": "dw_reduction", "mlp_hidden": "mlp_factor"}


def resolve_config(model: str, sets: Mapping[str, Any], facts: Mapping[str, tuple[Any, str]],
                   source: str, skip: tuple[str, ...] = ()) -> ModelConfig:
  """Config from --model and --set, completed by the facts; raises on any disagreement."""
  preset, fields, explicit = base_fields(model)
  fields = {**fields, **dict(sets)}
  explicit |= set(sets)
  merged = dict(model_config(preset).to_dict() if preset else ModelConfig().to_dict())
  merged.update(fields)
  if "heads" not in explicit and preset is None and "width" in facts:
    merged["heads"] = max(1, facts["width"][0] // 64)
  conflicts = []
  for field, (fact, evidence) in facts.items():
    if field in skip:
      continue
    name = _DERIVED_NAME.get(field, field)
    if name in explicit:
      probe = dict(merged)
      if field in _DERIVED_NAME and "width" in facts:  # judged at the checkpoint's width
        probe["width"] = facts["width"][0]
      if not _agrees(field, fact, probe):
        conflicts.append(f"{name}: the checkpoint says {fact} ({evidence}), the config says "
                         f"{merged[name]}")
      continue
    merged.update(_derived(field, fact, facts["width"][0]))
  if conflicts:
    raise ConversionError(f"{source} holds weights of another model than the config "
                          f"({model}{' with --set' if sets else ''}): " + "; ".join(conflicts))
  if "n_head" not in explicit and preset is None:
    merged["n_head"] = merged["heads"]
  if "return_list" in explicit and "n_layers" not in explicit and "n_layers" not in facts:
    merged["n_layers"] = len(merged["return_list"])  # a CLIP tower: one block per listed layer
  n = merged.get("n_layers")
  if "return_list" not in explicit:
    merged["return_list"] = list(range(merged["layers"] - n, merged["layers"]))
  elif len(merged["return_list"]) != n:
    where = (f"{source} has {n} global blocks (transformer.dec.*)" if "n_layers" in facts
             else f"the config's n_layers is {n}")
    raise ConversionError(f"{where} but the config's return_list "
                          f"{list(merged['return_list'])} has {len(merged['return_list'])} entries")
  if "mlp_dropout" not in explicit:
    merged["mlp_dropout"] = [merged["mlp_dropout"][0]] * n
  try:
    return model_config(None, **merged)
  except ValueError as e:  # the config and the checkpoint's facts together
    raise ConversionError(f"{source} with --model {model}{' and --set' if sets else ''}: "
                          f"{e}") from None

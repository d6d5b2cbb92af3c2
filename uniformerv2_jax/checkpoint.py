"""The model directory: weights (Orbax), `config.json` and optional `class_names.txt`.

    DIR/
      config.json       ModelConfig.to_json() (upstream argument names)
      class_names.txt   optional, one name per line (line i is class i)
      weights/          Orbax checkpoint: flat {"backbone.blocks.0.qkv.kernel": array, ...}
                        of parameters and BatchNorm statistics, UNSCANNED layout

DIR is a local path or an object-store URL (`gs://bucket/models/k400_b16`). Locally,
`save_pretrained` writes everything into a temporary directory beside DIR and renames it
into place only when complete; on an object store (no directory rename) it writes
`config.json` last and readers require it. Either way a failed or interrupted save never
leaves something that looks like a checkpoint. `load_pretrained(DIR, mesh=...)` restores
each array straight into its NamedSharding (no full copy on one host).

The readers (`load_pretrained`, `read_config`, `read_class_names`, `stored_shapes`,
`restore_weights`, `load_weights_tree`) also take a training run: `WORKDIR` (its latest
checkpoint) or `WORKDIR/checkpoints/STEP`; they read its weights and the model config and
class names the run recorded, never its optimiser state.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uniformerv2_jax import storage
from uniformerv2_jax.config import ModelConfig
from uniformerv2_jax.damaged_reads import MetadataMissing, damaged_files_reported
from uniformerv2_jax.weights import (WEIGHTS, abstract_model, flatten, nest, unstack_layers,
                                     weight_shapes)

CONFIG_FILE = "config.json"
CLASS_NAMES_FILE = "class_names.txt"
WEIGHTS_DIR = "weights"
SEP = "."
REWRITE = ("the model directory is incomplete or damaged: write it again (python -m convert ... "
           "--overwrite, or save_pretrained) or copy it again")


class CheckpointError(ValueError):
  """A model directory that is missing, incomplete or does not fit the requested model."""


# ---------------------------------------------------------------------------------------
# Flat string keys <-> the pure-dict tree (whose list indices are ints).

def _key(path: Sequence[Any]) -> str:
  return SEP.join(str(p) for p in path)


def _path(key: str) -> tuple:
  return tuple(int(p) if p.isdigit() else p for p in key.split(SEP))


def flat_weights(tree: Mapping) -> dict[str, Any]:
  """Unscanned pure-dict tree -> {"backbone.blocks.0.qkv.kernel": leaf}."""
  return {_key(p): v for p, v in flatten(unstack_layers(tree)).items()}


def unflat_weights(flat: Mapping[str, Any]) -> dict:
  return nest({_path(k): v for k, v in flat.items()})


# ---------------------------------------------------------------------------------------
# Writing.

def _weights_tree(model_or_tree) -> dict:
  if isinstance(model_or_tree, nnx.Module):
    return nnx.to_pure_dict(nnx.state(model_or_tree, WEIGHTS))
  return dict(model_or_tree)


def _write_weights(path: str, flat: Mapping[str, Any]) -> None:
  import orbax.checkpoint as ocp
  # Synchronous, with at most ~1 GB of arrays in flight: converting L/14 then peaks near
  # one copy of the weights instead of three.
  handler = ocp.StandardCheckpointHandler(save_concurrent_gb=1)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(storage.absolute(path), args=ocp.args.StandardSave(dict(flat)))


class ClassNamesError(CheckpointError):
  """A class list that does not fit the head."""


def check_class_names(class_names, num_classes: int) -> list[str] | None:
  if class_names is None:
    return None
  names = [str(n).strip() for n in class_names]
  if len(names) != num_classes:
    raise ClassNamesError(f"{len(names)} class names for a {num_classes}-way head; give one "
                          "name per class (line i is class i)")
  if any(not n or "\n" in n for n in names):
    raise ClassNamesError("class names must be non-empty single lines")
  return names


def check_output_directory(directory: str, overwrite: bool) -> None:
  """Refuses an existing ``directory`` unless ``overwrite`` and it is a model directory (a
  folder of anything else is never deleted to make room for one)."""
  if not storage.exists(directory):
    return
  if not overwrite:
    raise CheckpointError(f"{directory} already exists; choose a new output directory, or "
                          "replace it (--overwrite; in Python, overwrite=True)")
  if not storage.exists(os.path.join(directory, CONFIG_FILE)):
    raise CheckpointError(f"{directory} exists and is not a model directory (no {CONFIG_FILE}); "
                          "--overwrite only replaces a model directory: choose another output, "
                          "or move that one away yourself")
  others = sorted(set(storage.listdir(directory)) - {CONFIG_FILE, CLASS_NAMES_FILE, WEIGHTS_DIR})
  if others:
    raise CheckpointError(f"{directory} holds more than a model ({', '.join(others[:5])}"
                          f"{', ...' if len(others) > 5 else ''}), which --overwrite would "
                          "delete with it: move those away first, or choose another output")


def save_pretrained(directory: str, model, class_names: Sequence[str] | None = None, *,
                    config: ModelConfig | None = None, overwrite: bool = False) -> str:
  """Writes a model directory atomically; returns its path.

  `model` is an `UniFormerV2` or a pure weight tree (then `config` is required).
  Weights are stored unscanned in their current dtype.
  """
  if isinstance(model, nnx.Module):
    config = model.config if config is None else config
  if config is None:
    raise ValueError("save_pretrained(tree): pass config= for a pure weight tree")
  directory = storage.absolute(directory)
  check_output_directory(directory, overwrite)
  names = check_class_names(class_names, config.num_classes)
  flat = flat_weights(_weights_tree(model))
  _check_against_config({k: np.shape(v) for k, v in flat.items()}, config, directory)
  stored = config.replace(scan_layers=False)
  if storage.is_url(directory):
    return _save_to_object_store(directory, flat, stored, names)

  parent = os.path.dirname(directory)
  no_room = storage.check_free_space(directory, sum(int(v.nbytes) for v in flat.values()))
  if no_room:
    raise CheckpointError(no_room)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
  try:
    storage.make_public(tmp, 0o777)  # mkdtemp makes it private; a model directory is not
    _write_weights(os.path.join(tmp, WEIGHTS_DIR), flat)
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      f.write(stored.to_json() + "\n")
    if names is not None:
      with open(os.path.join(tmp, CLASS_NAMES_FILE), "w") as f:
        f.write("\n".join(names) + "\n")
    if os.path.exists(directory):  # overwrite: swap, then delete the old one
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=parent)
      aside = os.path.join(old, "x")
      try:
        os.rename(directory, aside)
        os.rename(tmp, directory)
      except BaseException:
        if os.path.exists(aside) and not os.path.exists(directory):
          os.rename(aside, directory)  # interrupted between the renames: the old one goes back
        raise
      finally:
        if os.path.exists(directory):  # the new one or the old one: the other is deleted
          shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def _save_to_object_store(directory: str, flat, config: ModelConfig, names) -> str:
  """Weights, class names, then config.json: a reader requires config.json, so a model
  directory cut short is never taken for a complete one. Never replaces one in place
  (no atomic rename): an existing directory must be removed first."""
  if storage.exists(directory):
    raise CheckpointError(f"{directory} already exists; an object store cannot replace it "
                          "atomically: delete it first (gcloud storage rm -r DIR) or choose "
                          "a new output")
  _write_weights(os.path.join(directory, WEIGHTS_DIR), flat)
  if names is not None:
    storage.write_text(os.path.join(directory, CLASS_NAMES_FILE), "\n".join(names) + "\n")
  storage.write_text(os.path.join(directory, CONFIG_FILE), config.to_json() + "\n")
  return directory


# ---------------------------------------------------------------------------------------
# Reading.

def _require(directory: str) -> str:
  directory = storage.absolute(directory)
  if not storage.isdir(directory):
    if storage.exists(directory):  # e.g. an upstream .pyth / .pth given as a model
      raise CheckpointError(f"{directory} is a file, not a model directory; a PyTorch "
                            "checkpoint is converted first: python -m convert uniformerv2|clip "
                            "--input FILE --model ... --output DIR (README)")
    raise CheckpointError(f"{directory}: no such model directory")
  names = storage.listdir(directory)
  missing = [n for n in (CONFIG_FILE, WEIGHTS_DIR) if n not in names]
  if missing:
    raise CheckpointError(
        f"{directory} is not a UniFormerV2 model directory (missing {', '.join(missing)}) nor a "
        "training workdir (checkpoints/); create one with `python -m convert clip|uniformerv2 "
        "... --output DIR` or save_pretrained()")
  return directory


def _source(directory: str) -> tuple[str, str]:
  """("model", DIR) for a model directory, ("train", STEP_DIR) for a training checkpoint.

  A training checkpoint is `WORKDIR` (its latest step) or `WORKDIR/checkpoints/STEP`.
  """
  directory = storage.absolute(directory)
  if storage.exists(os.path.join(directory, CONFIG_FILE)):
    if storage.exists(os.path.join(directory, "checkpoints")):
      raise CheckpointError(f"{directory} holds both a model directory ({CONFIG_FILE}, "
                            f"{WEIGHTS_DIR}/) and a training run (checkpoints/): name one, "
                            "e.g. the run's DIR/checkpoints/STEP, or move the other out")
  else:
    from uniformerv2_jax.training.checkpointing import step_directory
    step_dir = step_directory(directory)
    if step_dir is not None:
      return "train", step_dir
  return "model", _require(directory)


def resolve(directory: str) -> str:
  """The directory a reader will read: the model directory, or the training step (latest,
  process 0's choice on every process). Readers that read several parts of a training run
  resolve it once, so that a step saved meanwhile is not mixed in."""
  return _source(directory)[1]


def _train_config(step_dir: str) -> ModelConfig:
  from uniformerv2_jax.training.checkpointing import read_meta
  meta = read_meta(step_dir)
  try:
    return ModelConfig.from_dict(meta["model_config"]).replace(scan_layers=False)
  except (KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{step_dir}: unreadable model config in the checkpoint's meta: "
                          f"{e}") from None


def read_config(directory: str) -> ModelConfig:
  """The model config of a model directory or a training checkpoint (unscanned layout)."""
  kind, directory = _source(directory)
  if kind == "train":
    return _train_config(directory)
  path = os.path.join(directory, CONFIG_FILE)
  try:
    return ModelConfig.from_dict(json.loads(storage.read_text(path)))
  except (json.JSONDecodeError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: unreadable model config: {e}") from None


def read_class_names(directory: str) -> list[str] | None:
  kind, directory = _source(directory)
  if kind == "train":
    from uniformerv2_jax.training.checkpointing import read_meta
    return read_meta(directory).get("class_names")
  path = os.path.join(directory, CLASS_NAMES_FILE)
  if not storage.exists(path):
    return None
  from uniformerv2_jax.heads import read_class_names_file
  return read_class_names_file(path)


def head_class_names(directory: str, head_map=None) -> list[str] | None:
  """Class names of the head ``load_pretrained(directory, head_map=head_map)`` returns.

  A built-in map (``k400|k600|k700``) names its rows; a custom map (a file or a list of rows)
  leaves them unknown, as the checkpoint's names belong to the head before the map; without a
  map, the checkpoint's own list (None when it has none).
  """
  if head_map is None:
    return read_class_names(directory)
  from uniformerv2_jax import heads
  name = heads.builtin_name(head_map)
  return heads.builtin_class_names(name) if name else None


def head_rows(directory: str, head_map) -> np.ndarray:
  """The rows of `directory`'s head that ``load_pretrained(head_map=head_map)`` takes: by its
  class names when it lists them (`heads.index_map_for`)."""
  from uniformerv2_jax import heads
  names = read_class_names(directory) if heads.builtin_name(head_map) else None
  try:
    return heads.index_map_for(head_map, names)
  except ValueError as e:
    if names is None:
      raise
    raise CheckpointError(f"{directory}: {e}. Evaluate it without head_map on the dataset it "
                          "was trained for, or give head_map as a JSON file listing the head "
                          "row of each target class.") from None


def stored_shapes(directory: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """{flat key: (shape, dtype name)} from the Orbax metadata (reads no array data)."""
  import orbax.checkpoint as ocp
  kind, directory = _source(directory)
  if kind == "train":  # the run's own config describes its weights (one writer, one step)
    cfg = _train_config(directory)
    return {_key(p): (tuple(s.shape), np.dtype(s.dtype).name)
            for p, s in flatten(weight_shapes(cfg)).items()}
  path = os.path.join(directory, WEIGHTS_DIR)
  with damaged_files_reported(path, REWRITE):  # Orbax raises many types for a broken directory
    with ocp.StandardCheckpointer() as ckptr:
      item = ckptr.metadata(path).item_metadata
    if item is None:
      raise MetadataMissing("no array metadata: the Orbax checkpoint is incomplete")
    tree = item.tree
  return {k: (tuple(m.shape), np.dtype(m.dtype).name) for k, m in tree.items()}


def _check_against_config(shapes: Mapping[str, tuple], cfg: ModelConfig, where: str) -> None:
  expected = {_key(p): tuple(s.shape) for p, s in flatten(weight_shapes(cfg)).items()}
  missing = sorted(set(expected) - set(shapes))
  extra = sorted(set(shapes) - set(expected))
  wrong = [f"{k}: stored {tuple(shapes[k])}, config expects {expected[k]}"
           for k in sorted(set(expected) & set(shapes)) if tuple(shapes[k]) != expected[k]]
  if missing or extra or wrong:
    parts = []
    if wrong:
      parts.append(f"{len(wrong)} mis-shaped: " + "; ".join(wrong[:10]))
    if missing:
      parts.append(f"{len(missing)} missing: " + ", ".join(missing[:10]))
    if extra:
      parts.append(f"{len(extra)} unexpected: " + ", ".join(extra[:10]))
    raise CheckpointError(f"{where}: weights do not fit the model config; " + ". ".join(parts)
                          + ". Only fields that leave the weight shapes unchanged (dtype, "
                            "t_size, dropout rates, remat, attention, scan_layers) can be "
                            "overridden when loading.")


def _abstract_target(cfg: ModelConfig, mesh, rules) -> tuple[nnx.Module, dict]:
  """(abstract model, UNSCANNED pure dict of ShapeDtypeStruct with shardings)."""
  model = abstract_model(cfg)
  state = nnx.state(model, WEIGHTS)
  if mesh is not None:
    from uniformerv2_jax import sharding as shd
    kw = {} if rules is None else {"rules": rules}
    shardings = nnx.to_pure_dict(shd.state_shardings(state, mesh, **kw))
  else:
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: dev, nnx.to_pure_dict(state))
  shapes = nnx.to_pure_dict(state)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)
  if cfg.scan_layers:  # restore each layer with the per-layer part of the stacked sharding
    def per_layer(s):
      spec = s.sharding.spec if isinstance(s.sharding, jax.sharding.NamedSharding) else None
      sh = (jax.sharding.NamedSharding(s.sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
            if spec is not None else s.sharding)
      return jax.ShapeDtypeStruct(s.shape[1:], s.dtype, sharding=sh)
    target = dict(target)
    bb = dict(target["backbone"])
    layer = jax.tree.map(per_layer, bb["blocks"])
    bb["blocks"] = {i: layer for i in range(cfg.layers)}
    target["backbone"] = bb
  return model, target


def restore_weights(directory: str, target: Mapping | None = None) -> dict:
  """The pure weight tree of a model directory or training checkpoint, UNSCANNED.

  `target`: an unscanned pure dict of `jax.ShapeDtypeStruct` (with `sharding` to restore
  sharded, with a dtype to cast); None restores numpy arrays as stored.
  """
  import orbax.checkpoint as ocp
  kind, directory = _source(directory)
  if kind == "train":
    from uniformerv2_jax.training import checkpointing
    tree = checkpointing.restore_weights(directory)
    return tree if target is None else jax.tree.map(_place, tree, target)
  path = os.path.join(directory, WEIGHTS_DIR)
  with damaged_files_reported(path, REWRITE):
    if target is None:
      stored = stored_shapes(directory)
      flat_target = {k: jax.ShapeDtypeStruct(s, np.dtype(d)) for k, (s, d) in stored.items()}
      restore_args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in stored}
      with ocp.PyTreeCheckpointer() as ckptr:
        flat = ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=flat_target, restore_args=restore_args))
    else:
      with ocp.StandardCheckpointer() as ckptr:
        flat = ckptr.restore(path, flat_weights(target))
  return unflat_weights(flat)


def _place(array: np.ndarray, target: jax.ShapeDtypeStruct) -> jax.Array:
  """A host array (the same on every process) -> a jax.Array shaped, typed and placed as target."""
  array = np.asarray(array, target.dtype)
  if target.sharding is None:
    return jnp.asarray(array)
  return jax.make_array_from_callback(array.shape, target.sharding, lambda index: array[index])


def load_pretrained(directory: str, *, mesh=None, rules=None, dtype=None, scan_layers=None,
                    head_map=None, **config_overrides):
  """A ready `UniFormerV2` from a model directory or a training checkpoint.

  directory: a model directory, a training workdir (its latest checkpoint) or one step of
  it, `WORKDIR/checkpoints/STEP` (only the weights are read, not the optimiser state).

  dtype: computation dtype (cfg.dtype); pass `param_dtype=` to change the storage dtype
  of the parameters (they are cast while restoring). scan_layers: stack the backbone
  blocks for lax.scan. mesh / rules: restore every array straight into its
  NamedSharding (from the parameters' logical axes). head_map: "k400"|"k600"|"k700"|
  path|index list, gathers the rows of a 710-way head (see `head_rows`).
  Other keyword arguments override config fields that do not change weight shapes
  (t_size, drop_path_rate, cls_dropout, remat, attention, ...).
  """
  directory = resolve(directory)  # one step throughout, even while a run saves new ones
  stored_cfg = read_config(directory)
  overrides = dict(config_overrides)
  if dtype is not None:
    try:
      overrides["dtype"] = jnp.dtype(dtype).name
    except TypeError:
      raise ValueError(f"dtype {dtype!r} is not a data type; use float32, bfloat16 or "
                       "float16") from None
  if scan_layers is not None:
    overrides["scan_layers"] = bool(scan_layers)
  index_map = None
  if head_map is not None:
    index_map = head_rows(directory, head_map)
    if len(index_map) and int(np.max(index_map)) >= stored_cfg.num_classes:
      given = head_map if isinstance(head_map, (str, os.PathLike)) else "the index map"
      raise CheckpointError(
          f"{directory}: head_map {given} picks rows up to {int(np.max(index_map))} but the "
          f"model's head has {stored_cfg.num_classes}; a head map reads a Kinetics-710 head "
          "(710 rows) as K400/K600/K700")
    if "num_classes" in overrides and overrides["num_classes"] != len(index_map):
      raise CheckpointError(f"num_classes={overrides['num_classes']} contradicts head_map "
                            f"with {len(index_map)} entries")
    overrides.pop("num_classes", None)
  try:
    cfg = stored_cfg.replace(**overrides)
  except ValueError as e:
    raise CheckpointError(f"{directory}: {e}") from None
  stored = stored_shapes(directory)
  _check_against_config({k: s for k, (s, _) in stored.items()}, cfg, directory)

  model, target = _abstract_target(cfg, mesh, rules)
  tree = restore_weights(directory, target)
  if index_map is not None:
    from uniformerv2_jax import heads
    tree = heads.remap_head(tree, index_map)
    cfg = cfg.replace(num_classes=len(index_map))
    model, new_target = _abstract_target(cfg, mesh, rules)
    # only the head changed: put its new arrays where the new config wants them
    tree["head"] = jax.tree.map(lambda a, t: jax.device_put(a, t.sharding),
                                tree["head"], new_target["head"])
  if cfg.scan_layers:
    tree = _stack_on_device(tree, model, mesh, rules)
  graphdef, weights, rest = nnx.split(model, WEIGHTS, ...)
  nnx.replace_by_pure_dict(weights, tree)
  return nnx.merge(graphdef, weights, rest)


def _stack_on_device(tree: dict, model, mesh, rules) -> dict:
  """Unscanned device arrays -> scanned layout, sharded as the scanned model wants."""
  blocks = tree["backbone"]["blocks"]
  layers = [blocks[i] for i in sorted(blocks)]
  if mesh is not None:
    from uniformerv2_jax import sharding as shd
    kw = {} if rules is None else {"rules": rules}
    out_sh = nnx.to_pure_dict(shd.state_shardings(nnx.state(model.backbone.blocks, WEIGHTS),
                                                  mesh, **kw))
    stack = jax.jit(lambda ls: jax.tree.map(lambda *a: jnp.stack(a), *ls), out_shardings=out_sh)
  else:
    stack = jax.jit(lambda ls: jax.tree.map(lambda *a: jnp.stack(a), *ls))
  tree = dict(tree)
  tree["backbone"] = dict(tree["backbone"], blocks=stack(layers))
  return tree


def load_weights_tree(directory: str) -> tuple[ModelConfig, dict, list[str] | None]:
  """(config, numpy weight tree (unscanned), class names) for converters and tools."""
  directory = resolve(directory)
  cfg = read_config(directory)
  tree = restore_weights(directory)
  _check_against_config(flat_weights_shapes(tree), cfg, directory)
  return cfg, tree, read_class_names(directory)


def flat_weights_shapes(tree: Mapping) -> dict[str, tuple]:
  return {k: np.shape(v) for k, v in flat_weights(tree).items()}


__all__ = ["save_pretrained", "load_pretrained", "read_config", "read_class_names", "resolve",
           "restore_weights", "stored_shapes", "load_weights_tree",
           "CheckpointError"]

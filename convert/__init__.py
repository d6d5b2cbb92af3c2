"""Converters: PyTorch <-> JAX model directories, and training runs -> model directories.

The functions here are the command line's bodies, usable from Python too.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from convert.io import (ConversionError, check_input_file, load_torch_file, short_message,
                        tensor_dict, torch_module)
from uniformerv2_jax import storage

Log = Callable[[str], None]


def _read_class_names(path: str | None) -> list[str] | None:
  if path is None:
    return None
  from uniformerv2_jax.heads import read_class_names_file
  try:
    return read_class_names_file(path)  # a local path, a gs:// URL or a packaged list
  except ValueError as e:
    raise ConversionError(f"--class-names: {e}") from None


def _own_leaves(tree: dict, dtype) -> dict:
  """Replaces, IN PLACE and one leaf at a time, views into torch buffers by contiguous copies.

  Each replaced view drops the last reference to its torch buffer, so memory moves
  from the torch layout to the JAX layout instead of holding both. The leaves become
  jax arrays, which Orbax writes without another host copy.
  """
  import jax
  for key, value in tree.items():
    if isinstance(value, dict):
      _own_leaves(value, dtype)
    else:
      tree[key] = jax.device_put(np.ascontiguousarray(np.asarray(value).astype(dtype, copy=False)))
  return tree


def _init_weights(cfg, seed: int, paths: tuple | None) -> dict | tuple:
  from flax import nnx

  from uniformerv2_jax.model import UniFormerV2
  from uniformerv2_jax.weights import WEIGHTS, flatten
  tree = nnx.to_pure_dict(nnx.state(UniFormerV2(cfg, rngs=nnx.Rngs(seed)), WEIGHTS))
  if paths is None:
    return tree
  flat = flatten(tree)
  return tuple(flat[p] for p in paths)


@functools.lru_cache(maxsize=None)
def _jitted_init():
  import jax
  return jax.jit(_init_weights, static_argnums=(0, 1, 2))


def fresh_weights(cfg, seed: int, only=None) -> dict:
  """Weights of `UniFormerV2(cfg, rngs=nnx.Rngs(seed))`, initialised in one compiled call.

  only: a set of weight paths; returns just those, as {path: array}. The values are the same
  (one traced initialisation), and XLA computes nothing else: converting a CLIP L/14 tower
  then never holds a second, random backbone.
  """
  import jax
  if only is None:
    return jax.tree.map(np.asarray, _jitted_init()(cfg, int(seed), None))
  paths = tuple(sorted(only, key=str))
  return {p: np.asarray(a) for p, a in zip(paths, _jitted_init()(cfg, int(seed), paths))}


def convert_clip_file(input_path: str, model: str, output: str, *, sets: Mapping[str, Any] = (),
                      seed: int = 0, class_names: Sequence[str] | None = None,
                      trust_pickle: bool = False, overwrite: bool = False,
                      log: Log = print) -> str:
  """A CLIP checkpoint -> an initial UniFormerV2 model directory (see convert/clip.py)."""
  from uniformerv2_jax.checkpoint import check_class_names, save_pretrained

  from convert import clip, infer
  check_input_file(input_path)
  infer.check_model_spec(model, sets)
  _check_output(output, overwrite, log)
  tensors = tensor_dict(load_torch_file(input_path, trust_pickle), input_path)
  tower = clip.image_tower(tensors, input_path)
  facts = infer.infer_backbone(tower)
  cfg = infer.resolve_config(model, dict(sets), facts, input_path, skip=("input_resolution",))
  cfg = cfg.replace(scan_layers=False, dtype="float32", param_dtype="float32")
  check_class_names(class_names, cfg.num_classes)  # before the work, not after it
  log(f"{input_path}: CLIP image tower, width {cfg.width}, {cfg.layers} layers, patch "
      f"{cfg.patch_size}; initialising the rest with seed {seed}")
  tree = clip.convert_clip(tower, cfg, lambda paths: fresh_weights(cfg, seed, paths),
                           input_path, log=log)
  del tensors, tower  # the torch file's (memory-mapped) tensors: not needed while writing
  out = save_pretrained(output, tree, class_names, config=cfg, overwrite=overwrite)
  log(f"wrote {out}")
  return out


def convert_uniformerv2_file(input_path: str, model: str, output: str, *,
                             sets: Mapping[str, Any] = (), head_map=None,
                             class_names: Sequence[str] | None = None,
                             new_head: bool = False, seed: int = 0,
                             trust_pickle: bool = False, overwrite: bool = False,
                             log: Log = print) -> str:
  """An upstream UniFormerV2 checkpoint (original or mmaction2 layout) -> model directory.

  new_head: a classifier initialised from `seed` (num_classes from `sets`) instead of the
  checkpoint's, which may have none (a backbone saved for fine-tuning).
  """
  from uniformerv2_jax import heads
  from uniformerv2_jax.checkpoint import check_class_names, save_pretrained
  from uniformerv2_jax.torch_layout import canonical_state_dict
  from uniformerv2_jax.weights import torch_tensors_to_tree

  from convert import infer
  check_input_file(input_path)
  infer.check_model_spec(model, sets)
  _check_output(output, overwrite, log)
  # Not memory-mapped: every tensor has its own buffer, freed as soon as its JAX-layout
  # copy exists (see _own_leaves), so the peak stays near one copy of the weights.
  tensors = tensor_dict(load_torch_file(input_path, trust_pickle, mmap=False), input_path)
  first_keys = list(tensors)[:8]
  canonical, layout = canonical_state_dict(tensors)
  tensors.clear()
  if not any(k.startswith("transformer.dec.") for k in canonical):
    if "conv1.weight" in canonical or any(k.startswith("visual.") for k in canonical):
      raise ConversionError(f"{input_path} holds no global blocks (transformer.dec.*): it "
                            "looks like a CLIP image tower; use `python -m convert clip`")
    raise ConversionError(f"{input_path}: unknown layout, not a UniFormerV2 checkpoint (no "
                          "backbone.transformer.dec.* / transformer.dec.*); first keys: "
                          f"{first_keys}")
  _check_head(canonical, input_path, new_head, head_map)
  if infer.is_frozen_export(canonical, model, sets):
    del canonical["transformer.balance"]
    log("note: transformer.balance is -inf everywhere (a frozen model in mmaction2's layout); "
        "converted as the frozen model the config names, without it")
  try:
    facts = infer.infer_uniformerv2(canonical)
  except ConversionError as e:
    raise ConversionError(f"{input_path}: unknown layout ({e}); first keys: "
                          f"{first_keys}") from None
  sets = dict(sets)
  index_map = None
  if head_map is not None:
    index_map = heads.load_index_map(head_map)
    target = sets.pop("num_classes", None)
    if target is not None and int(target) != len(index_map):
      raise ConversionError(f"--set num_classes={target} contradicts --head-map {head_map} "
                            f"({len(index_map)} classes)")
  cfg = infer.resolve_config(model, sets, facts, input_path)
  cfg = cfg.replace(scan_layers=False, dtype="float32", param_dtype="float32")
  check_class_names(class_names, cfg.num_classes if index_map is None else len(index_map))
  log(f"{input_path}: {layout} layout; width {cfg.width}, {cfg.layers} layers, "
      f"{cfg.n_layers} global blocks on {list(cfg.return_list)}, "
      f"{'no' if cfg.no_lmhra else ('double' if cfg.double_lmhra else 'single')} Local MHRA, "
      f"temporal_downsample={cfg.temporal_downsample}, {cfg.num_classes} classes"
      + (f" (a new head, seed {seed})" if new_head else ""))
  if new_head:
    canonical.update(_fresh_head(cfg, seed))
  tree = torch_tensors_to_tree(canonical, cfg, source=input_path)
  canonical.clear()
  tree = _own_leaves(tree, np.float32)
  if index_map is not None:
    try:
      tree = heads.remap_head(tree, index_map)
    except ValueError as e:
      raise ConversionError(f"--head-map {head_map}: {e}") from None
    cfg = cfg.replace(num_classes=len(index_map))
    if class_names is None and heads.builtin_name(head_map):
      class_names = heads.builtin_class_names(heads.builtin_name(head_map))
    log(f"head remapped to {len(index_map)} classes with {head_map}")
  elif class_names is None and new_head:
    log(f"note: no class names written for the new {cfg.num_classes}-way head: pass "
        "--class-names FILE to name its classes (training's dataset gives them otherwise)")
  elif class_names is None:
    class_names = _default_class_names(layout, cfg.num_classes, log)
  out = save_pretrained(output, tree, class_names, config=cfg, overwrite=overwrite)
  log(f"wrote {out}")
  return out


HEAD_FC = "transformer.proj.2."  # the classifier, canonical names (mmaction2: cls_head.fc_cls.)


def _check_head(canonical: dict, input_path: str, new_head: bool, head_map) -> None:
  """Drops the classifier a new head replaces; names a missing one (a backbone checkpoint)."""
  head = [k for k in canonical if k.startswith(HEAD_FC)]
  if new_head:
    if head_map is not None:
      raise ConversionError(f"--new-head and --head-map {head_map} contradict: --head-map "
                            "keeps rows of the checkpoint's head, --new-head replaces it")
    for k in head:
      del canonical[k]
  elif not head:
    raise ConversionError(
        f"{input_path} holds no classifier ({HEAD_FC}weight/bias, mmaction2's cls_head.fc_cls.*): "
        "a backbone without its head. Add --new-head --set num_classes=N to initialise an N-way "
        "head (--seed), and fine-tune the model directory with config.init_from")


def _fresh_head(cfg, seed: int) -> dict:
  """The classifier of `UniFormerV2(cfg, rngs=nnx.Rngs(seed))`, as canonical torch tensors."""
  from uniformerv2_jax.torch_layout import model_rules
  rules = [r for r in model_rules(cfg) if r.torch.startswith(HEAD_FC)]
  fresh = fresh_weights(cfg, seed, only={r.path for r in rules})
  return {r.torch: r.to_torch(fresh[r.path]) for r in rules}


def checkpoint_to_model_dir(input_dir: str, output: str, *, overwrite: bool = False,
                            log: Log = print) -> str:
  """A training checkpoint (WORKDIR or WORKDIR/checkpoints/STEP) -> a model directory."""
  from uniformerv2_jax.checkpoint import load_weights_tree, resolve, save_pretrained
  resolve(input_dir)  # a missing input is named before an existing output
  _check_output(output, overwrite, log)
  cfg, tree, names = load_weights_tree(input_dir)
  out = save_pretrained(output, tree, names, config=cfg, overwrite=overwrite)
  log(f"wrote {out} ({cfg.layers}-layer width {cfg.width}, {cfg.num_classes} classes"
      f"{', with class names' if names else ''})")
  return out


KINETICS_HEADS = {400: "k400", 600: "k600", 700: "k700", 710: "k710"}


def _default_class_names(layout: str, num_classes: int, log: Log) -> list[str] | None:
  """Class names of a Kinetics-sized head when its layout tells its class order; else None,
  and a note saying how to give them."""
  from uniformerv2_jax import heads
  name = KINETICS_HEADS.get(num_classes)
  if name is None:
    log(f"note: no class names written ({num_classes}-way head): pass --class-names FILE (one "
        "name a line, in the head's order). Without them eval.py refuses the model (it cannot "
        "match the head's classes to the dataset's; --config.eval.match_class_names=False "
        "trusts the order) and predictions give class numbers")
    return None
  if layout == "mmaction2":  # mmaction2 re-ordered its ported heads to its label maps
    log(f"class names: mmaction2's label_map_{name}.txt, the order of its {num_classes}-way "
        "heads (--class-names FILE to override)")
    return heads.builtin_class_names(name)
  log(f"note: no class names written. The original repository's {num_classes}-way heads list "
      f"their classes in that repository's order, not mmaction2's label_map_{name}.txt (the "
      "order of the built-in Kinetics datasets); pass --class-names with the list this head "
      "was trained with, and eval.py will match its classes to the dataset's by name. Where "
      "mmaction2 ported the model, its .pth holds the same head in label_map order and "
      "converts with those names.")
  return None


def _to_torch(array):
  """numpy -> torch, bfloat16 included (torch.from_numpy has no bfloat16; float32 holds it
  exactly)."""
  import torch
  array = np.asarray(array)
  if array.dtype.name == "bfloat16":
    return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
  return torch.from_numpy(np.ascontiguousarray(array)) if array.ndim else torch.tensor(array)


def export_file(input_dir: str, layout: str, output: str, *, overwrite: bool = False,
                flat: bool = False, log: Log = print) -> str:
  """A model directory or training checkpoint -> a PyTorch state dict the upstream code loads.

  ``flat``: the bare state dict, without the ``model_state`` / ``state_dict`` wrapper (the
  original repository's ``UNIFORMERV2.PRETRAIN`` reads flat files; its
  ``TEST.CHECKPOINT_FILE_PATH`` and mmaction2 read the wrapped ones).
  """
  torch = torch_module()

  from uniformerv2_jax.checkpoint import load_weights_tree
  from uniformerv2_jax.torch_layout import export_tensors, to_layout
  if layout not in ("original", "mmaction2"):
    raise ConversionError(f"--layout {layout!r}: use 'original' or 'mmaction2'")
  if storage.is_url(output):
    raise ConversionError(f"--output {output}: PyTorch files are written to a local disk; "
                          "write it there, then copy it (gcloud storage cp FILE URL)")
  _check_output_file(output, overwrite, log)
  cfg, tree, _ = load_weights_tree(input_dir)
  tensors = export_tensors(tree, cfg)
  if not cfg.no_lmhra:  # BatchNorm3d's counter, so that strict loading finds every key
    for i in range(cfg.layers):
      for m in ("lmhra1", "lmhra2") if cfg.double_lmhra else ("lmhra1",):
        tensors[f"transformer.resblocks.{i}.{m}.pos_embed.0.num_batches_tracked"] = np.array(
            0, np.int64)  # BatchNorm's buffer: int64, shape ()
  if cfg.frozen and layout == "mmaction2":
    # mmaction2's UniFormerV2 has no frozen option: its head always mixes
    # (1 - sigmoid(balance)) * cls + sigmoid(balance) * residual. balance = -inf makes that
    # exactly the frozen model's output (sigmoid(-inf) = 0), and keeps it there when trained.
    width = tensors["transformer.proj.0.weight"].shape[0]
    tensors["transformer.balance"] = np.full((width,), -np.inf,
                                             tensors["transformer.proj.0.weight"].dtype)
    log("note: mmaction2's UniFormerV2 has no frozen option; transformer.balance is written as "
        "-inf so that its output is exactly this frozen model's")
  state = to_layout({k: _to_torch(v) for k, v in tensors.items()}, layout)
  if flat:
    state = state["model_state" if layout == "original" else "state_dict"]
  output = os.path.abspath(output)
  no_room = storage.check_free_space(output, sum(int(v.nbytes) for v in tensors.values()))
  if no_room:
    raise ConversionError(no_room)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.tmp-",
                             dir=os.path.dirname(output))
  os.close(fd)
  try:
    torch.save(state, tmp)
    storage.make_public(tmp, 0o666)
    os.replace(tmp, output)
  except (RuntimeError, OSError) as e:  # torch's zip writer raises RuntimeError
    full = (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            or any(s in str(e) for s in ("unexpected pos", "file write failed")))
    raise ConversionError(f"writing {output} failed, nothing was written "
                          f"({short_message(e)}){'; is the disk full?' if full else ''}") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  log(f"wrote {output} ({layout} layout, {len(tensors)} tensors)")
  return output


def _check_output(output: str, overwrite: bool, log: Log) -> None:
  """A model directory to write: before any work, the checks save_pretrained makes, and that
  its parent folder can be written."""
  from uniformerv2_jax.checkpoint import CheckpointError, check_output_directory
  output = storage.absolute(output)
  try:
    check_output_directory(output, overwrite)
  except CheckpointError as e:
    raise ConversionError(str(e)) from None
  _check_writable(output)
  _note_leftovers(output, log)


def _check_output_file(output: str, overwrite: bool, log: Log) -> None:
  """A PyTorch file to write: never a folder; an existing file only with --overwrite."""
  if os.path.isdir(output) or output.endswith(("/", os.sep)):
    raise ConversionError(f"--output {output} is a folder; give the path of the .pyth/.pth "
                          "file to write")
  if os.path.exists(output) and not overwrite:
    raise ConversionError(f"{output} already exists; choose another --output or pass --overwrite")
  _check_writable(os.path.abspath(output))
  _note_leftovers(os.path.abspath(output), log)


def _note_leftovers(output: str, log: Log) -> None:
  """Names what a killed conversion to the same output left beside it (an interrupted one
  removes its own): temporary copies, which may be large, and a replaced model moved aside."""
  from uniformerv2_jax.checkpoint import CONFIG_FILE
  if storage.is_url(output):
    return
  folder, name = os.path.split(output)
  if not os.path.isdir(folder):
    return
  stale = []
  for entry in sorted(os.listdir(folder)):
    path = os.path.join(folder, entry)
    aside = os.path.join(path, "x")
    if entry.startswith(f".{name}.old-") and os.path.isfile(os.path.join(aside, CONFIG_FILE)):
      log(f"note: {aside} is the model that was at {output} when a conversion replacing it "
          "was killed; it stays there until you move or delete it")
    elif entry.startswith((f".{name}.tmp-", f".{name}.old-")):
      stale.append(path)
  if stale:
    log(f"note: {', '.join(stale)}: left by a conversion to {output} that was killed; delete "
        "them unless one is running now")


def _check_writable(output: str) -> None:
  """Before any work: a probe file in --output's nearest existing folder (none is created
  here); in a bucket, storage.ensure_writable of its folder."""
  if storage.is_url(output):
    if output.rstrip("/").count("/") > 2:  # below the bucket
      try:
        storage.ensure_writable(output.rstrip("/").rsplit("/", 1)[0])
      except PermissionError as e:
        raise ConversionError(f"--output {output}: its folder {e}") from None
    return
  existing = storage.nearest_existing_folder(output)
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise ConversionError(f"--output {output}: cannot write in {existing} "
                          f"({e.strerror or e})") from None


__all__ = ["ConversionError", "checkpoint_to_model_dir", "convert_clip_file",
           "convert_uniformerv2_file", "export_file", "load_torch_file"]

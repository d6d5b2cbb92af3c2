"""Fail fast: every problem of a training config in one message, before anything compiles."""

from __future__ import annotations

import math

import jax

from uniformerv2_jax import storage
from uniformerv2_jax.config import FIELDS
from uniformerv2_jax.sharding import MESH_AXES


class ConfigError(ValueError):
  pass


def _unknown(config, base, prefix="") -> list[str]:
  out = []
  for key in config.keys():
    name = f"{prefix}{key}"
    if prefix == "" and key == "model":
      bad = sorted(set(config.model.keys()) - set(FIELDS) - {"name"})
      out += [f"config.model.{k} is not a model field (valid: name, {', '.join(FIELDS)})"
              for k in bad]
    elif key not in base:
      out.append(f"config.{name} is not a known field (valid: {', '.join(sorted(base.keys()))})")
    elif hasattr(config[key], "keys") and hasattr(base[key], "keys"):
      out += _unknown(config[key], base[key], name + ".")
  return out


def _mesh_size(config, n_devices) -> tuple[int, list[str]]:
  sizes = {a: int(config.mesh.get(a, 1)) for a in MESH_AXES}
  known = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    if n_devices % known:
      return 0, [f"config.mesh {sizes} does not divide {n_devices} devices"]
    sizes[[a for a in MESH_AXES if sizes[a] == -1][0]] = n_devices // known
  if math.prod(sizes.values()) != n_devices:
    return 0, [f"config.mesh {sizes} needs {math.prod(sizes.values())} devices, "
               f"this run has {n_devices}"]
  return sizes["data"] * sizes["fsdp"], []


def _init_problems(config, cfg) -> list[str]:
  if not config.init_from:
    return []
  from uniformerv2_jax import checkpoint
  from uniformerv2_jax.checkpoint import CheckpointError
  from uniformerv2_jax.weights import flatten, weight_shapes
  if not storage.exists(config.init_from):
    return [f"config.init_from: {storage.absolute(config.init_from)}: no such model directory. "
            "Convert the checkpoint the recipe starts from into it (python -m convert clip|"
            "uniformerv2 --input FILE --model ... --output DIR; README, Training), or point "
            "--config.init_from at a model directory or a training run"]
  try:
    stored = {k: tuple(s) for k, (s, _) in checkpoint.stored_shapes(config.init_from).items()}
  except CheckpointError as e:
    return [f"config.init_from: {e}"]
  expected = {".".join(map(str, p)): tuple(s.shape) for p, s in flatten(weight_shapes(cfg)).items()}
  if config.head_map and config.init_new_head:
    return [f"config.head_map={config.head_map!r} and config.init_new_head=True: the head is "
            "either remapped from init_from's or new; set one of them"]
  if config.head_map:
    from uniformerv2_jax import heads
    try:
      rows = len(heads.load_index_map(config.head_map))
    except (ValueError, OSError) as e:
      return [f"config.head_map={config.head_map!r}: {e}"]
    if rows != cfg.num_classes:
      return [f"config.head_map={config.head_map!r} has {rows} classes but config.model."
              f"num_classes={cfg.num_classes}"]
  if cfg.frozen:  # a frozen model has no balance; the frozen-from-CLIP recipes start from the
    stored.pop("temporal.balance", None)  # (unfrozen) CLIP conversion, whose one it drops
  if config.head_map or config.init_new_head:  # head.fc: remapped, or from the seed
    expected = {k: v for k, v in expected.items() if not k.startswith("head.fc")}
    stored = {k: v for k, v in stored.items() if not k.startswith("head.fc")}
  wrong = sorted(k for k in expected if stored.get(k) != expected[k])
  extra = sorted(set(stored) - set(expected))
  if wrong or extra:
    detail = "; ".join(f"{k}: checkpoint {stored.get(k, 'missing')}, config {expected[k]}"
                       for k in wrong[:4])
    if extra:
      detail += f"; unexpected {extra[:4]}"
    return [f"config.init_from={config.init_from} holds another model than config.model "
            f"({len(wrong)} mismatched, {len(extra)} unexpected weights: {detail}). Point "
            "init_from at a checkpoint of this architecture or change config.model"
            + (" (or set config.init_new_head=True to start a new classifier)"
               if wrong and all(k.startswith("head.fc") for k in wrong) and not extra else "")]
  return []


def build_model_config(config):
  """The ModelConfig of a training config; its unset (None) model fields keep the preset's
  (name=None: no preset, the dataclass defaults)."""
  from uniformerv2_jax.config import model_config
  return model_config(**{k: v for k, v in config.model.to_dict().items()
                         if v is not None or k == "name"})


def check(config, n_devices: int | None = None, n_processes: int | None = None):
  """Raises ConfigError listing every problem; returns the ModelConfig when all is well."""
  from configs.common import get_base_config
  from uniformerv2_jax.training import data_io
  n_devices = jax.device_count() if n_devices is None else n_devices
  n_processes = jax.process_count() if n_processes is None else n_processes
  problems = _unknown(config, get_base_config())
  if problems:
    raise ConfigError("Bad config: " + "\n  ".join(problems))
  try:
    cfg = build_model_config(config)
  except ValueError as e:
    raise ConfigError(f"Bad config.model: {e}") from None
  tc, inp = config.train, config.input
  if inp.crop_size != cfg.input_resolution:
    problems.append(f"config.input.crop_size={inp.crop_size} but the model's input_resolution "
                    f"is {cfg.input_resolution}")
  if inp.randaugment_on not in ("frames", "crops"):
    problems.append(f"config.input.randaugment_on={inp.randaugment_on!r}: use 'frames' (host, "
                    "before the crop, as the upstream) or 'crops' (accelerator, after it)")
  if inp.clip_len != cfg.t_size:
    problems.append(f"config.input.clip_len={inp.clip_len} but config.model.t_size={cfg.t_size}")
  if config.dataset.num_classes != cfg.num_classes:
    problems.append(f"config.dataset.num_classes={config.dataset.num_classes} but "
                    f"config.model.num_classes={cfg.num_classes}")
  batch_devices, mesh_problems = _mesh_size(config, n_devices)
  problems += mesh_problems
  model_axis, per_host = int(config.mesh.get("model", 1)), n_devices // max(n_processes, 1)
  if n_processes > 1 and model_axis > 1 and per_host % model_axis:
    problems.append(f"config.mesh.model={model_axis}: the model axis must lie within one host "
                    f"(a batch shard is fed by one host); use a divisor of its {per_host} devices")
  accum = int(tc.grad_accum_steps)
  if cfg.replica_batch and accum >= 1 and (tc.global_batch_size // accum) % cfg.replica_batch:
    problems.append(f"config.model.replica_batch={cfg.replica_batch} does not divide the "
                    f"{tc.global_batch_size // accum} clips of a step (global_batch_size / "
                    "grad_accum_steps); use a divisor, or 0 for one group")
  if accum < 1:
    problems.append(f"config.train.grad_accum_steps={accum} must be >= 1")
  elif batch_devices:
    for key, b in (("global_batch_size", tc.global_batch_size),
                   ("eval_batch_size", tc.eval_batch_size or tc.global_batch_size)):
      need = batch_devices * (accum if key == "global_batch_size" else 1)
      if b % need or b % n_processes:
        problems.append(
            f"config.train.{key}={b} is not divisible by {need} (= {batch_devices} batch "
            f"devices (mesh data x fsdp)" + (f" x {accum} grad_accum_steps" if need != batch_devices
                                             else "") + f") and {n_processes} process(es)")
  for key in ("epochs", "log_every_steps", "checkpoint_every_steps", "eval_every_epochs"):
    if not tc[key] or tc[key] <= 0:
      problems.append(f"config.train.{key}={tc[key]} must be positive")
  if not 0 <= int(tc.seed) < 2**31:  # seeds numpy, TensorFlow and JAX draws alike
    problems.append(f"config.train.seed={tc.seed} must lie in [0, 2**31)")
  name = config.dataset.name
  if name not in (data_io.FAKE, "synthetic"):
    where = data_io.dataset_dir(config)
    if not config.dataset.data_dir or not storage.isdir(where):
      problems.append(
          f"config.dataset: no built dataset {name!r} at {where}. Build it first: `python -m "
          f"uniformerv2_jax.data.build --config {name} --manual_dir RAW --data_dir DIR`, then "
          "pass --config.dataset.data_dir=DIR")
  elif name == "synthetic" and not config.dataset.data_dir:
    problems.append("config.dataset.data_dir must name a folder for the synthetic dataset")
  elif name == "synthetic" and storage.is_url(config.dataset.data_dir):
    problems.append(f"config.dataset.data_dir={config.dataset.data_dir}: the synthetic dataset "
                    "is rendered and built on a local disk; give a local folder")
  if not problems:
    problems += _init_problems(config, cfg)
  if problems:
    raise ConfigError("Bad config: " + "\n  ".join(problems))
  return cfg


def parse_flags(argv):
  """absl's flag parsing for train.py / eval.py, with ml_collections' failures to load the
  --config file or to apply a --config.* override as one line instead of a traceback."""
  import sys

  from absl import app, flags
  try:
    rest = app.parse_flags_with_usage(argv)
    flags.FLAGS["config"].value.keys()  # a file that failed to load raises on first use
    return rest
  except (AttributeError, KeyError) as e:
    sys.exit(f"error: {_override_problem(e, argv)}")
  except (OSError, TypeError, ValueError) as e:
    reason = [line.strip() for line in str(_deepest(e)).splitlines() if line.strip()]
    sys.exit(f"error: --config: cannot load the config file: {reason[-1] if reason else e}")


def _deepest(e: BaseException) -> BaseException:
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  return e


def _override_problem(e: BaseException, argv) -> str:
  """ml_collections raises a bare AttributeError("'foo'") for an override naming no field;
  its 'Did you mean' KeyError is in the chain."""
  hint, err = "", e
  while err is not None:
    text = str(err.args[0]) if err.args else ""
    if "Did you mean" in text:
      hint = " " + " ".join(text.splitlines()[1:]).strip()
    err = err.__cause__ or err.__context__
  key = str(_deepest(e).args[0] if _deepest(e).args else e).strip("\"' ")
  files = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if "module 'config_config' has no attribute 'get_config" in key:  # the --config file itself
    return (f"--config={files[0] if files else '?'}: the file defines no get_config(), so it is "
            "no recipe; give one, e.g. configs/k400_b16.py or configs/demo.py")
  named = [a.split("=")[0] for a in argv
           if a.startswith("--config.") and key in a.split("=")[0].split(".")]
  from configs.common import get_base_config
  fields = _leaf_paths(get_base_config())
  named = [o for o in named if o.removeprefix("--config.") not in fields] or named  # the bad ones
  where = " or ".join(named) if named else f"--config={files[0] if files else '?'} (the file)"
  for override in named if not hint else ():
    hint = hint or _field_hint(override.removeprefix("--config."), key, argv, fields)
  return f"{where}: the config has no field {key!r}.{hint}".rstrip()


def _leaf_paths(config, prefix="") -> list[str]:
  out = []
  for key in config.keys():
    value = config[key]
    out += (_leaf_paths(value, f"{prefix}{key}.") if hasattr(value, "keys")
            else [f"{prefix}{key}"])
  return out


def _field_hint(path: str, key: str, argv, fields: list[str]) -> str:
  """' Did you mean --config.train.seed?' for --config.seed: the schema's `fields` that end
  with the override's path from its unknown part on (ml_collections only suggests names
  spelled alike at the same level), but for those the command line already sets."""
  parts, given = path.split("."), {a.split("=")[0] for a in argv}
  rests = {".".join(parts[i:]) for i, p in enumerate(parts) if p == key}
  found = [p for p in fields if f"--config.{p}" not in given and any(
      p == rest or p.endswith("." + rest) for rest in rests)]
  return f" Did you mean {' or '.join('--config.' + p for p in found)}?" if found else ""

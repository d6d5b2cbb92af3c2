"""The training loop behind train.py: resume, train, log, evaluate, checkpoint, summarise."""

from __future__ import annotations

import json
import math
import os
import shlex
import time

import jax
from flax import nnx

from uniformerv2_jax import sharding as shd
from uniformerv2_jax import storage
from uniformerv2_jax.distributed import process_0_floats
from uniformerv2_jax.flops import device_peak_flops, train_flops_per_clip
from uniformerv2_jax.training import config_check, data_io, events, optim
from uniformerv2_jax.training.config_check import build_model_config
from uniformerv2_jax.training.checkpointing import Checkpointer, PreemptionWatcher, read_meta
from uniformerv2_jax.training.state import create_train_state, state_shapes
from uniformerv2_jax.training.step import jit_eval_step, make_eval_step, setup_training


class TrainingDiverged(FloatingPointError):
  pass


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def make_mesh(config, devices=None):
  return shd.make_mesh({a: config.mesh[a] for a in shd.MESH_AXES}, devices)


def init_weights(config, cfg, mesh):
  """Params + batch stats (one pure dict, already sharded) from config.init_from, or None."""
  if not config.init_from:
    return None
  from uniformerv2_jax import checkpoint
  keep = ("dtype", "param_dtype", "scan_layers", "remat", "remat_blocks", "attention",
          "t_size", "backbone_drop_path_rate", "drop_path_rate", "mlp_dropout", "cls_dropout")
  overrides = {k: getattr(cfg, k) for k in keep}
  model = checkpoint.load_pretrained(config.init_from, mesh=mesh, head_map=config.head_map,
                                     **overrides)
  return nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))


class Writer:
  """TensorBoard scalars from process 0 only: a local folder through `events.EventFile`
  (no TensorFlow), a bucket (gs://) through tf.summary and TensorFlow's own client."""

  def __init__(self, logdir: str):
    self.tb = self.file = None
    if jax.process_index() != 0:
      return
    if not storage.is_url(logdir):
      self.file = events.EventFile(logdir)
      return
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    from uniformerv2_jax.data import tf_ops
    tf_ops.keep_tensorflow_off_gpus()
    self.tf = tf
    self.metadata = summary_pb2.SummaryMetadata(data_class=summary_pb2.DATA_CLASS_SCALAR)
    self.metadata.plugin_data.plugin_name = "scalars"
    self.tb = tf.summary.create_file_writer(logdir)

  def scalars(self, step: int, values: dict) -> None:
    if self.file is not None:
      self.file.scalars(step, values)
    if self.tb is not None:
      tf = self.tf
      with self.tb.as_default():
        for k, v in values.items():  # tf.summary.scalar without the tensorboard package
          tf.summary.write(k, tf.constant(float(v), tf.float32), step=step,
                           metadata=self.metadata)
      self.tb.flush()

  def close(self):
    for w in (self.file, self.tb):
      if w is not None:
        w.close()


def evaluate(p_eval, state, config, builder, per_host, mesh) -> dict:
  totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  for batch in data_io.eval_batches(config, builder, per_host):
    out = jax.device_get(p_eval(state["params"], state["batch_stats"],
                                data_io.to_global(batch, mesh)))
    for k in totals:
      totals[k] += float(out[k])
  n = max(totals["count"], 1.0)
  return {"top1": totals["correct"] / n, "loss": totals["loss"] / n, "count": totals["count"]}


class _Pace:
  """Step time, clips/s, MFU, input-wait share and ETA between two progress lines; the step
  that compiled and the pauses (evaluation, saving) are left out. `flops`: one step's; `peak`:
  all devices' FLOP/s (None: no MFU)."""

  def __init__(self, step: int, clips: int, flops: float, peak: float | None):
    self.clips, self.flops, self.peak = clips, flops, peak
    self.waited = 0.0  # seconds blocked on the input pipeline, in all
    self.restart(step)

  def restart(self, step: int) -> None:
    self.tick, self.tick_step, self.waited_at_tick = time.time(), step, self.waited

  def skip(self, seconds: float) -> None:
    self.tick += seconds

  def report(self, step: int, total_steps: int) -> tuple[str, dict, float] | None:
    """(progress-line suffix, perf/* scalars, input-wait share) since the last report."""
    if step <= self.tick_step:  # no time yet for the step that compiled
      return None
    now = time.time()
    dt = (now - self.tick) / (step - self.tick_step)
    share = (self.waited - self.waited_at_tick) / max(now - self.tick, 1e-9)
    self.restart(step)
    line = f" | {self.clips / dt:.1f} clips/s {dt * 1e3:.0f} ms/step"
    scalars = {}
    if self.peak:
      scalars["perf/mfu"] = self.flops / dt / self.peak
      line += f" MFU {scalars['perf/mfu']:.1%}"
    line += f" input wait {share:.0%} ETA {_fmt(dt * (total_steps - step))}"
    scalars.update({"perf/clips_per_s": self.clips / dt, "perf/input_wait_fraction": share})
    return line, scalars, share


def _input_hint(config, share: float) -> str:
  hint = (f"note: the loop spent {share:.0%} of the time waiting for input batches: the host's "
          "input pipeline limits this run (give it more CPU cores")
  if config.input.randaugment and not data_io.randaugment_on_device(config):
    hint += ", or move RandAugment to the accelerator with --config.input.randaugment_on=crops"
  return hint + "; benchmarks/input_pipeline.py --data_dir measures it)"


# Model config fields a resumed run may change: they leave the saved arrays' shapes alone.
RESUMABLE_CHANGES = ("dtype", "remat", "remat_blocks", "attention", "backbone_drop_path_rate",
                     "replica_batch", "drop_path_rate", "mlp_dropout", "cls_dropout")


def _input_stream(config, steps_per_epoch: int) -> dict:
  """What a run's data position and learning-rate schedule are counted in (a step is
  global_batch_size / num_samples videos of the seed's order): a resumed run keeps them."""
  return {"dataset": config.dataset.name, "train_split": config.dataset.train_split,
          "global_batch_size": int(config.train.global_batch_size),
          "num_samples": int(config.input.num_samples), "seed": int(config.train.seed),
          "steps_per_epoch": int(steps_per_epoch)}


def _check_resumable(directory: str, step: int, cfg, stream: dict, class_names) -> None:
  """The run saved at `step` was started with this model, this input stream and, where both
  name them, these classes in this order."""
  from uniformerv2_jax.config import FIELDS, ModelConfig
  meta = read_meta(os.path.join(directory, str(step)))
  saved = ModelConfig.from_dict(meta["model_config"])
  model = [f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in FIELDS
           if k not in RESUMABLE_CHANGES and getattr(saved, k) != getattr(cfg, k)]
  saved_stream = meta.get("input_stream")
  if saved_stream is None:  # saved before the stream was recorded: only steps_per_epoch
    saved_stream = {k: v for k, v in meta.items() if k == "steps_per_epoch"}
  inputs = [f"{k}: {v!r} -> {stream[k]!r}" for k, v in saved_stream.items()
            if k in stream and v != stream[k]]
  parts = ([f"model config ({'; '.join(model)})"] if model else []) + (
      [f"input stream ({'; '.join(inputs)}; the data position and the schedule are counted in "
       "its steps)"] if inputs else []) + _class_change(meta.get("class_names"), class_names)
  if parts:
    raise config_check.ConfigError(
        f"{directory}/{step} was trained with another {' and another '.join(parts)}. Resume it "
        "with the config it was started with, or start a new --workdir (with config.init_from "
        "pointing at this run to start from its weights)")


def _class_change(saved: list | None, now: list | None) -> list[str]:
  """[] if the dataset's classes are those the run was trained on (or either is unknown), else
  one phrase saying how they differ: the head's rows would change meaning."""
  if not saved or not now or saved == now:
    return []
  if len(saved) != len(now):
    return [f"class list ({len(saved)} classes, {len(now)} now)"]
  moved = [i for i, (a, b) in enumerate(zip(saved, now)) if a != b]
  return [f"class list (class {moved[0]} was {saved[moved[0]]!r}, now {now[moved[0]]!r}; "
          f"{len(moved)} of {len(now)} differ)"]


def _optimizer_note(saved: dict | None, train_cfg, step: int, steps_per_epoch: int):
  """A note when a resumed run's optimiser settings differ from the checkpoint's (a checkpoint
  from before they were saved gets none). The update after `step` is the first to use them."""
  now = optim.settings(train_cfg)
  saved = {k: v for k, v in (saved or {}).items() if k in now}

  def shown(k):
    a, b = f"{saved[k]:g}", f"{now[k]:g}"
    return f"{k} {a} -> {b}" if a != b else f"{k} {saved[k]!r} -> {now[k]!r}"
  changed = [shown(k) for k in now if k in saved and saved[k] != now[k]]
  if not changed:
    return None

  def lr(s):
    return float(optim.schedule_for(s, optim.total_steps(s, steps_per_epoch),
                                    steps_per_epoch)(step))
  return (f"note: the checkpoint was trained with other config.train settings "
          f"({'; '.join(changed)}); the new ones apply from step {step + 1} on (its learning "
          f"rate {lr(dict(now, **saved)):.3g} -> {lr(now):.3g})")


def _diverged(m, step: int, vouched, ckpt, workdir: str) -> "TrainingDiverged":
  """The error for a non-finite loss at `step`. The loss of step s comes from the weights
  before its update (those saved at s - 1): a finite one vouches for the checkpoints saved
  before s, and the ones saved since the last finite loss are set aside."""
  on_disk = ckpt.manager.all_steps()
  good = max((c for c in on_disk if vouched is not None and c <= vouched), default=None)
  later = [c for c in on_disk if good is None or c > good]
  moved, aside = ckpt.set_aside(later, os.path.join(workdir, "diverged"))
  resumes = ("a rerun resumes from it" if moved or not later
             else "a rerun resumes from it once the later steps are moved")
  where = (f"The last good checkpoint is step {good} in {ckpt.directory}; {resumes}."
           if good is not None else "No checkpoint is known good; a rerun starts afresh.")
  return TrainingDiverged(
      f"Loss became {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {step}; "
      f"stopped. {where}{aside} Lower train.base_lr or check the data, then rerun.")


def train_and_evaluate(config, workdir: str,
                       eval_command: str = "python eval.py --config=CONFIG") -> dict:
  """Runs (or resumes) the recipe in `config`; returns the summary process 0 writes to
  summary.json (the other processes: their own time and last loss, not the file's).
  `eval_command`: how the closing hint spells eval.py's command for this run. SIGTERM (and
  a first Ctrl-C) from the start on, restore and compilation included, saves after the next
  step and stops."""
  with PreemptionWatcher() as preempt:
    return _train_and_evaluate(config, workdir, eval_command, preempt)


def _train_and_evaluate(config, workdir: str, eval_command: str, preempt) -> dict:
  t0 = time.time()
  workdir = storage.absolute(workdir)
  config_check.check(config)  # before anything is compiled
  from uniformerv2_jax.checkpoint import CONFIG_FILE
  if storage.exists(os.path.join(workdir, CONFIG_FILE)):
    raise config_check.ConfigError(
        f"--workdir {workdir} is a model directory ({CONFIG_FILE}): its checkpoints would sit "
        "beside that model, which readers of the folder take. Train in another folder; to start "
        f"from these weights, pass --config.init_from={workdir}")
  for flag, folder in (("--workdir", workdir),
                       ("config.train.tensorboard_dir", config.train.tensorboard_dir)):
    try:
      if folder:
        storage.ensure_writable_by_process_0(storage.absolute(folder))
    except PermissionError as e:
      raise config_check.ConfigError(f"{flag} {e}") from None
  cfg = build_model_config(config)
  tc = config.train
  mesh = make_mesh(config)
  pc = jax.process_count()
  try:
    builder = None if config.dataset.name == data_io.FAKE else data_io.source(config)
    data_io.check_readable(builder, config.dataset.train_split, config.dataset.eval_split)
  except ValueError as e:  # no built dataset in the folder, several, or files missing
    raise config_check.ConfigError(f"config.dataset: {e}") from None
  data_io.check_classes(config, builder)
  for note in data_io.frame_notes(config, builder, "train"):
    log(note)
  per_host = tc.global_batch_size // pc
  steps_per_epoch = tc.steps_per_epoch or data_io.steps_per_epoch(config, builder, per_host)
  total_steps = optim.total_steps(tc, steps_per_epoch)
  eval_per_host = (tc.eval_batch_size or tc.global_batch_size) // pc
  eval_every = max(int(round(tc.eval_every_epochs * steps_per_epoch)), 1)

  setup = setup_training(config, cfg, mesh, total_steps, steps_per_epoch)
  mdef, tx, shardings, p_train = setup.mdef, setup.tx, setup.shardings, setup.train_step
  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints)
  stream = _input_stream(config, steps_per_epoch)
  meta_base = {"model_config": cfg.to_dict(), "steps_per_epoch": steps_per_epoch,
               "input_stream": stream, "class_names": data_io.class_names(builder),
               "optimizer": optim.settings(tc)}
  history, best, best_step = [], 0.0, None
  latest = ckpt.latest_step()
  if latest is not None:
    _check_resumable(ckpt.directory, latest, cfg, stream, meta_base["class_names"])
    state, meta = ckpt.restore(state_shapes(mdef, tx, cfg.frozen), shardings, latest)
    history, best = meta.get("history", []), meta.get("best_top1", 0.0)
    best_step = meta.get("best_step")
    log(f"Resumed from {ckpt.directory} step {latest}")
    note = _optimizer_note(meta.get("optimizer"), tc, latest, steps_per_epoch)
    if note and latest < total_steps:  # else nothing trains, and the run says so below
      log(note)
  else:
    state, _ = create_train_state(mdef, tx, mesh, seed=tc.seed, frozen=cfg.frozen,
                                  init_weights=init_weights(config, cfg, mesh),
                                  new_head=config.init_new_head)
  start = int(jax.device_get(state["step"]))

  p_eval = jit_eval_step(make_eval_step(mdef), shardings["params"], shardings["batch_stats"],
                         dict(setup.batch_shardings, mask=shd.batch_sharding(mesh, 1)), mesh)
  writer = Writer(storage.absolute(tc.tensorboard_dir or os.path.join(workdir, "tensorboard")))
  log(f"{cfg.layers}-layer UniFormerV2 width {cfg.width}, {total_steps} steps "
      f"({steps_per_epoch}/epoch), global batch {tc.global_batch_size}, mesh "
      f"{dict(mesh.shape)}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
      f"{pc} process(es)")

  if latest is not None and _eval_due(start, eval_every, total_steps) and \
      not any(h["step"] == start for h in history):  # preempted before its evaluation
    # a finished run keeps the one it made up in summary.json (no later save holds it)
    ev = _summary_eval(workdir, start) if start >= total_steps else None
    ev = ev or evaluate(p_eval, state, config, builder, eval_per_host, mesh)
    best, best_step = _record_eval(ev, start, history, best, best_step, writer)

  if latest is not None and start == total_steps:
    log(f"The run in {workdir} is complete (step {start} of {total_steps}): nothing to train. "
        "To train it longer, raise --config.train.epochs (the learning-rate schedule is then "
        "stretched over the new length, so the rate goes back up).")
  elif latest is not None and start > total_steps:
    log(f"The checkpoint in {workdir} (step {start}) is past this config's {total_steps} "
        "steps: nothing to train.")
  train_iter = data_io.train_batches(config, builder, per_host, start)
  # MFU: analytic FLOPs (as the benchmark; XLA's cost analysis is unavailable on GPU and TPU
  # backends, and counts a scanned block once) over the device's peak
  peak = device_peak_flops(jax.devices()[0])
  pace = _Pace(start, tc.global_batch_size, train_flops_per_clip(cfg) * tc.global_batch_size,
               peak and peak * jax.device_count())
  # vouched: the latest checkpoint whose weights (or later ones) gave a finite loss. A finite
  # loss at a check vouches for every step saved before it (saves follow the check); the one
  # resumed from gave none yet (its run may have stopped right after saving it).
  vouched = max((c for c in ckpt.manager.all_steps() if latest is not None and c < latest),
                default=None)
  metrics, preempted, hinted = None, False, False
  step = start

  def meta_now():  # the checkpoint's meta item, as the run stands
    return dict(meta_base, step=step, data_step=step, history=history, best_top1=best,
                best_step=best_step)
  while step < total_steps:
    t_in = time.time()
    host_batch = next(train_iter)
    pace.waited += time.time() - t_in
    batch = data_io.to_global(host_batch, mesh)
    state, metrics = p_train(state, batch)
    step += 1
    if step == start + 1:  # compilation is not a step time
      jax.block_until_ready(metrics)
      log(f"compiled and ran step {step} in {time.time() - pace.tick:.1f}s")
      pace.restart(step)
    is_eval = _eval_due(step, eval_every, total_steps)
    is_ckpt = step % tc.checkpoint_every_steps == 0 or step == total_steps or is_eval
    preempted = preempt.reached(step)
    if step % tc.log_every_steps == 0 or is_ckpt or preempted:
      m = jax.device_get(metrics)
      if not all(math.isfinite(float(m[k])) for k in ("loss", "grad_norm")):
        ckpt.wait()
        raise _diverged(m, step, vouched, ckpt, workdir)
      vouched = ckpt.latest_step()
      line = (f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} "
              f"loss {float(m['loss']):.4f} top1 {float(m['top1']):.3f} lr {float(m['lr']):.3g}")
      scalars = {"train/" + k: v for k, v in m.items()}
      suffix, perf, share = pace.report(step, total_steps) or ("", {}, 0.0)
      log(line + suffix)
      # dispatch is asynchronous: waits for input overlap device work until the input
      # takes about as long as the step
      if share > 0.9 and not hinted:
        hinted = True
        log(_input_hint(config, share))
      writer.scalars(step, {**scalars, **perf})
    ev, paused = None, time.time()  # evaluation and saving do not count as step time
    if is_eval and preempted:  # save within the grace period; the resumed run evaluates
      log(f"Preemption signal: saving step {step} first; its evaluation runs on resume")
    elif is_eval:
      try:
        ev = evaluate(p_eval, state, config, builder, eval_per_host, mesh)
      except Exception:  # keep the steps trained: a rerun resumes here and evaluates first
        log(f"The evaluation at step {step} failed: saving step {step} first")
        ckpt.save(step, state, meta_now())
        ckpt.wait()
        raise
      best, best_step = _record_eval(ev, step, history, best, best_step, writer)
    if is_ckpt or preempted:
      ckpt.keep_best(best_step)
      ckpt.save(step, state, meta_now(), metrics={"top1": ev["top1"]} if ev else None)
    pace.skip(time.time() - paused)
    if preempted:
      log(f"Preemption signal: saved step {step} to {ckpt.directory}; exiting.")
      break
  ckpt.close()
  writer.close()
  summary = {"final_top1": history[-1]["top1"] if history else None, "best_top1": best,
             "best_step": best_step, "checkpoints": ckpt.directory,
             "steps": step, "total_steps": total_steps, "wall_seconds": time.time() - t0,
             "preempted": preempted, "history": history,
             "final_train_loss": float(jax.device_get(metrics["loss"])) if metrics else None}
  if jax.process_index() == 0:
    if metrics is None:  # no step ran (a rerun): the run that trained keeps its time and loss
      previous = _read_summary(workdir) or {}
      if previous.get("steps") == step:
        summary.update({k: previous[k] for k in ("wall_seconds", "final_train_loss")
                        if k in previous})
    storage.write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=1))
    if best_step is not None and storage.isdir(os.path.join(ckpt.directory, str(best_step))):
      best_dir = os.path.join(ckpt.directory, str(best_step))
      log(f"Evaluate or convert the weights: {eval_command} "
          f"{shlex.quote(f'--checkpoint={workdir}')} (latest step) or "
          f"{shlex.quote(f'--checkpoint={best_dir}')} (best)")
  return summary


def _eval_due(step: int, eval_every: int, total_steps: int) -> bool:
  return step > 0 and (step % eval_every == 0 or step == total_steps)


_EVAL_KEYS = ("top1", "loss", "count")


def _read_summary(workdir: str) -> dict | None:
  """summary.json of the run in `workdir`, or None (missing, cut short, not JSON)."""
  try:
    summary = json.loads(storage.read_text(os.path.join(workdir, "summary.json")))
  except Exception:  # noqa: BLE001
    return None
  return summary if isinstance(summary, dict) else None


def _summary_eval(workdir: str, step: int) -> dict | None:
  """The evaluation of `step` that summary.json records (or None), as process 0 reads it: every
  host takes the same branch (a host that evaluated alone would wait at a collective forever)."""
  found = None
  if jax.process_index() == 0:
    try:
      h = next(h for h in _read_summary(workdir)["history"] if h["step"] == step)
      found = [float(h[k]) for k in _EVAL_KEYS]
    except Exception:  # noqa: BLE001  (missing, another run's, cut short: evaluate instead)
      pass
  flag, *values = process_0_floats([found is not None, *(found or [0.0] * len(_EVAL_KEYS))])
  return dict(zip(_EVAL_KEYS, values)) if flag else None


def _record_eval(ev, step, history, best, best_step, writer):
  """Logs and records one evaluation; returns the new (best top-1, best step)."""
  if best_step is None or ev["top1"] >= best:  # a tie goes to the later step
    best, best_step = ev["top1"], step
  history.append({"step": step, "top1": ev["top1"], "loss": ev["loss"], "count": ev["count"]})
  log(f"eval step {step}: top1 {ev['top1']:.4f} loss {ev['loss']:.4f} "
      f"({int(ev['count'])} clips, 1 view) best {best:.4f}")
  writer.scalars(step, {"eval/top1": ev["top1"], "eval/loss": ev["loss"]})
  return best, best_step


def _fmt(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

"""Train UniFormerV2: `python train.py --config=configs/k710_b16.py --workdir=DIR`.

The same command runs on one CPU, eight GPUs or a Cloud TPU pod. Multi-host: on Cloud TPU
and in an srun step `jax.distributed.initialize()` finds its peers; elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`. A workdir that holds
checkpoints resumes. `--aot_topology=v5p:4x4x4` compiles the train step for a TPU slice
on this machine and prints its memory and estimated step time instead of training.
"""

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from uniformerv2_jax import distributed  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and summary.json.")
flags.DEFINE_string("aot_topology", None, "e.g. v5p:4x4x4 or v4:4x4x4: compile only, for sizing.")
distributed.define_flags()
FLAGS = flags.FLAGS


def _eval_command() -> str:
  """eval.py's command for this run: its config file and the overrides eval.py reads (the
  model comes from the checkpoint, but for its speed fields, dtype among them)."""
  from uniformerv2_jax.evaluation.driver import reads_override
  args = [f"--config={config_flags.get_config_filename(FLAGS['config'])}"]
  for key, value in sorted(config_flags.get_override_values(FLAGS["config"]).items()):
    if reads_override(key):
      args.append(f"--config.{key}={value}")
  script = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval.py"))
  return " ".join(["python", *map(shlex.quote, [script, *args])])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep Orbax's INFO lines off the console
  from uniformerv2_jax.training.config_check import ConfigError
  config = FLAGS.config
  if FLAGS.aot_topology:
    # compile-only: keep the default backend on CPU (jax is imported by now: its config, not
    # JAX_PLATFORMS, decides) and skip libtpu's single-user lockfile
    import jax
    if not os.environ.get("JAX_PLATFORMS"):
      jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from uniformerv2_jax.training import aot
    try:
      aot.compile_for_topology(config, FLAGS.aot_topology)
    except ConfigError as e:
      sys.exit(f"error: {e}")
    return
  if not FLAGS.workdir:
    sys.exit("error: --workdir is required")
  try:
    distributed.maybe_initialize()
  except distributed.DistributedError as e:
    sys.exit(f"error: {e}")
  from uniformerv2_jax.checkpoint import CheckpointError
  from uniformerv2_jax.training.loop import TrainingDiverged, train_and_evaluate
  try:
    train_and_evaluate(config, FLAGS.workdir, eval_command=_eval_command())
  except (ConfigError, CheckpointError, TrainingDiverged) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  from uniformerv2_jax.training.config_check import parse_flags
  app.run(main, flags_parser=parse_flags)

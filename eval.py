r"""Multi-view evaluation of a model directory or a training run (docs/recipes.md, test views).

    python eval.py --config=configs/k400_b16.py --checkpoint=DIR \
        [--config.eval.num_clips=4 --config.eval.num_crops=3] [--workdir=OUT]

Writes OUT/results.jsonl (one line per video) and OUT/summary.json (top1, top5,
mean_class_accuracy, ...); OUT defaults to eval/<DIR name>-<dataset>-<split>. DIR may be a
training workdir (its latest checkpoint) or WORKDIR/checkpoints/STEP. A Kinetics-710
model is evaluated on K400/K600/K700 with --config.eval.head_map=k400|k600|k700. Multi-host as
train.py: auto-detected on Cloud TPU and SLURM, else --coordinator_address/--num_processes/
--process_id.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from uniformerv2_jax import distributed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "recipe file (configs/*.py)",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "model directory or training run (WORKDIR, "
                                  "WORKDIR/checkpoints/STEP) to evaluate")
_WORKDIR = flags.DEFINE_string("workdir", None, "where results.jsonl and summary.json go")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", None, "stop after N batches per host (a smoke "
                                    "run: scores the videos whose views all arrived)",
                                    lower_bound=1)
distributed.define_flags()
flags.mark_flags_as_required(["config", "checkpoint"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep Orbax's INFO lines off the console
  try:
    distributed.maybe_initialize()
  except distributed.DistributedError as e:
    sys.exit(f"error: {e}")
  from uniformerv2_jax.checkpoint import CheckpointError
  from uniformerv2_jax.evaluation.driver import EvalConfigError, evaluate_checkpoint
  config = _CONFIG.value
  from uniformerv2_jax.evaluation.driver import SPEED_FIELDS, reads_override
  ignored = [f"--config.{k}" for k in config_flags.get_override_values(FLAGS["config"])
             if not reads_override(k)]
  import jax
  if ignored and jax.process_index() == 0:
    print(f"eval: note: {', '.join(ignored)} ignored: evaluation reads config.dataset, input, "
          f"eval and mesh; the model comes from the checkpoint (config.model may set "
          f"{', '.join(SPEED_FIELDS)})", file=sys.stderr)
  from uniformerv2_jax import storage
  path = storage.absolute(_CHECKPOINT.value)  # normalised: no trailing slash, no ".."
  name = os.path.basename(path)
  if name.isdigit():  # WORKDIR/checkpoints/STEP
    name = f"{os.path.basename(os.path.dirname(os.path.dirname(path)))}-step{name}"
  workdir = _WORKDIR.value or os.path.join(
      "eval", f"{name}-{config.dataset.name}-{config.dataset.eval_split}")
  try:
    evaluate_checkpoint(config, _CHECKPOINT.value, workdir, max_batches=_MAX_BATCHES.value)
  except (CheckpointError, EvalConfigError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  from uniformerv2_jax.training.config_check import parse_flags
  app.run(main, flags_parser=parse_flags)

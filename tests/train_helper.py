"""Subprocess entry for the training tests (device count is fixed per process by XLA_FLAGS).

  python tests/train_helper.py train   WORKDIR '{"train.epochs": 2, ...}'
  python tests/train_helper.py restore WORKDIR '{"mesh.data": 4, ...}'

`train` runs train.py's loop on a tiny model with fake data and writes WORKDIR/params.npz
(final parameters). `restore` loads the latest checkpoint of WORKDIR onto this process's
devices and writes WORKDIR/restored_<n>.npz. `load` reads the run as a model
(`load_pretrained(WORKDIR, mesh=...)`, what eval.py and init_from do) and writes
WORKDIR/loaded_<processes>.npz ("phantom_step_on_process": I makes process I list a step
999 that the others do not see). An "out_dir" override puts the .npz files there instead
(a local folder, when WORKDIR is a gs:// URL).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def tiny_config(overrides):
  from configs.demo import get_config
  c = get_config()
  c.model.update(input_resolution=16, width=32, layers=2, heads=2, return_list=(0, 1), n_head=2,
                 t_size=4, num_classes=5)
  c.dataset.update(name="fake", num_classes=5, num_val=16)
  c.input.update(clip_len=4, crop_size=16)
  c.train.update(global_batch_size=16, epochs=1, steps_per_epoch=4, log_every_steps=1,
                 checkpoint_every_steps=2, eval_every_epochs=1, warmup_epochs=0.5)
  c.mesh.min_fsdp_size = 1  # shard even tiny tensors over fsdp
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def flat_params(state):
  from uniformerv2_jax.training.state import unscanned_weights
  return flat_weights(unscanned_weights(state))


def flat_weights(tree):
  """{keystr path: numpy array} of a weight tree (gathered from every process)."""
  from jax.experimental import multihost_utils
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for path, leaf in flat:
    if jax.process_count() > 1:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    out[jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


def restore(config, workdir):
  from uniformerv2_jax.training.checkpointing import Checkpointer
  from uniformerv2_jax.training.loop import build_model_config, make_mesh
  from uniformerv2_jax.training.optim import make_optimizer
  from uniformerv2_jax.training.state import model_def, state_shapes, state_shardings
  cfg = build_model_config(config)
  mesh = make_mesh(config)
  tx, _ = make_optimizer(config.train, 4, 4)
  mdef = model_def(cfg, mesh, min_fsdp_size=config.mesh.min_fsdp_size)
  ckpt = Checkpointer(workdir, keep=10)
  state, meta = ckpt.restore(state_shapes(mdef, tx, cfg.frozen),
                             state_shardings(mdef, tx, mesh, cfg.frozen))
  ckpt.close()
  return state, meta


def _list_a_phantom_step():
  """This process lists a newer step than the others, as when a save lands between the hosts'
  listings; the step choice must still be process 0's."""
  import orbax.checkpoint as ocp
  from etils import epath
  listed = ocp.utils.checkpoint_steps_paths

  def with_phantom(root, *args, **kwargs):
    return list(listed(root, *args, **kwargs)) + [epath.Path(root) / "999"]
  ocp.utils.checkpoint_steps_paths = with_phantom


def main():
  mode, workdir, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  out_dir = overrides.pop("out_dir", workdir)
  if "coordinator" in overrides:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(overrides.pop("coordinator"), overrides.pop("num_processes"),
                               overrides.pop("process_id"))
  phantom = overrides.pop("phantom_step_on_process", None)
  config = tiny_config(overrides)
  if phantom is not None and jax.process_index() == phantom:
    _list_a_phantom_step()
  if mode == "load":
    from flax import nnx

    from uniformerv2_jax.checkpoint import WEIGHTS, load_pretrained
    from uniformerv2_jax.training.loop import make_mesh
    model = load_pretrained(workdir, mesh=make_mesh(config))
    loaded = flat_weights(nnx.to_pure_dict(nnx.state(model, WEIGHTS)))
    if jax.process_index() == 0:
      np.savez(os.path.join(out_dir, f"loaded_{jax.process_count()}.npz"), **loaded)
    return
  if mode == "train":
    from uniformerv2_jax.training.loop import train_and_evaluate
    train_and_evaluate(config, workdir)
  state, meta = restore(config, workdir)
  params = flat_params(state)
  if jax.process_index() == 0:
    name = "params.npz" if mode == "train" else f"restored_{jax.device_count()}.npz"
    np.savez(os.path.join(out_dir, name), step=meta["step"], **params)
    # sharding of one large matrix, for the test to see that fsdp really split it
    leaf = state["params"]["head"]["fc"]["kernel"]
    print("SHARDING", leaf.sharding.spec, flush=True)


if __name__ == "__main__":
  main()

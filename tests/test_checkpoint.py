"""The Orbax model directory: round trip, sharded restore, scan layout, bad directories."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from uniformerv2_jax import checkpoint, model_config
from uniformerv2_jax.checkpoint import (CheckpointError, load_pretrained, read_class_names,
                                        read_config, save_pretrained)
from uniformerv2_jax.weights import WEIGHTS, flatten, model_from_tree, weight_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(input_resolution=32, patch_size=8, width=48, layers=4, heads=4, return_list=(2, 3),
            n_head=4, num_classes=5, t_size=4, no_lmhra=False, temporal_downsample=True)


@functools.lru_cache(maxsize=None)
def tiny_model(**changes):
  """A model with random weights (no init compile: random numpy through model_from_tree)."""
  cfg = model_config(None, **{**TINY, **changes})
  rng = np.random.default_rng(1)
  tree = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), weight_shapes(cfg))
  return model_from_tree(cfg, tree)


def weights(model):
  return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model, WEIGHTS))).items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "model"
  save_pretrained(path, tiny_model(), class_names=[f"c{i}" for i in range(5)])
  return path


def test_round_trip(saved):
  model = tiny_model()
  assert sorted(os.listdir(saved)) == ["class_names.txt", "config.json", "weights"]
  assert read_config(saved) == model.config
  assert read_class_names(saved) == ["c0", "c1", "c2", "c3", "c4"]
  loaded = load_pretrained(saved)
  want, got = weights(model), weights(loaded)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
  x = np.random.default_rng(0).normal(size=(2, 4, 32, 32, 3)).astype(np.float32)
  fwd = nnx.jit(lambda m, x: m(x))
  np.testing.assert_array_equal(fwd(loaded, x), fwd(model, x))
  scanned = load_pretrained(saved, scan_layers=True, param_dtype="bfloat16")
  assert scanned.backbone.blocks.qkv.kernel[...].shape[0] == 4
  assert scanned.backbone.blocks.qkv.kernel[...].dtype == jax.numpy.bfloat16
  np.testing.assert_array_equal(
      np.asarray(scanned.backbone.blocks.ln_1.scale[...][2], np.float32),
      np.asarray(model.backbone.blocks[2].ln_1.scale[...]).astype(jax.numpy.bfloat16)
      .astype(np.float32))


def test_sharded_restore_matches(saved, tmp_path):
  """On 8 simulated devices every array arrives with the sharding the rules give it."""
  script = textwrap.dedent(f"""
      import numpy as np, jax
      from flax import nnx
      from uniformerv2_jax.checkpoint import load_pretrained, restore_weights
      from uniformerv2_jax.sharding import make_mesh, state_shardings
      from uniformerv2_jax.weights import WEIGHTS, flatten, model_from_tree, weight_shapes, stack_layers
      mesh = make_mesh({{"data": 2, "fsdp": 1, "model": 4}})
      ref = restore_weights({str(saved)!r})
      for scan in (False, True):
        model = load_pretrained({str(saved)!r}, mesh=mesh, scan_layers=scan)
        state = nnx.state(model, WEIGHTS)
        want = flatten(nnx.to_pure_dict(state_shardings(state, mesh)))
        got = flatten(nnx.to_pure_dict(state))
        vals = flatten(stack_layers(ref) if scan else ref)
        sharded = 0
        for k, v in got.items():
          assert v.sharding.is_equivalent_to(want[k], v.ndim), (k, v.sharding, want[k])
          np.testing.assert_array_equal(np.asarray(v), vals[k])
          sharded += any(a is not None for a in want[k].spec)
        assert sharded >= 10, sharded
      out = nnx.jit(lambda m, x: m(x))(model, np.zeros((2, 4, 32, 32, 3), np.float32))
      assert out.shape == (2, 5)
      print("OK")
  """)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  p = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr


def test_head_map_when_loading(tmp_path):
  model = tiny_model(num_classes=710)
  save_pretrained(tmp_path / "k710", model)
  loaded = load_pretrained(tmp_path / "k710", head_map="k700")
  assert loaded.config.num_classes == 700
  import json
  with open(os.path.join(ROOT, "uniformerv2_jax", "label_maps", "map_k700.json")) as f:
    index = json.load(f)
  np.testing.assert_array_equal(np.asarray(loaded.head.fc.kernel[...]),
                                np.asarray(model.head.fc.kernel[...])[:, index])
  np.testing.assert_array_equal(np.asarray(loaded.head.fc.bias[...]),
                                np.asarray(model.head.fc.bias[...])[index])


def test_head_map_reads_a_named_head_by_name(tmp_path):
  """A built-in map lists rows of the Kinetics-710 order; a 710-way head that names its
  classes in another order is read by name (the same rows as the map for the K710 order),
  and one whose names lack the target's classes is refused."""
  from uniformerv2_jax import heads
  k710 = heads.builtin_class_names("k710")
  order = np.random.default_rng(0).permutation(710)
  model = tiny_model(num_classes=710)
  save_pretrained(tmp_path / "shuffled", model, class_names=[k710[i] for i in order])
  loaded = load_pretrained(tmp_path / "shuffled", head_map="k400")
  position = np.argsort(order)  # shuffled row of each K710 class
  rows = position[heads.load_index_map("k400")]
  np.testing.assert_array_equal(np.asarray(loaded.head.fc.kernel[...]),
                                np.asarray(model.head.fc.kernel[...])[:, rows])
  assert checkpoint.head_rows(tmp_path / "shuffled", "k400").tolist() == rows.tolist()
  save_pretrained(tmp_path / "k710", model, class_names=k710)
  np.testing.assert_array_equal(checkpoint.head_rows(tmp_path / "k710", "k400"),
                                heads.load_index_map("k400"))
  save_pretrained(tmp_path / "other", model, class_names=[f"c{i}" for i in range(710)])
  with pytest.raises(CheckpointError, match=r"other: head_map 'k400' takes K400's classes by "
                     r"name, but the 710 classes .* do not include them all \(400 target class"):
    load_pretrained(tmp_path / "other", head_map="k400")
  # a map file is a built-in one only when it is the packaged file; a missing one is an error
  packaged = os.path.join(ROOT, "uniformerv2_jax", "label_maps", "map_k400.json")
  assert checkpoint.head_rows(tmp_path / "shuffled", packaged).tolist() == rows.tolist()
  with pytest.raises(ValueError, match="no such file"):
    checkpoint.head_rows(tmp_path / "shuffled", str(tmp_path / "typo" / "map_k400.json"))
  assert [heads.builtin_name(x) for x in ("k400", "map_k600.json", packaged, [1, 2])] == [
      "k400", "k600", "k400", None]


def test_a_folder_named_like_a_builtin_map_does_not_hide_it(tmp_path, monkeypatch):
  """`convert --output k400` leaves a folder k400 where the next command runs."""
  from uniformerv2_jax import heads
  monkeypatch.chdir(tmp_path)
  (tmp_path / "k400").mkdir()
  assert heads.builtin_name("k400") == "k400"
  assert len(heads.load_index_map("k400")) == 400
  (tmp_path / "rows").mkdir()
  with pytest.raises(ValueError, match="head map 'rows': no such file"):
    heads.load_index_map("rows")


def test_head_class_names(saved, tmp_path):
  """The names that go with the head load_pretrained returns, with and without a head map."""
  from uniformerv2_jax import heads
  assert checkpoint.head_class_names(saved) == [f"c{i}" for i in range(5)]
  save_pretrained(tmp_path / "k710", tiny_model(num_classes=710),
                  class_names=heads.builtin_class_names("k710"))
  k600 = heads.builtin_class_names("k600")
  assert len(k600) == 600
  assert checkpoint.head_class_names(tmp_path / "k710", "k600") == k600
  assert checkpoint.head_class_names(tmp_path / "k710", list(range(5))) is None  # custom map
  save_pretrained(tmp_path / "unnamed", tiny_model())
  assert checkpoint.head_class_names(tmp_path / "unnamed") is None


def test_bad_directories(saved, tmp_path):
  with pytest.raises(CheckpointError, match="no such model directory"):
    load_pretrained(tmp_path / "nothing")
  (tmp_path / "half").mkdir()
  (tmp_path / "half" / "config.json").write_text(read_config(saved).to_json())
  with pytest.raises(CheckpointError, match=r"half is not a UniFormerV2 model directory \(missing weights\)"):
    load_pretrained(tmp_path / "half")
  with pytest.raises(CheckpointError, match=r"mis-shaped: backbone\.blocks\.0\.lmhra1\.bn\.bias: "
                                           r"stored \(48,\), config expects \(64,\)"):
    load_pretrained(saved, width=64, heads=4, n_head=4)
  with pytest.raises(CheckpointError, match="already exists"):
    save_pretrained(saved, tiny_model())
  with pytest.raises(CheckpointError, match="3 class names for a 5-way head"):
    save_pretrained(tmp_path / "n", tiny_model(), class_names=["a", "b", "c"])
  assert not (tmp_path / "n").exists()


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
  real = checkpoint._write_weights

  def write_then_fail(path, flat):
    real(path, flat)
    raise KeyboardInterrupt("interrupted")

  monkeypatch.setattr(checkpoint, "_write_weights", write_then_fail)
  with pytest.raises(KeyboardInterrupt):
    save_pretrained(tmp_path / "model", tiny_model())
  assert os.listdir(tmp_path) == []


def test_overwrite_interrupted_between_the_renames_keeps_the_old_one(tmp_path, monkeypatch):
  old = save_pretrained(tmp_path / "model", tiny_model())
  before = weights(load_pretrained(old))
  real = os.rename

  def rename(src, dst):  # the old directory has moved aside; Ctrl-C before the new one moves in
    if os.path.basename(src).startswith(".model.tmp-"):
      raise KeyboardInterrupt
    real(src, dst)
  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(KeyboardInterrupt):
    save_pretrained(old, tiny_model(width=64, heads=4, n_head=4), overwrite=True)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["model"]  # the old one back, no temporary folders
  after = weights(load_pretrained(old))
  assert after.keys() == before.keys()
  for k in before:
    np.testing.assert_array_equal(after[k], before[k])


def test_a_disk_without_room_is_refused_before_writing(tmp_path, monkeypatch):
  import shutil
  needed = sum(v.nbytes for v in weights(tiny_model()).values())
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=needed - 1))
  with pytest.raises(CheckpointError, match=rf"{tmp_path}/new/model needs about {needed:,} bytes "
                     rf"and the disk of {tmp_path} has {needed - 1:,} bytes free; free some"):
    save_pretrained(tmp_path / "new" / "model", tiny_model())
  assert os.listdir(tmp_path) == []
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=needed))
  save_pretrained(tmp_path / "new" / "model", tiny_model())  # just fits


def test_a_model_directory_copied_in_part_says_what_to_do(saved, tmp_path):
  import shutil
  shutil.copytree(saved, tmp_path / "m")
  shutil.rmtree(tmp_path / "m" / "weights" / "d")  # the array data and its manifest: a copy
  os.remove(tmp_path / "m" / "weights" / "manifest.ocdbt")  # cut short
  with pytest.raises(CheckpointError, match=r"/m/weights: unreadable or incomplete weights "
                     r"\(MetadataMissing: no array metadata.*\); the model directory is "
                     r"incomplete or damaged: write it again"):
    checkpoint.stored_shapes(tmp_path / "m")
  # From the command line: that one error, no tracebacks of the reads Orbax abandoned, and
  # none of its warnings
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "convert", "export", "--input", str(tmp_path / "m"),
                      "--layout", "original", "--output", str(tmp_path / "m.pyth")],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert [line for line in p.stderr.splitlines() if line.strip()] == [
      f"error: {tmp_path}/m/weights: unreadable or incomplete weights (MetadataMissing: no "
      f"array metadata: the Orbax checkpoint is incomplete); {checkpoint.REWRITE}"], p.stderr


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_damaged_weights_are_one_message(tmp_path):
  """A model directory with a truncated array file: CheckpointError naming it, both reads.
  Orbax abandons the other arrays' reads; they settle before the error is raised, and
  nothing of them is printed or left installed afterwards."""
  import asyncio
  import gc
  import logging
  path = save_pretrained(tmp_path / "m", tiny_model())
  files = [p for p in (tmp_path / "m" / "weights").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
  def abandoned():  # unfinished futures of closed event loops (other tests' count too)
    gc.collect()
    return sum(issubclass(type(o), asyncio.Future) and o.get_loop().is_closed() and not o.done()
               for o in gc.get_objects())
  hook, log_filters, before = (sys.unraisablehook, list(logging.getLogger("asyncio").filters),
                               abandoned())
  for read in (lambda: checkpoint.restore_weights(path), lambda: load_pretrained(path)):
    with pytest.raises(CheckpointError, match=r"/m/weights: unreadable or incomplete weights "
                       r"\(.*\); the model directory is incomplete or damaged: write it again"):
      read()
  assert sys.unraisablehook is hook and logging.getLogger("asyncio").filters == log_filters
  assert abandoned() <= before
  # From the command line: that one message, no tracebacks from the abandoned reads at exit
  script = ("import sys\nfrom uniformerv2_jax.checkpoint import CheckpointError, load_pretrained\n"
            f"try:\n  load_pretrained({str(path)!r})\nexcept CheckpointError as e:\n"
            "  print('error:', e, file=sys.stderr)\n")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                     timeout=300)
  lines = [line for line in p.stderr.splitlines() if line.strip()]
  assert p.returncode == 0 and len(lines) == 1, p.stderr
  assert lines[0].startswith("error: ") and "TensorStore details" not in lines[0], lines[0]

"""Recipe configs against docs/recipes.md, and bad configs failing before compilation."""

import glob
import os
import re
import subprocess
import sys

import pytest
from ml_collections import config_flags  # config files import as under train.py; flags below

from uniformerv2_jax.config import model_config
from uniformerv2_jax.training.config_check import ConfigError, build_model_config, check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "common.py", "kinetics_l14.py",
                                                "ssv2.py", "frozen_kinetics.py"))


def load(name):
  import importlib
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_builds_a_model_config(name):
  c = load(name)
  cfg = build_model_config(c)
  assert cfg.input_resolution == c.input.crop_size and cfg.t_size == c.input.clip_len
  assert cfg.num_classes == c.dataset.num_classes
  if c.init_from:  # the head is remapped from init_from's (K710 -> K400) or starts new
    assert bool(c.head_map) != bool(c.init_new_head), (c.head_map, c.init_new_head)


# (batch, base lr, warm-up, epochs, views) from the recipes table of docs/recipes.md
TABLE = {
    "k710_b16": (256, 1e-5, 5, 55, (4, 3)), "k710_l14": (512, 1e-5, 5, 40, (4, 3)),
    "k710_l14_336": (256, 5e-6, 5, 40, (4, 3)), "k400_b16": (256, 2e-6, 1, 5, (4, 3)),
    "k600_b16_clip": (256, 1e-5, 5, 55, (4, 3)), "k700_l14_16f": (256, 1.5e-6, 1, 5, (4, 3)),
    "k400_l14_32f": (128, 1.5e-6, 1, 5, (4, 3)), "k400_l14_336_32f": (128, 1.5e-6, 1, 5, (4, 3)),
    "mit_b16": (512, 2e-5, 5, 24, (4, 3)), "mit_l14": (512, 1e-5, 5, 18, (4, 3)),
    "ssv2_b16_16f": (256, 4e-5, 5, 22, (1, 3)), "ssv2_l14_32f": (256, 2e-5, 5, 22, (1, 3)),
    "frozen_k710_l14_336_clip": (512, 8e-4, 0, 50, (3, 1)),
    "frozen_k600_l14_336_clip": (512, 8e-4, 0, 50, (3, 1)),
    "frozen_k400_l14_336_8f": (512, 5e-5, 1, 5, (3, 1)),
    "frozen_k700_l14_336_32f": (256, 5e-5, 1, 5, (3, 1)),
    "k600_l14_336_64f": (128, 1.5e-6, 1, 5, (4, 3)), "mit_l14_336": (512, 1e-5, 5, 18, (4, 3)),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_recipe_table(name):
  c = load(name)
  batch, lr, warm, epochs, views = TABLE[name]
  assert (c.train.global_batch_size, c.train.base_lr, c.train.warmup_epochs, c.train.epochs,
          (c.eval.num_clips, c.eval.num_crops)) == (batch, lr, warm, epochs, views)
  assert (c.train.weight_decay, c.train.grad_clip, c.train.b2, c.train.warmup_start_lr,
          c.train.min_lr) == (0.05, 20.0, 0.999, 1e-6, 1e-6)


def test_family_settings():
  k = load("k400_b16")
  assert k.head_map == "k400" and k.init_from and k.input.flip
  s = build_model_config(load("ssv2_b16_16f"))
  assert (s.no_lmhra, s.double_lmhra, s.dw_reduction, s.temporal_downsample) == (False, True, 1.5, True)
  assert s.return_list == tuple(range(4, 12)) and s.n_layers == 8
  assert (s.backbone_drop_path_rate, s.drop_path_rate) == (0.2, 0.4)
  c = load("ssv2_l14_16f")
  assert not c.input.flip and c.input.num_samples == 2
  assert build_model_config(c).return_list == tuple(range(8, 24))
  assert build_model_config(load("frozen_k710_l14_336_clip")).frozen
  clip = load("frozen_k700_l14_336_clip")
  assert build_model_config(clip).frozen and clip.dataset.name == "kinetics700"
  assert clip.init_new_head and clip.init_from == "pretrained/clip_l14_336"
  f = load("frozen_k400_l14_336_32f")
  assert build_model_config(f).frozen and f.head_map == "k400"
  assert load("k400_l14_32f").model.remat == "full"


def tiny(**train):
  c = load("demo")
  c.dataset.name = "fake"
  c.train.update(train)
  return c


def test_good_config_passes():
  assert check(tiny(), n_devices=8).width == 64  # configs/demo.py


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.train.__setattr__("bogus", 1), "config.train.bogus is not a known field"),
    (lambda c: c.model.__setattr__("widht", 8), "config.model.widht is not a model field"),
    (lambda c: c.train.__setattr__("global_batch_size", 12), "global_batch_size=12 is not divisible by 8"),
    (lambda c: c.mesh.__setattr__("fsdp", 3), "does not divide 8 devices"),
    (lambda c: c.dataset.update(name="kinetics400", data_dir="/nonexistent"),
     "no built dataset 'kinetics400' at /nonexistent"),
    (lambda c: c.input.__setattr__("crop_size", 64), "crop_size=64 but the model's input_resolution is 32"),
    (lambda c: c.dataset.update(name="synthetic", data_dir="gs://bucket/tfds"),
     "data_dir=gs://bucket/tfds: the synthetic dataset is rendered and built on a local disk"),
    (lambda c: c.train.__setattr__("seed", -1), "config.train.seed=-1 must lie in [0, 2**31)"),
])
def test_bad_configs_fail_with_one_message(mutate, message):
  c = tiny()
  with c.unlocked():
    mutate(c)
  with pytest.raises(ConfigError, match=re.escape(message)):
    check(c, n_devices=8)


def test_model_axis_across_hosts_and_replica_batch_are_checked():
  c = tiny()
  c.mesh.update(data=1, fsdp=1, model=8)
  with pytest.raises(ConfigError, match="mesh.model=8: the model axis must lie within one host"):
    check(c, n_devices=8, n_processes=2)
  c = tiny()
  with c.unlocked():
    c.model.replica_batch = 3
  with pytest.raises(ConfigError, match="replica_batch=3 does not divide the 32 clips of a step"):
    check(c, n_devices=8)


def test_init_checkpoint_of_another_model(tmp_path):
  from flax import nnx
  from uniformerv2_jax import checkpoint
  from uniformerv2_jax.model import UniFormerV2
  c = tiny()
  other = build_model_config(c).replace(width=32, heads=2, n_head=2)
  checkpoint.save_pretrained(str(tmp_path / "other"), UniFormerV2(other, rngs=nnx.Rngs(0)))
  c.init_from = str(tmp_path / "other")
  with pytest.raises(ConfigError, match="holds another model than config.model"):
    check(c, n_devices=1)
  c.init_from = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match=r"config.init_from: .*/missing: no such model directory\. "
                     r"Convert the checkpoint the recipe starts from into it \(python -m convert"):
    check(c, n_devices=1)


def test_unwritable_workdir_stops_before_anything(tmp_path):
  from uniformerv2_jax.training.loop import train_and_evaluate
  (tmp_path / "file").write_text("x")
  with pytest.raises(ConfigError, match=r"--workdir .*file/run: cannot write there"):
    train_and_evaluate(tiny(), str(tmp_path / "file" / "run"))
  c = tiny()
  c.train.tensorboard_dir = str(tmp_path / "file" / "tb")
  with pytest.raises(ConfigError, match=r"config.train.tensorboard_dir .*file/tb: cannot write"):
    train_and_evaluate(c, str(tmp_path / "run"))


def test_a_model_directory_is_no_workdir(tmp_path):
  """Training into a converted model directory would put a run beside the model that readers
  of the folder take: refused; a folder that holds both is named, not read as either."""
  from flax import nnx
  from uniformerv2_jax import checkpoint
  from uniformerv2_jax.model import UniFormerV2
  from uniformerv2_jax.training.loop import train_and_evaluate
  c = tiny()
  model_dir = checkpoint.save_pretrained(str(tmp_path / "m"), UniFormerV2(
      build_model_config(c), rngs=nnx.Rngs(0)))
  with pytest.raises(ConfigError, match=rf"--workdir {model_dir} is a model directory "
                     rf"\(config.json\).* pass --config.init_from={model_dir}$"):
    train_and_evaluate(c, model_dir)
  assert sorted(os.listdir(model_dir)) == ["config.json", "weights"]
  os.mkdir(os.path.join(model_dir, "checkpoints"))
  with pytest.raises(checkpoint.CheckpointError, match="holds both a model directory"):
    checkpoint.load_pretrained(model_dir)


@pytest.mark.parametrize("head", [3, 6])
def test_dataset_and_head_of_other_sizes(tmp_path, head):
  """Labels the head has no row for (they made the loss NaN), or rows no label reaches (a
  forgotten num_classes; eval.py then refuses the model for this dataset), stop the run
  before it starts."""
  from uniformerv2_jax.training.loop import train_and_evaluate
  c = load("demo")
  c.dataset.update(data_dir=str(tmp_path / "tfds"), num_train=4, num_val=4, synthetic_size=16,
                   synthetic_frames=4, num_classes=head)
  c.model.num_classes = head
  with pytest.raises(ConfigError, match=r"dataset synthetic \(.*\) has 4 classes \(labels 0..3\)"
                     rf" but config.model.num_classes={head}; set --config.model.num_classes=4"):
    train_and_evaluate(c, str(tmp_path / "run"))
  if head == 3:  # and a shard lost from the dataset is named before anything else
    (shard,) = glob.glob(str(tmp_path / "tfds" / "**" / "*-train.array_record-*"), recursive=True)
    os.remove(shard)
    with pytest.raises(ConfigError, match=rf"config.dataset: .* the train split cannot be read: "
                       rf"{os.path.basename(shard)} is missing or damaged"):
      train_and_evaluate(c, str(tmp_path / "run"))


def test_train_py_reports_bad_config_without_traceback(tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "train.py"), f"--config={ROOT}/configs/demo.py",
       f"--workdir={tmp_path}", "--config.train.global_batch_size=12",
       "--config.dataset.name=fake"],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert out.returncode != 0
  assert "error: Bad config: config.train.global_batch_size=12 is not divisible by 8" in out.stderr
  assert "Traceback" not in out.stderr


@pytest.mark.parametrize("script,args,message", [
    ("train.py", ["--config=configs/demo.py", "--config.trian.epochs=1"],
     "error: --config.trian.epochs: the config has no field 'trian'. Did you mean \"train\""),
    ("train.py", ["--config=configs/demo.py", "--config.seed=3"],
     "error: --config.seed: the config has no field 'seed'. Did you mean --config.train.seed?"),
    ("eval.py", ["--config=configs/demoo.py", "--checkpoint=x"],
     "error: --config: cannot load the config file: [Errno 2] No such file or directory: "
     "'configs/demoo.py'"),
    ("train.py", ["--config=configs/common.py"],
     "error: --config=configs/common.py: the file defines no get_config(), so it is no recipe"),
])
def test_entry_points_report_config_flag_errors_in_one_line(tmp_path, script, args, message):
  out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args,
                        f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr[-500:]


def test_every_model_field_can_be_set_on_the_command_line(monkeypatch):
  """--config.model.X=... reaches every ModelConfig field, whether the recipe sets it or not;
  a field nobody sets keeps the preset's value."""
  import dataclasses
  from absl import flags
  from uniformerv2_jax.config import ModelConfig
  base = build_model_config(load("k400_b16"))
  assert base == model_config("b16", t_size=8, dtype="bfloat16")
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv)
  argv = ["train.py", f"--config={os.path.join(ROOT, 'configs', 'k400_b16.py')}",
          "--config.model.no_lmhra=False", "--config.model.temporal_downsample=True",
          "--config.model.return_list=(4, 5, 6, 7, 8, 9, 10, 11)", "--config.model.dw_reduction=2",
          "--config.model.replica_batch=16", "--config.model.mlp_dropout=0.1"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  fv(argv)
  cfg = build_model_config(fv.config)
  assert (cfg.no_lmhra, cfg.temporal_downsample, cfg.dw_reduction, cfg.replica_batch) == \
      (False, True, 2.0, 16)
  assert cfg.return_list == tuple(range(4, 12)) and cfg.n_layers == 8
  assert cfg.mlp_dropout == (0.1,) * 8
  assert set(load("k400_b16").model.keys()) == {"name"} | {
      f.name for f in dataclasses.fields(ModelConfig)}
  c = load("k400_b16")  # in a config file: what model_config accepts (a scalar dropout, 0/1)
  c.model.update(mlp_dropout=0.0, frozen=1, return_list=[10, 11])
  assert build_model_config(c).mlp_dropout == (0.0, 0.0) and build_model_config(c).frozen

"""UniFormerV2 checkpoints through the CLI, load_pretrained and export, against golden logits."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import GOLDEN, golden_case, rel_err, torch_input_to_jax
from convert.__main__ import main as cli_main
from convert_cli import ROOT, cli, config_file, run_cli
from uniformerv2_jax.checkpoint import (load_pretrained, read_class_names, read_config,
                                        restore_weights, save_pretrained)


@functools.lru_cache(maxsize=None)
def _jit_logits():
  return nnx.jit(lambda model, x: model(x))


def logits(directory, case, **kw):
  arrays, _ = golden_case(case)
  model = load_pretrained(directory, dtype="float64", param_dtype="float64", **kw)
  return np.asarray(_jit_logits()(model, jnp.asarray(torch_input_to_jax(arrays["input"]),
                                                      jnp.float64))), arrays


def test_k400_cli_load_pretrained_logits(k400_dir, x64):
  out, arrays = logits(k400_dir, "tiny_k400")
  assert rel_err(out, arrays["logits"]) < 1e-9
  assert read_class_names(k400_dir) == [f"class {i}" for i in range(10)]


def test_ssv2_mmaction_cli_with_inferred_config(tmp_path, x64):
  """Only what shapes cannot tell is given; Local MHRA etc. are read off the checkpoint."""
  cfg = tmp_path / "partial.json"
  cfg.write_text(json.dumps({"t_size": 8, "heads": 4, "n_head": 4}))
  code, out = run_cli("uniformerv2", "--input", GOLDEN / "tiny_ssv2_mmaction.pth",
                      "--model", cfg, "--output", tmp_path / "model")
  assert code == 0, out
  got = read_config(tmp_path / "model")
  _, want = golden_case("tiny_ssv2")
  for field in ("input_resolution", "patch_size", "width", "layers", "temporal_downsample",
                "no_lmhra", "double_lmhra", "dw_reduction", "n_layers", "num_classes", "frozen",
                "mlp_factor"):
    assert getattr(got, field) == want[field], field
  assert list(got.return_list) == want["return_list"]
  out, arrays = logits(tmp_path / "model", "tiny_ssv2")
  assert rel_err(out, arrays["logits"]) < 1e-9


@pytest.mark.parametrize("case,layout", [("tiny_ssv2", "{}.pyth"), ("tiny_k400", "{}_mmaction.pth")])
def test_other_layouts_in_process(case, layout, tmp_path, x64):
  code, err = cli("uniformerv2", "--input", GOLDEN / layout.format(case),
                  "--model", config_file(tmp_path, case), "--output", tmp_path / "m")
  assert code == 0, err
  out, arrays = logits(tmp_path / "m", case, scan_layers=True)
  assert rel_err(out, arrays["logits"]) < 1e-9


def _tensors(path, counters=False):
  sd = torch.load(path, weights_only=True)
  sd = sd.get("model_state", sd.get("state_dict", sd))
  return {k: v for k, v in sd.items() if counters or not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("case", ["tiny_k400", "tiny_ssv2"])
def test_export_round_trip(case, tmp_path, x64):
  code, err = cli("uniformerv2", "--input", GOLDEN / f"{case}.pyth",
                  "--model", config_file(tmp_path, case), "--output", tmp_path / "m")
  assert code == 0, err
  for layout, original in (("original", f"{case}.pyth"), ("mmaction2", f"{case}_mmaction.pth")):
    exported = tmp_path / f"export_{layout}.pth"
    code, err = cli("export", "--input", tmp_path / "m", "--layout", layout, "--output", exported)
    assert code == 0, err
    got, want = _tensors(exported), _tensors(GOLDEN / original)
    assert got.keys() == want.keys()
    for k in want:
      assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    raw = torch.load(exported, weights_only=True)
    assert ("model_state" in raw) == (layout == "original")
    counters = [v for k, v in _tensors(exported, counters=True).items()
                if k.endswith("num_batches_tracked")]
    assert len(counters) == len(_tensors(GOLDEN / original, counters=True)) - len(want)
    bn = torch.nn.BatchNorm3d(2).state_dict()["num_batches_tracked"]  # what strict loading meets
    assert all(c.dtype == bn.dtype and c.shape == bn.shape for c in counters)
    code, err = cli("uniformerv2", "--input", exported, "--model", config_file(tmp_path, case),
                    "--output", tmp_path / f"again_{layout}")
    assert code == 0, err
    first, again = restore_weights(tmp_path / "m"), restore_weights(tmp_path / f"again_{layout}")
    jax.tree.map(np.testing.assert_array_equal, again, first)  # identical model
  out, arrays = logits(tmp_path / "again_mmaction2", case)
  assert rel_err(out, arrays["logits"]) < 1e-9


def test_export_flat_and_bfloat16(tmp_path):
  """--flat writes the bare dict the original repository's PRETRAIN reads; bfloat16 parameters
  export as bfloat16 tensors holding the same values."""
  code, err = cli("uniformerv2", "--input", GOLDEN / "tiny_k400.pyth",
                  "--model", config_file(tmp_path, "tiny_k400"), "--output", tmp_path / "m")
  assert code == 0, err
  code, err = cli("export", "--input", tmp_path / "m", "--layout", "original", "--flat",
                  "--output", tmp_path / "flat.pyth")
  assert code == 0, err
  raw, golden = (torch.load(p, weights_only=True) for p in (tmp_path / "flat.pyth",
                                                             GOLDEN / "tiny_k400.pyth"))
  assert raw.keys() == golden["model_state"].keys()
  assert all(torch.equal(raw[k], golden["model_state"][k]) for k in raw)
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(tmp_path / "flat.pyth").st_mode & 0o777 == 0o666 & ~umask  # as open() makes
  save_pretrained(tmp_path / "bf16", load_pretrained(tmp_path / "m", param_dtype="bfloat16"))
  code, err = cli("export", "--input", tmp_path / "bf16", "--layout", "mmaction2",
                  "--output", tmp_path / "bf16.pth")
  assert code == 0, err
  got, want = _tensors(tmp_path / "bf16.pth"), _tensors(GOLDEN / "tiny_k400_mmaction.pth")
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].to(torch.bfloat16)), k


def test_frozen_model_exports_to_mmaction2(tmp_path, x64, capsys):
  """mmaction2's UniFormerV2 has no frozen option: the export writes balance = -inf, and the
  model mmaction2 builds (balance present) computes the frozen model's logits exactly."""
  sd = torch.load(GOLDEN / "tiny_k400.pyth", weights_only=True)
  del sd["model_state"]["backbone.transformer.balance"]
  torch.save(sd, tmp_path / "frozen.pyth")
  code, err = cli("uniformerv2", "--input", tmp_path / "frozen.pyth", "--model",
                  config_file(tmp_path, "tiny_k400", frozen=True), "--output", tmp_path / "m")
  assert code == 0, err
  code, err = cli("export", "--input", tmp_path / "m", "--layout", "mmaction2",
                  "--output", tmp_path / "frozen.pth")
  assert code == 0, err
  balance = _tensors(tmp_path / "frozen.pth")["backbone.transformer.balance"]
  assert balance.dtype == torch.float32 and torch.all(balance == -torch.inf)
  code, err = cli("uniformerv2", "--input", tmp_path / "frozen.pth", "--model",
                  config_file(tmp_path, "tiny_k400"), "--output", tmp_path / "mixed")
  assert code == 0, err
  frozen, _ = logits(tmp_path / "m", "tiny_k400")
  mixed, arrays = logits(tmp_path / "mixed", "tiny_k400")
  np.testing.assert_array_equal(mixed, frozen)
  assert rel_err(mixed, arrays["logits"]) > 1e-3  # the golden (unfrozen) model's differ
  # back with the frozen model's own config: the frozen model again, balance dropped
  capsys.readouterr()
  assert cli_main(["uniformerv2", "--input", str(tmp_path / "frozen.pth"), "--model",
                   str(tmp_path / "m"), "--output", str(tmp_path / "again")]) == 0
  assert "converted as the frozen model the config names" in capsys.readouterr().out
  again, first = restore_weights(tmp_path / "again"), restore_weights(tmp_path / "m")
  assert jax.tree.structure(again) == jax.tree.structure(first)
  jax.tree.map(np.testing.assert_array_equal, again, first)


def test_head_map_on_cli(tmp_path):
  """A made-up 710-way checkpoint becomes a K600 model with the published map."""
  sd = torch.load(GOLDEN / "tiny_k400.pyth", weights_only=True)["model_state"]
  rng = np.random.default_rng(0)
  sd["backbone.transformer.proj.2.weight"] = torch.from_numpy(
      rng.normal(size=(710, 64)).astype(np.float32))
  sd["backbone.transformer.proj.2.bias"] = torch.from_numpy(
      rng.normal(size=(710,)).astype(np.float32))
  torch.save({"model_state": sd}, tmp_path / "k710.pyth")
  code, err = cli("uniformerv2", "--input", tmp_path / "k710.pyth", "--model",
                  config_file(tmp_path, "tiny_k400", num_classes=710), "--head-map", "k600",
                  "--output", tmp_path / "m")
  assert code == 0, err
  fc = restore_weights(tmp_path / "m")["head"]["fc"]
  with open(os.path.join(ROOT, "uniformerv2_jax", "label_maps", "map_k600.json")) as f:
    index = json.load(f)
  np.testing.assert_array_equal(fc["kernel"], sd["backbone.transformer.proj.2.weight"].numpy()[index].T)
  np.testing.assert_array_equal(fc["bias"], sd["backbone.transformer.proj.2.bias"].numpy()[index])
  assert read_config(tmp_path / "m").num_classes == 600
  names = read_class_names(tmp_path / "m")
  assert len(names) == 600 and names[0] == open(os.path.join(
      ROOT, "uniformerv2_jax", "label_maps", "label_map_k600.txt")).readline().strip()


def test_kinetics_head_class_names_by_layout(tmp_path, capsys):
  """mmaction2 ordered its ported Kinetics heads as its label maps: those names are written.
  The original repository's heads use that repository's order: no names, and a note why."""
  rng = np.random.default_rng(0)
  head = {"weight": torch.from_numpy(rng.normal(size=(400, 64)).astype(np.float32)),
          "bias": torch.from_numpy(rng.normal(size=(400,)).astype(np.float32))}
  original = torch.load(GOLDEN / "tiny_k400.pyth", weights_only=True)
  mmaction = torch.load(GOLDEN / "tiny_k400_mmaction.pth", weights_only=True)
  for k, v in head.items():
    original["model_state"][f"backbone.transformer.proj.2.{k}"] = v
    mmaction["state_dict"][f"cls_head.fc_cls.{k}"] = v
  torch.save(original, tmp_path / "k400.pyth")
  torch.save(mmaction, tmp_path / "k400.pth")
  model = config_file(tmp_path, "tiny_k400", num_classes=400)
  with open(os.path.join(ROOT, "uniformerv2_jax", "label_maps", "label_map_k400.txt")) as f:
    k400 = [line.strip() for line in f if line.strip()]

  capsys.readouterr()
  assert cli_main(["uniformerv2", "--input", str(tmp_path / "k400.pth"), "--model", model,
                   "--output", str(tmp_path / "mm")]) == 0
  assert "label_map_k400.txt" in capsys.readouterr().out
  assert read_class_names(tmp_path / "mm") == k400

  assert cli_main(["uniformerv2", "--input", str(tmp_path / "k400.pyth"), "--model", model,
                   "--output", str(tmp_path / "orig")]) == 0
  assert "that repository's order" in capsys.readouterr().out
  assert read_class_names(tmp_path / "orig") is None
  assert cli_main(["uniformerv2", "--input", str(tmp_path / "k400.pyth"), "--model", model,
                   "--class-names", "k400", "--output", str(tmp_path / "named")]) == 0
  assert read_class_names(tmp_path / "named") == k400  # a packaged list, as data.build takes
  jax.tree.map(np.testing.assert_array_equal, restore_weights(tmp_path / "orig"),
               restore_weights(tmp_path / "mm"))  # the same weights either way


def test_a_head_without_class_names_says_how_to_give_them(tmp_path, capsys):
  capsys.readouterr()
  assert cli_main(["uniformerv2", "--input", str(GOLDEN / "tiny_k400.pyth"), "--model",
                   config_file(tmp_path, "tiny_k400"), "--output", str(tmp_path / "m")]) == 0
  assert "no class names written (10-way head): pass --class-names FILE" in \
      capsys.readouterr().out
  assert read_class_names(tmp_path / "m") is None


def test_a_backbone_without_head_gets_a_new_one_on_request(tmp_path, capsys):
  """A checkpoint saved without its classifier is named as such; --new-head gives it the head
  `UniFormerV2(cfg, rngs=nnx.Rngs(seed))` starts with, the backbone converted as usual."""
  from uniformerv2_jax.model import UniFormerV2
  for name, key in (("tiny_k400.pyth", "model_state"), ("tiny_k400_mmaction.pth", "state_dict")):
    sd = torch.load(GOLDEN / name, weights_only=True)
    for k in [k for k in sd[key] if ".proj.2." in k or k.startswith("cls_head.fc_cls.")]:
      del sd[key][k]
    torch.save(sd, tmp_path / f"headless_{name}")
  model = config_file(tmp_path, "tiny_k400")
  for name in ("tiny_k400.pyth", "tiny_k400_mmaction.pth"):
    code, err = cli("uniformerv2", "--input", tmp_path / f"headless_{name}", "--model", model,
                    "--output", tmp_path / "refused")
    assert code == 2 and f"headless_{name} holds no classifier" in err, err
    assert "--new-head --set num_classes=N" in err and not (tmp_path / "refused").exists()

  capsys.readouterr()
  assert cli_main(["uniformerv2", "--input", str(tmp_path / "headless_tiny_k400.pyth"), "--model",
                   model, "--new-head", "--set", "num_classes=7", "--seed", "3",
                   "--output", str(tmp_path / "new")]) == 0
  assert "7 classes (a new head, seed 3)" in capsys.readouterr().out
  assert cli_main(["uniformerv2", "--input", str(GOLDEN / "tiny_k400.pyth"), "--model", model,
                   "--output", str(tmp_path / "full")]) == 0
  cfg = read_config(tmp_path / "new")
  assert cfg.num_classes == 7 and read_class_names(tmp_path / "new") is None
  new, full = restore_weights(tmp_path / "new"), restore_weights(tmp_path / "full")
  want = nnx.to_pure_dict(nnx.state(UniFormerV2(cfg, rngs=nnx.Rngs(3)), nnx.Param))["head"]["fc"]
  jax.tree.map(np.testing.assert_array_equal, new["head"]["fc"], jax.tree.map(np.asarray, want))
  new["head"].pop("fc"), full["head"].pop("fc")
  jax.tree.map(np.testing.assert_array_equal, new, full)  # the rest is the checkpoint's

  # A head that exists is replaced; a remap of it cannot also be asked for.
  assert cli_main(["uniformerv2", "--input", str(GOLDEN / "tiny_k400.pyth"), "--model", model,
                   "--new-head", "--set", "num_classes=7", "--seed", "3",
                   "--output", str(tmp_path / "replaced")]) == 0
  jax.tree.map(np.testing.assert_array_equal, restore_weights(tmp_path / "replaced")["head"],
               restore_weights(tmp_path / "new")["head"])
  code, err = cli("uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model", model,
                  "--new-head", "--head-map", "k400", "--output", tmp_path / "both")
  assert code == 2 and "--new-head and --head-map k400 contradict" in err, err


# --------------------------------------------------------------------------- bad inputs


def test_a_model_directory_serves_as_model_argument(tmp_path, k400_dir, x64):
  code, err = cli("uniformerv2", "--input", GOLDEN / "tiny_k400_mmaction.pth", "--model",
                  k400_dir, "--output", tmp_path / "m")
  assert code == 0, err
  got, arrays = logits(tmp_path / "m", "tiny_k400")
  assert rel_err(got, arrays["logits"]) < 1e-12

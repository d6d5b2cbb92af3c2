"""The converters' failure modes: damaged and foreign files, configs that do not fit, outputs
that must not be lost or half-written; each one error line naming the file and what to do."""

import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import GOLDEN, golden_case
from convert.__main__ import main as cli_main
from convert_cli import cli, config_file, only_entries


def _bad(tmp_path, *args):
  before = only_entries(tmp_path)
  code, err = cli(*args, "--output", tmp_path / "out")
  assert code == 2, err
  assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err
  assert only_entries(tmp_path) == before  # no output, no temporary leftovers
  return err


def test_truncated_file(tmp_path):
  data = (GOLDEN / "tiny_k400.pyth").read_bytes()
  (tmp_path / "cut.pyth").write_bytes(data[: len(data) // 2])
  err = _bad(tmp_path, "uniformerv2", "--input", tmp_path / "cut.pyth", "--model",
             config_file(tmp_path, "tiny_k400"))
  assert "cut.pyth" in err and "truncated or corrupt" in err


def test_damaged_bytes_are_refused_not_converted(tmp_path):
  """A file damaged in place (same length, zeroed bytes): its zip members' CRC-32s, which
  torch.load does not check, name it; a file saved without checksums still converts."""
  data = bytearray((GOLDEN / "tiny_k400.pyth").read_bytes())
  data[len(data) // 2: len(data) // 2 + 2000] = bytes(2000)
  (tmp_path / "damaged.pyth").write_bytes(data)
  err = _bad(tmp_path, "uniformerv2", "--input", tmp_path / "damaged.pyth", "--model",
             config_file(tmp_path, "tiny_k400"))
  assert "damaged.pyth: corrupt PyTorch file (Bad CRC-32 for file 'tiny_k400/data/" in err, err
  assert "Download or copy it again" in err
  from torch.utils.serialization import config
  sd = torch.load(GOLDEN / "tiny_k400.pyth", weights_only=True)
  with config.patch({"save.compute_crc32": False}):
    torch.save(sd, tmp_path / "no_crc.pyth")
  code, err = cli("uniformerv2", "--input", tmp_path / "no_crc.pyth", "--model",
                  config_file(tmp_path, "tiny_k400"), "--output", tmp_path / "m")
  assert code == 0, err


def test_pickle_needing_code_is_refused_unless_trusted(tmp_path):
  sd = torch.load(GOLDEN / "tiny_k400.pyth", weights_only=True)
  sd["cfg"] = argparse.Namespace(lr=0.1)
  torch.save(sd, tmp_path / "pickled.pyth")
  cfg = config_file(tmp_path, "tiny_k400")
  err = _bad(tmp_path, "uniformerv2", "--input", tmp_path / "pickled.pyth", "--model", cfg)
  assert "pickled.pyth" in err and "--trust-pickle" in err and "Namespace" in err
  code, err = cli("uniformerv2", "--input", tmp_path / "pickled.pyth", "--model", cfg,
                  "--trust-pickle", "--output", tmp_path / "trusted")
  assert code == 0, err


def test_unknown_layout(tmp_path):
  torch.save({"layer1.0.conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "resnet.pth")
  for command in ("uniformerv2", "clip"):
    err = _bad(tmp_path, command, "--input", tmp_path / "resnet.pth", "--model",
               config_file(tmp_path, "tiny_k400"))
    assert "resnet.pth" in err and "unknown layout" in err and "layer1.0.conv1.weight" in err


def test_weights_of_another_model(tmp_path):
  err = _bad(tmp_path, "uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model",
             config_file(tmp_path, "tiny_ssv2"))
  assert "tiny_k400.pyth" in err and "another model" in err
  for fact in ("width", "class_embedding", "no_lmhra", "num_classes", "transformer.proj.2.weight"):
    assert fact in err, fact


def test_wrong_class_count(tmp_path):
  err = _bad(tmp_path, "uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model",
             config_file(tmp_path, "tiny_k400"), "--set", "num_classes=5")
  assert "num_classes" in err and "10" in err and "transformer.proj.2.weight" in err


def test_clip_file_given_to_uniformerv2_and_back(tmp_path):
  err = _bad(tmp_path, "uniformerv2", "--input", GOLDEN / "tiny_clip_visual.pth", "--model",
             config_file(tmp_path, "tiny_clip"))
  assert "tiny_clip_visual.pth" in err and "convert clip" in err
  for name in ("tiny_k400.pyth", "tiny_k400_mmaction.pth"):  # both UniFormerV2 layouts
    err = _bad(tmp_path, "clip", "--input", GOLDEN / name, "--model",
               config_file(tmp_path, "tiny_clip"))
    assert f"{name} is a UniFormerV2 model" in err and "python -m convert uniformerv2" in err


def test_mismatch_only_the_rules_see_is_named_by_key(tmp_path):
  """A tensor of the wrong shape that inference does not look at: the key is named."""
  sd = torch.load(GOLDEN / "tiny_k400.pyth", weights_only=True)["model_state"]
  sd["backbone.transformer.dpe.1.bias"] = torch.zeros(3)
  torch.save({"model_state": sd}, tmp_path / "bad.pyth")
  err = _bad(tmp_path, "uniformerv2", "--input", tmp_path / "bad.pyth", "--model",
             config_file(tmp_path, "tiny_k400"))
  assert "bad.pyth" in err and "transformer.dpe.1.bias" in err and "(3,)" in err


def test_torch_files_in_a_bucket_are_refused_with_what_to_do(tmp_path):
  err = _bad(tmp_path, "uniformerv2", "--input", "gs://bucket/k400_b16.pyth", "--model",
             config_file(tmp_path, "tiny_k400"))
  assert "gs://bucket/k400_b16.pyth: PyTorch files are read from a local disk" in err
  code, err = cli("uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model",
                  config_file(tmp_path, "tiny_k400"), "--output", tmp_path / "m")
  assert code == 0, err
  code, err = cli("export", "--input", tmp_path / "m", "--layout", "original", "--output",
                  "gs://bucket/k400_b16.pyth")
  assert code == 2 and "PyTorch files are written to a local disk" in err, err


def test_random_bytes_are_not_a_checkpoint(tmp_path):
  (tmp_path / "noise.pth").write_bytes(np.random.default_rng(0).bytes(4096))
  err = _bad(tmp_path, "uniformerv2", "--input", tmp_path / "noise.pth", "--model",
             config_file(tmp_path, "tiny_k400"))
  assert "noise.pth: not a PyTorch checkpoint" in err and "--trust-pickle" not in err


def test_bad_arguments_get_one_line(tmp_path):
  cfg = config_file(tmp_path, "tiny_k400")
  err = _bad(tmp_path, "uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model", cfg,
             "--set", "t_size=abc")
  assert "t_size='abc' is not an integer" in err
  # What only the checkpoint's shapes decide names both sources
  err = _bad(tmp_path, "uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model", cfg,
             "--set", "return_list=[2,9]")
  assert (f"tiny_k400.pyth with --model {cfg} and --set: Invalid UniFormerV2 config: "
          "return_list [2, 9] must lie in [0, 4)") in err, err
  names = tmp_path / "three.txt"
  names.write_text("a\nb\nc\n")
  err = _bad(tmp_path, "uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model", cfg,
             "--class-names", names)
  assert f"--class-names {names}: 3 class names for a 10-way head" in err
  err = _bad(tmp_path, "uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model", cfg,
             "--class-names", tmp_path / "nope.txt")
  assert (f"error: --class-names: class-name file {tmp_path / 'nope.txt'}: no such file (nor a "
          "packaged list: k400|k600|k700|k710|mit|sthv2)") in err, err
  # A config file's mistakes are its own, found before the checkpoint is read (this one is cut
  # short, and that error would come from reading it)
  data = (GOLDEN / "tiny_k400.pyth").read_bytes()
  (tmp_path / "cut.pyth").write_bytes(data[: len(data) // 2])
  typo = tmp_path / "typo.json"
  typo.write_text(json.dumps({**golden_case("tiny_k400")[1], "t_sise": 8}))
  err = _bad(tmp_path, "uniformerv2", "--input", tmp_path / "cut.pyth", "--model", typo)
  assert f"error: --model {typo}: Unknown UniFormerV2 config field(s) ['t_sise']" in err, err
  err = _bad(tmp_path, "clip", "--input", tmp_path / "cut.pyth", "--model", cfg, "--set",
             "heads=four")
  assert "error: --set: Invalid UniFormerV2 config: heads='four' is not an integer" in err, err


def test_paths_are_named_for_what_they_are(tmp_path):
  """A folder given as --input, an --output whose folder cannot be written, a missing input
  beside an existing output: one line each, naming the argument at fault."""
  cfg = config_file(tmp_path, "tiny_k400")
  err = _bad(tmp_path, "uniformerv2", "--input", tmp_path, "--model", cfg)
  assert f"{tmp_path} is a folder; --input takes a PyTorch checkpoint file" in err
  (tmp_path / "a_file").write_text("")
  for command in (["uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model", cfg],
                  ["export", "--input", tmp_path, "--layout", "original"]):
    out = tmp_path / "a_file" / "out"
    code, err = cli(*command, "--output", out)
    assert code == 2 and f"error: --output {out}: cannot write in {tmp_path / 'a_file'}" in err, \
        err
  (tmp_path / "taken").mkdir()
  code, err = cli("checkpoint", "--input", tmp_path / "missing", "--output", tmp_path / "taken")
  assert code == 2 and "missing: no such model directory" in err, err
  code, err = cli("uniformerv2", "--input", tmp_path / "missing.pyth", "--model", cfg,
                  "--output", tmp_path / "new" / "model")
  assert code == 2 and "missing.pyth: no such file" in err, err
  assert not (tmp_path / "new").exists()  # no folder made for an output never written


def test_overwrite_replaces_only_a_model_directory(tmp_path):
  """--overwrite never deletes a folder that is not a model directory."""
  cfg = config_file(tmp_path, "tiny_k400")
  mine = tmp_path / "mine"
  (mine / "sub").mkdir(parents=True)
  (mine / "sub" / "notes.txt").write_text("keep me")
  code, err = cli("uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model", cfg,
                  "--output", mine, "--overwrite")
  assert code == 2 and "is not a model directory" in err, err
  assert (mine / "sub" / "notes.txt").read_text() == "keep me"
  code, err = cli("uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model", cfg,
                  "--output", tmp_path / "m")
  assert code == 0, err
  code, err = cli("uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model", cfg,
                  "--output", tmp_path / "m", "--overwrite")
  assert code == 0, err  # a model directory is replaced
  code, err = cli("export", "--input", tmp_path / "m", "--layout", "original", "--output", mine,
                  "--overwrite")
  assert code == 2 and "is a folder" in err, err
  assert (mine / "sub" / "notes.txt").read_text() == "keep me"
  code, err = cli("export", "--input", tmp_path / "m", "--layout", "original", "--output",
                  f"{tmp_path / 'new'}/")
  assert code == 2 and "is a folder" in err and not (tmp_path / "new").exists(), err
  # a model directory that also holds the user's files is not replaced with them
  (tmp_path / "m" / "k400.pyth").write_text("keep me")
  code, err = cli("uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model", cfg,
                  "--output", tmp_path / "m", "--overwrite")
  assert code == 2 and "holds more than a model (k400.pyth), which --overwrite would" in err, err
  assert (tmp_path / "m" / "k400.pyth").read_text() == "keep me"


def test_sigterm_leaves_no_partial_output(tmp_path, monkeypatch):
  """SIGTERM while the weights are written: exit 143, no output, no temporary folder."""
  import signal
  import time

  from uniformerv2_jax import checkpoint
  write = checkpoint._write_weights

  def write_then_terminated(path, flat):
    write(path, flat)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler runs here
    raise AssertionError("SIGTERM did not stop the conversion")

  monkeypatch.setattr(checkpoint, "_write_weights", write_then_terminated)
  before = signal.getsignal(signal.SIGTERM)
  try:
    with pytest.raises(SystemExit) as stop:
      cli_main(["uniformerv2", "--input", str(GOLDEN / "tiny_k400.pyth"), "--model",
                config_file(tmp_path, "tiny_k400"), "--output", str(tmp_path / "out")])
  finally:
    signal.signal(signal.SIGTERM, before)
  assert stop.value.code == 143
  assert only_entries(tmp_path) == ["tiny_k400.json"]  # the config file the test wrote


def test_writing_a_pytorch_file_that_fails_leaves_nothing(tmp_path, k400_dir, monkeypatch):
  """No room on the disk: refused before writing; a write that fails anyway (torch's zip
  writer raises RuntimeError on a full disk): one line, no temporary file."""
  import shutil
  usage = shutil.disk_usage(tmp_path)
  with monkeypatch.context() as m:
    m.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    code, err = cli("export", "--input", k400_dir, "--layout", "original", "--output",
                    tmp_path / "k400.pyth")
  assert code == 2 and f"error: {tmp_path / 'k400.pyth'} needs about" in err, err
  assert "1,000 bytes free; free some space or write elsewhere" in err, err

  def full_disk(obj, f):
    with open(f, "wb") as out:
      out.write(b"PK")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 604096")
  monkeypatch.setattr(torch, "save", full_disk)
  code, err = cli("export", "--input", k400_dir, "--layout", "original", "--output",
                  tmp_path / "k400.pyth")
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith(f"error: writing {tmp_path / 'k400.pyth'} failed, nothing was written "
                        "([enforce fail"), err
  assert err.rstrip().endswith("unexpected pos 604096); is the disk full?"), err
  assert os.listdir(tmp_path) == []


def test_leftovers_of_a_killed_conversion_are_named(tmp_path, k400_dir, capsys):
  """What a SIGKILLed conversion to m leaves: a temporary copy, and when it was replacing m
  and died between the two renames, the old model moved aside."""
  import shutil
  (tmp_path / ".m.tmp-1234").mkdir()
  shutil.copytree(k400_dir, tmp_path / ".m.old-99" / "x")
  (tmp_path / ".other.tmp-1").mkdir()  # another output's: not this one's to name
  code = cli_main(["uniformerv2", "--input", str(GOLDEN / "tiny_k400.pyth"), "--model",
                   config_file(tmp_path, "tiny_k400"), "--output", str(tmp_path / "m")])
  out = capsys.readouterr().out
  assert code == 0
  assert (f"note: {tmp_path / '.m.old-99' / 'x'} is the model that was at {tmp_path / 'm'} "
          "when a conversion replacing it was killed; it stays there") in out, out
  assert (f"note: {tmp_path / '.m.tmp-1234'}: left by a conversion to {tmp_path / 'm'} that "
          "was killed; delete them unless one is running now") in out, out
  assert ".other.tmp-1" not in out
  assert (tmp_path / ".m.tmp-1234").is_dir() and (tmp_path / ".m.old-99" / "x").is_dir()


def test_without_torch_the_converters_say_how_to_install_it(tmp_path, monkeypatch):
  """torch is not in requirements.txt (only the converters need it)."""
  code, err = cli("uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model",
                  config_file(tmp_path, "tiny_k400"), "--output", tmp_path / "m")
  assert code == 0, err
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  for args in (("uniformerv2", "--input", GOLDEN / "tiny_k400.pyth", "--model",
                config_file(tmp_path, "tiny_k400"), "--output", tmp_path / "m2"),
               ("export", "--input", tmp_path / "m", "--layout", "original", "--output",
                tmp_path / "k400.pyth")):
    code, err = cli(*args)
    assert code == 2 and err.startswith("error: the converters read and write PyTorch files"), err
    assert "pip install torch" in err and "Traceback" not in err
  assert sorted(os.listdir(tmp_path)) == ["m", "tiny_k400.json"]


def test_model_argument_names_what_is_wrong(tmp_path):
  from convert import ConversionError, infer
  with pytest.raises(ConversionError, match=r"--model '.*nothere.json': no such file; give a "
                     r"preset \['b16', 'l14', 'l14_336'\] or a JSON config file"):
    infer.base_fields(str(tmp_path / "nothere.json"))
  with pytest.raises(ConversionError, match=r"--model 'b17': neither a preset nor a file"):
    infer.base_fields("b17")

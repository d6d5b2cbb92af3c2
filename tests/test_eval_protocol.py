"""A converted golden checkpoint evaluated with eval.py's driver on a small built dataset gives
the per-video scores of the upstream protocol run by hand (recipes.md): test-mode sampling
indices, short-side resize, ThreeCrop, softmax mean over clips x crops."""

import json
import os

import numpy as np
import pytest
import torch

from uniformerv2_jax import from_torch_state_dict, model_config
from uniformerv2_jax.checkpoint import save_pretrained

from conftest import GOLDEN, golden_case
from test_predict import hand_indices, hand_resize, softmax

# (height, width, frames): landscape, portrait, square, long, and shorter than the clip.
VIDEOS = [(40, 56, 13), (56, 40, 9), (48, 48, 20), (36, 50, 31), (40, 52, 3)]
LABELS = [3, 0, 2, 1, 3]
CLASSES = [f"class {c}" for c in range(10)]
NUM_CLIPS, NUM_CROPS = 2, 3


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
  _, cfg = golden_case("tiny_k400")
  sd = torch.load(GOLDEN / "tiny_k400.pyth", map_location="cpu", weights_only=True)
  model = from_torch_state_dict(sd, model_config(None, **cfg))
  ckpt = save_pretrained(str(tmp_path_factory.mktemp("ckpt") / "tiny_k400"), model,
                         class_names=CLASSES)
  return model, ckpt


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  from uniformerv2_jax.data.builder import VideoConfig, build_dataset
  from uniformerv2_jax.data.synthetic import render_clip
  from uniformerv2_jax.data.video_io import write_video
  root = tmp_path_factory.mktemp("videos")
  rng = np.random.default_rng(0)
  lines = []
  for i, ((h, w, n), label) in enumerate(zip(VIDEOS, LABELS)):
    frames = render_clip(rng, label % 4, size=max(h, w), num_frames=n)[:, :h, :w]
    write_video(str(root / f"v{i}.mp4"), frames, fps=25)
    lines.append(f"v{i}.mp4 {label}\n")
  (root / "broken.mp4").write_bytes(b"not a video")  # skipped by the build, counted in summary
  lines.append("broken.mp4 2\n")
  (root / "val.txt").write_text("".join(lines))
  cfg = VideoConfig(name="evalprotocol", annotations={"validation": str(root / "val.txt")},
                    video_roots={"validation": str(root)}, class_names=CLASSES, short_side=None)
  return build_dataset(str(tmp_path_factory.mktemp("tfds")), cfg, num_workers=1)


def stored_frames(builder):
  """{video name: (frames (n, H, W, 3), label)}: the dataset's JPEG frames, decoded with
  TensorFlow's decoder (the pipeline's; other JPEG decoders differ by a few grey levels)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  source = builder.as_data_source(
      "validation", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  out = {}
  for i in range(len(source)):
    f = tf.train.Example.FromString(source[i]).features.feature
    frames = np.stack([tf.io.decode_jpeg(j, channels=3, dct_method="INTEGER_ACCURATE").numpy()
                       for j in f["video"].bytes_list.value])
    out[f["name"].bytes_list.value[0].decode()] = (frames, int(f["label"].int64_list.value[0]))
  return out


def hand_protocol(model, frames):
  """Upstream protocol by hand: indices, mmaction2 resize + ThreeCrop, softmax mean."""
  t, s = model.config.t_size, model.config.input_resolution
  views = []
  for clip in frames[hand_indices(len(frames), t, NUM_CLIPS)]:
    _, h, w, _ = clip.shape
    short, long_ = min(h, w), max(h, w)
    new_long = int(long_ * s / short + 0.5)
    r = hand_resize(clip, *((s, new_long) if h <= w else (new_long, s)))
    free = new_long - s
    for o in (0, 2 * (free // 2), free // 2):
      views.append(r[:, :, o:o + s] if w >= h else r[:, o:o + s, :])
  views = np.stack(views)
  logits = np.asarray(model((views.astype(np.float32) - 114.75) / 57.375), np.float64)
  return views, softmax(logits).mean(0)


def _config(per_device_batch=2):
  from configs.common import get_base_config
  c = get_base_config()
  c.model.dtype = "float32"
  c.dataset.name, c.dataset.num_classes, c.dataset.eval_split = "evalprotocol", 10, "validation"
  c.input.clip_len, c.input.crop_size = 4, 32
  c.eval.num_clips, c.eval.num_crops, c.eval.per_device_batch = NUM_CLIPS, NUM_CROPS, per_device_batch
  c.eval.save_scores = True
  return c


def test_eval_matches_hand_protocol(golden, dataset, tmp_path):
  from uniformerv2_jax import data
  from uniformerv2_jax.evaluation.driver import evaluate_checkpoint, video_names
  model, ckpt = golden
  stored = stored_frames(dataset)
  assert len(stored) == len(VIDEOS)

  # The pipeline's views are the hand views (up to one grey level of rounding), in
  # clip-major, crop-minor order.
  ds = data.eval_dataset(dataset, "validation", clip_len=4, crop_size=32, num_clips=NUM_CLIPS,
                         num_crops=NUM_CROPS, per_host_batch=4)
  rows = list(ds.as_numpy_iterator())
  split_names = video_names(dataset, "validation", range(len(VIDEOS)))
  hand = {name: hand_protocol(model, frames) for name, (frames, _) in stored.items()}
  expected = {name: probs for name, (_, probs) in hand.items()}
  seen = set()
  for b in rows:
    for video, vid, view, mask in zip(b["video"], b["video_id"], b["view"], b["mask"]):
      if mask:
        name = split_names[int(vid)]
        seen.add((name, int(view)))
        diff = np.abs(video.astype(int) - hand[name][0][int(view)].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.02, (name, int(view))
  assert len(seen) == len(VIDEOS) * NUM_CLIPS * NUM_CROPS

  messages = []
  summary = evaluate_checkpoint(_config(), ckpt, str(tmp_path), builder=dataset,
                                log=messages.append)
  assert any(f"over {len(VIDEOS)} videos (1 unreadable at build time left out, listed in "
             "skipped-validation.tsv beside the dataset)" in m for m in messages), messages
  results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert len(results) == len(VIDEOS) == summary["num_videos"]
  scores, labels = [], []
  for rec in results:
    name = rec["video"]
    np.testing.assert_allclose(rec["all_scores"], expected[name], atol=2e-3)
    assert rec["label"] == stored[name][1]
    scores.append(expected[name])
    labels.append(rec["label"])
  from uniformerv2_jax.evaluation import classification_metrics
  want = classification_metrics(np.array(scores), np.array(labels))
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  for k in ("top1", "top5", "mean_class_accuracy"):
    assert on_disk[k] == pytest.approx(want[k])
  assert on_disk["num_views"] == NUM_CLIPS * NUM_CROPS
  assert on_disk["protocol"]["spatial"] == "mmaction2"
  assert on_disk["protocol"]["dtype"] == "float32" and on_disk["protocol"]["attention"] == "xla"
  assert on_disk["protocol"]["model_t_size"] == model.config.t_size == 4
  assert on_disk["protocol"]["stored_short_side"] is None  # built at the source size
  assert on_disk["skipped_videos"] == 1  # broken.mp4


def test_eval_stopped_early_scores_the_complete_videos(golden, dataset, tmp_path):
  """max_batches: reads only those batches; a video cut off mid-views is left out, not an error."""
  from uniformerv2_jax.evaluation.driver import EvalConfigError, evaluate_checkpoint
  model, ckpt = golden
  c = _config(per_device_batch=4)  # 4 views a batch: 2 batches = one whole video + 2 views
  summary = evaluate_checkpoint(c, ckpt, str(tmp_path), builder=dataset, max_batches=2)
  assert summary["num_videos"] == 1 and summary["max_batches"] == 2
  (rec,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  frames, label = stored_frames(dataset)[rec["video"]]
  np.testing.assert_allclose(rec["all_scores"], hand_protocol(model, frames)[1], atol=2e-3)
  assert rec["label"] == label
  with pytest.raises(EvalConfigError, match="max_batches=1: no video got all its 6 views"):
    evaluate_checkpoint(c, ckpt, str(tmp_path / "one"), builder=dataset, max_batches=1)


def _reordered_checkpoint(model, directory, names):
  """The same model with its classes listed (and its head rows stored) in another order."""
  from flax import nnx

  from uniformerv2_jax import heads
  from uniformerv2_jax.checkpoint import WEIGHTS
  tree = nnx.to_pure_dict(nnx.state(model, WEIGHTS))
  rows = [CLASSES.index(n) for n in names]  # class i of the new head is old class rows[i]
  return save_pretrained(str(directory), heads.remap_head(tree, rows), class_names=names,
                         config=model.config)


def test_eval_scores_a_reordered_head_by_class_name(golden, dataset, tmp_path):
  """A head that lists the dataset's classes in another order (the original repository's
  Kinetics heads vs mmaction2's lists) is scored by name: the same scores as the original."""
  from uniformerv2_jax.evaluation.driver import EvalConfigError, evaluate_checkpoint
  model, _ = golden
  order = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5]
  ckpt = _reordered_checkpoint(model, tmp_path / "reordered", [CLASSES[i] for i in order])
  expected = {name: probs for name, (frames, _) in stored_frames(dataset).items()
              for probs in [hand_protocol(model, frames)[1]]}
  messages = []
  summary = evaluate_checkpoint(_config(), ckpt, str(tmp_path / "out"), builder=dataset,
                                log=messages.append)
  assert any("in another order" in m for m in messages), messages
  results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
  for rec in results:
    np.testing.assert_allclose(rec["all_scores"], expected[rec["video"]], atol=2e-3)
    assert rec["label_name"] == CLASSES[rec["label"]]
  assert summary["num_videos"] == len(VIDEOS) and summary["head_rows_by_class_name"]

  # Unchecked (the upstream's behaviour), row i is class i: the scores come out permuted.
  c = _config()
  c.eval.match_class_names = False
  unchecked = evaluate_checkpoint(c, ckpt, str(tmp_path / "raw"), builder=dataset)
  raw = [json.loads(line) for line in (tmp_path / "raw" / "results.jsonl").read_text().splitlines()]
  for rec in raw:
    np.testing.assert_allclose(rec["all_scores"], expected[rec["video"]][order], atol=2e-3)
  assert unchecked["num_videos"] == len(VIDEOS) and not unchecked["head_rows_by_class_name"]

  # Names that are not the dataset's classes: one clear error before anything runs.
  other = save_pretrained(str(tmp_path / "other"), model, class_names=CLASSES[:9] + ["class 99"])
  with pytest.raises(EvalConfigError, match="class names are not the dataset's"):
    evaluate_checkpoint(_config(), other, str(tmp_path / "x"), builder=dataset)

  # A head of another size than the dataset's label space, even if config.dataset agrees.
  from flax import nnx

  from uniformerv2_jax import heads
  from uniformerv2_jax.checkpoint import WEIGHTS
  tree = heads.remap_head(nnx.to_pure_dict(nnx.state(model, WEIGHTS)), list(range(9)))
  nine = save_pretrained(str(tmp_path / "nine"), tree, class_names=CLASSES[:9],
                         config=model.config.replace(num_classes=9))
  c = _config()
  c.dataset.num_classes = 9
  with pytest.raises(EvalConfigError, match="the model has 9 classes but dataset evalprotocol "
                     "has 10. Evaluate it on the dataset it was trained for"):
    evaluate_checkpoint(c, nine, str(tmp_path / "y"), builder=dataset)
  # A recipe's class count left on a dataset and model that agree: the setting is named.
  c = _config()
  c.dataset.num_classes = 400
  with pytest.raises(EvalConfigError, match=r"the model has 10 classes but "
                     r"config.dataset.num_classes is 400\. Dataset evalprotocol has 10 too: pass "
                     r"--config.dataset.num_classes=10\.$"):
    evaluate_checkpoint(c, ckpt, str(tmp_path / "z"), builder=dataset)


def test_dataset_not_built_is_one_message(golden, tmp_path):
  from uniformerv2_jax.evaluation.driver import EvalConfigError, evaluate_checkpoint
  c = _config()
  c.dataset.data_dir = str(tmp_path / "tfds")
  with pytest.raises(EvalConfigError, match=r"config.dataset: .*evalprotocol: no built dataset "
                     r"there .* python -m uniformerv2_jax.data.build"):
    evaluate_checkpoint(c, golden[1], str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()  # no empty output folder left behind
  (tmp_path / "tfds" / "video_classification" / "evalprotocol_short336").mkdir(parents=True)
  with pytest.raises(EvalConfigError, match=r"no built dataset there .* Built there under other "
                     r"names: evalprotocol_short336 \(pass --config.dataset.name=NAME"):
    evaluate_checkpoint(c, golden[1], str(tmp_path / "out"))
  c.dataset.name = "fake"
  with pytest.raises(EvalConfigError, match=r"config.dataset.name=fake: random clips .* have no "
                     r"videos to score; evaluate on a built dataset"):
    evaluate_checkpoint(c, golden[1], str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_crop_size_and_clip_length_against_the_checkpoint(golden, dataset, tmp_path):
  """A crop size the model cannot take stops before any model is built; another clip length
  (the model runs on it) is noted."""
  from uniformerv2_jax.evaluation.driver import EvalConfigError, evaluate_checkpoint, load_model
  from uniformerv2_jax.sharding import make_mesh
  c = _config()
  c.input.crop_size = 48
  with pytest.raises(EvalConfigError, match=r"tiny_k400 takes 32-pixel crops but "
                     r"config.input.crop_size is 48: use the config of its recipe"):
    evaluate_checkpoint(c, golden[1], str(tmp_path / "x"), builder=dataset)
  from uniformerv2_jax.data.builder import VideoConfig, build_dataset
  from uniformerv2_jax.data.video_io import write_video
  write_video(str(tmp_path / "v.mp4"), np.zeros((8, 40, 48, 3), np.uint8))
  (tmp_path / "val.txt").write_text("v.mp4 0\n")
  small = build_dataset(str(tmp_path / "tfds"), VideoConfig(
      name="small", annotations={"validation": str(tmp_path / "val.txt")}, short_side=16,
      video_roots={"validation": str(tmp_path)}, class_names=CLASSES), num_workers=1)
  messages = []
  evaluate_checkpoint(_config(), golden[1], builder=small, log=messages.append)
  assert ("eval: note: the frames are stored at short side 16, so the 32-pixel views are "
          "upscaled from them") in messages[0], messages
  c = _config()
  c.input.clip_len = 8
  messages = []
  model, _, _ = load_model(c, golden[1], make_mesh(dict(c.mesh)), log=messages.append)
  assert model.config.t_size == 8
  assert messages == [f"eval: note: {golden[1]} is set up for 4-frame clips (t_size in its "
                      "config); evaluating on 8 (config.input.clip_len)"]


def test_head_without_class_names_is_not_scored_unchecked(golden, dataset, tmp_path):
  """A head that does not name its classes (an original-repository checkpoint converted without
  --class-names) cannot be checked against the dataset's order: refused, unless the user says
  row i is class i."""
  from uniformerv2_jax.evaluation.driver import EvalConfigError, evaluate_checkpoint
  model, _ = golden
  nameless = save_pretrained(str(tmp_path / "nameless"), model)
  with pytest.raises(EvalConfigError, match="does not name its head's classes.*--class-names "
                     "FILE.*match_class_names=False"):
    evaluate_checkpoint(_config(), nameless, str(tmp_path / "x"), builder=dataset)
  c = _config()
  c.eval.match_class_names = False
  expected = {name: hand_protocol(model, frames)[1]
              for name, (frames, _) in stored_frames(dataset).items()}
  evaluate_checkpoint(c, nameless, str(tmp_path / "raw"), builder=dataset)
  for line in (tmp_path / "raw" / "results.jsonl").read_text().splitlines():
    rec = json.loads(line)
    np.testing.assert_allclose(rec["all_scores"], expected[rec["video"]], atol=2e-3)


@pytest.mark.parametrize("field,value,message", [
    ("spatial", "orig", "spatial='orig': use one of"), ("num_crops", 2, "num_crops=2: use 1")])
def test_bad_views_are_refused_before_loading_anything(field, value, message, tmp_path):
  from uniformerv2_jax.evaluation.driver import EvalConfigError, evaluate_checkpoint
  c = _config()
  c.eval[field] = value
  out = tmp_path / "eval" / "run"
  with pytest.raises(EvalConfigError, match=message):  # the checkpoint is never opened
    evaluate_checkpoint(c, str(tmp_path / "no-such-checkpoint"), str(out))
  assert not (tmp_path / "eval").exists()


def test_failed_evaluation_removes_the_folders_it_created(golden, tmp_path):
  from uniformerv2_jax.evaluation.driver import EvalConfigError, evaluate_checkpoint
  c = _config()
  c.dataset.data_dir = str(tmp_path / "tfds")  # never built
  with pytest.raises(EvalConfigError):
    evaluate_checkpoint(c, golden[1], str(tmp_path / "eval" / "a" / "out"))
  assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_damaged_dataset_is_named_not_read(golden, dataset, tmp_path):
  """A copy of a dataset whose shard is missing or cut short, or whose description is garbled:
  one error naming the folder and the file, before any model is loaded or output written."""
  import shutil
  from uniformerv2_jax.evaluation.driver import EvalConfigError, evaluate_checkpoint
  src = os.fspath(dataset.data_dir)
  shard = next(f for f in os.listdir(src) if ".array_record-" in f)

  def cut(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])

  for name, damage, match in (
      ("missing", lambda d: os.remove(d / shard), rf"{shard} is missing or damaged \(open"),
      ("cut", lambda d: cut(d / shard), rf"{shard} is missing or damaged \("),
      ("garbled", lambda d: (d / "dataset_info.json").write_text("{garbage"),
       r"description files .* cannot be read \(ParseError")):
    copy = tmp_path / name / "video_classification" / "evalprotocol" / "1.0.0"
    shutil.copytree(src, copy)
    damage(copy)
    c = _config()
    c.dataset.data_dir = str(tmp_path / name)
    with pytest.raises(EvalConfigError, match=rf"config.dataset: {copy}.*{match}.*Copy the "
                       r"dataset folder again if it was copied, else rebuild it"):
      evaluate_checkpoint(c, golden[1], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()

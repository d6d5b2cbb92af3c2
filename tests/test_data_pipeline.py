"""tf.data pipelines: sampling end to end, epochs and hosts, determinism, resume, eval views."""
import collections

import numpy as np
import pytest

import tensorflow as tf
import tensorflow_datasets as tfds

from uniformerv2_jax import data  # noqa: E402
from uniformerv2_jax.data.builder import VideoConfig, build_dataset  # noqa: E402
from uniformerv2_jax.data.video_io import write_video  # noqa: E402

# video i: FRAMES[i] frames, label i; frame k is flat grey 8*k, so pixels reveal the frame index
FRAMES = [30, 25, 20, 9, 8, 5, 1, 12, 16, 30, 3, 24]
SHAPES = [(48, 64)] * 6 + [(64, 40)] * 6


def take(ds, n):
  it = ds.as_numpy_iterator()
  return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  lines = []
  for i, (n, (h, w)) in enumerate(zip(FRAMES, SHAPES)):
    frames = np.repeat((8 * np.arange(n, dtype=np.uint8))[:, None, None, None], 3, -1)
    write_video(root / f"v{i}.mp4", np.broadcast_to(frames, (n, h, w, 3)).copy())
    lines.append(f"v{i}.mp4 {i}\n")
  (root / "list.txt").write_text("".join(lines))
  cfg = VideoConfig(name="indexed", annotations={"train": str(root / "list.txt")},
                    video_roots={"train": str(root)}, class_names=[f"c{i}" for i in range(12)],
                    short_side=None, frame_store=True)  # the synthetic set below: no store
  return build_dataset(tmp_path_factory.mktemp("tfds"), cfg, num_workers=2)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  return data.prepare_synthetic_dataset(tmp_path_factory.mktemp("synth"), 8, 5, size=32,
                                        num_frames=12, num_workers=2)


def frame_indices(clip):
  return np.round(clip.reshape(clip.shape[0], -1).mean(-1) / 8).astype(int)


def train(builder, **kw):
  args = dict(clip_len=8, crop_size=16, per_host_batch=4, seed=3)
  return data.train_dataset(builder, "train", **{**args, **kw})


def test_train_batches_and_segment_sampling_end_to_end(indexed):
  batches = take(train(indexed), 9)
  assert batches[0]["video"].shape == (4, 8, 16, 16, 3) and batches[0]["video"].dtype == np.uint8
  assert batches[0]["label"].dtype == np.int32
  for b in batches:
    for clip, label in zip(b["video"], b["label"]):
      lo, hi = data.segment_bounds(FRAMES[label], 8)
      got = frame_indices(clip)
      assert ((got >= lo) & (got <= hi)).all(), (label, got, lo, hi)


def test_epochs_visit_every_video_once_and_reshuffle(indexed):
  labels = [b["label"] for b in take(train(indexed), 9)]
  epochs = np.concatenate(labels).reshape(3, 12)
  for epoch in epochs:
    assert sorted(epoch) == list(range(12))
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("hosts", [2, 5])
def test_hosts_read_disjoint_parts_of_each_epoch(indexed, hosts):
  per_epoch = 12 // hosts
  seen = []
  for p in range(hosts):
    ds = train(indexed, per_host_batch=per_epoch, process_index=p, process_count=hosts)
    seen.append([b["label"].tolist() for b in take(ds, 2)])
  for epoch in range(2):
    videos = [v for host in seen for v in host[epoch]]
    assert len(videos) == len(set(videos)) == hosts * per_epoch


def test_hosts_draw_their_own_augmentation():
  """The stream position seeds a clip's frame offsets, crop, flip and RandAugment: hosts must
  not share positions (they did: every global batch repeated each draw once per host), and one
  host's positions are unchanged (0, 1, 2, ...)."""
  from uniformerv2_jax.data.pipeline import _train_indices
  positions = [[int(p) for p, _ in _train_indices(12, 3, host, 3, 0).take(8)] for host in range(3)]
  assert len({p for host in positions for p in host}) == 24
  assert [int(p) for p, _ in _train_indices(12, 3, 0, 1, 0).take(20)] == list(range(20))


def test_deterministic_for_a_seed(indexed):
  a, b, c = (take(train(indexed, seed=s), 4) for s in (3, 3, 4))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["video"], y["video"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any(not np.array_equal(x["label"], z["label"]) for x, z in zip(a, c))


@pytest.mark.parametrize("num_samples", [1, 2])
def test_resume_from_step_gives_the_same_batches(indexed, num_samples):
  kw = dict(num_samples=num_samples, per_host_batch=4)
  full = take(train(indexed, **kw), 9)
  for start in (2, 7):  # mid-epoch and past an epoch boundary
    resumed = take(train(indexed, start_step=start, **kw), 2)
    for x, y in zip(full[start:start + 2], resumed):
      np.testing.assert_array_equal(x["video"], y["video"])
      np.testing.assert_array_equal(x["label"], y["label"])


def test_repeated_augmentation(indexed, synthetic):
  """num_samples=2: each video twice in a row, the same frames, independently cropped."""
  batches = take(train(indexed, num_samples=2, per_host_batch=4), 6)
  labels = np.concatenate([b["label"] for b in batches])
  assert (labels[0::2] == labels[1::2]).all()
  assert sorted(labels[0::2]) == list(range(12))
  videos = np.concatenate([b["video"] for b in batches])
  for k in range(0, len(labels), 2):  # upstream AUG.NUM_SAMPLE: frames decoded once
    np.testing.assert_array_equal(frame_indices(videos[k]), frame_indices(videos[k + 1]))
# frames that differ within themselves show the crops are drawn per sample
  videos = take(train(synthetic, num_samples=2, per_host_batch=4), 1)[0]["video"]
  assert not np.array_equal(videos[0], videos[1]) and not np.array_equal(videos[2], videos[3])
  with pytest.raises(ValueError, match="multiple of num_samples"):
    train(indexed, num_samples=3, per_host_batch=4)


def reference_views(builder, index, clip_len, crop_size, num_clips, num_crops, spatial):
  """Hand pipeline: stored JPEGs -> uniform_sample(test) -> numpy eval_views per clip."""
  source = builder.as_data_source(
      "validation", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  f = tf.train.Example.FromString(source[index]).features.feature
  jpegs = list(f["video"].bytes_list.value)
  idx = data.uniform_sample(len(jpegs), clip_len, num_clips, test_mode=True)
  frames = np.stack([tf.io.decode_jpeg(jpegs[i], channels=3, dct_method="INTEGER_ACCURATE")
                     .numpy() for i in idx])
  clips = frames.reshape(num_clips, clip_len, *frames.shape[1:])
  views = np.stack([data.eval_views(c, crop_size, num_crops, spatial=spatial) for c in clips])
  return views.reshape(-1, *views.shape[2:]), int(f["label"].int64_list.value[0])


@pytest.mark.parametrize("spatial,num_crops", [("mmaction2", 3), ("original", 3),
                                               ("mmaction2", 1)])
def test_eval_views_match_the_hand_protocol(synthetic, spatial, num_crops):
  builder = synthetic.builder
  ds = data.eval_dataset(builder, "validation", clip_len=4, crop_size=24, num_clips=2,
                         num_crops=num_crops, per_host_batch=4, spatial=spatial)
  rows = collections.defaultdict(dict)
  for b in ds.as_numpy_iterator():
    for k in np.flatnonzero(b["mask"]):
      rows[int(b["video_id"][k])][int(b["view"][k])] = (b["video"][k], int(b["label"][k]))
  assert sorted(rows) == list(range(5))
  for vid, views in rows.items():
    ref, label = reference_views(builder, vid, 4, 24, 2, num_crops, spatial)
    assert sorted(views) == list(range(2 * num_crops))
    for v, (clip, got_label) in views.items():
      assert got_label == label
      assert np.abs(clip.astype(int) - ref[v]).max() <= 1


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_eval_padding_and_exactly_once_across_hosts(indexed, hosts):
  views, seen, counts = 6, collections.Counter(), []
  for p in range(hosts):
    ds = data.eval_dataset(indexed, "train", clip_len=4, crop_size=16, num_clips=2,
                           num_crops=3, per_host_batch=5, process_index=p,
                           process_count=hosts)
    batches = list(ds.as_numpy_iterator())
    counts.append(len(batches))
    assert len(ds) == len(batches) == data.eval_batches(12, views, 5, hosts)
    for b in batches:
      real = b["mask"] == 1
      assert (b["video_id"][~real] == -1).all() and (b["video"][~real] == 0).all()
      for vid, view, label, clip in zip(b["video_id"][real], b["view"][real],
                                        b["label"][real], b["video"][real]):
        assert label == vid_label(indexed, vid)
        clip_index = view // 3
        expect = data.uniform_sample(FRAMES[label], 4, 2, test_mode=True)
        assert frame_indices(clip).tolist() == expect[4 * clip_index:4 * clip_index + 4].tolist()
        seen[(int(vid), int(view))] += 1
  assert len(set(counts)) == 1
  assert set(seen) == {(v, w) for v in range(12) for w in range(views)}
  assert set(seen.values()) == {1}


def vid_label(builder, vid, _cache={}):
  key = builder.data_dir
  if key not in _cache:
    src = builder.as_data_source(
        "train", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    _cache[key] = [int(tf.train.Example.FromString(src[i]).features.feature["label"]
                       .int64_list.value[0]) for i in range(len(src))]
  return _cache[key][vid]


def test_flip_follows_the_dataset_unless_asked(synthetic, recwarn):
  from uniformerv2_jax.data.pipeline import _flip_setting
  assert synthetic.builder.info.metadata["flip"] is False
  assert _flip_setting(synthetic.builder, None) is False
  assert _flip_setting(synthetic.builder, False) is False
  with pytest.warns(UserWarning, match="labels depend on direction"):
    assert _flip_setting(synthetic.builder, True) is True


def test_load_builder_from_folder_and_errors(synthetic, tmp_path):
  again = data.load_builder(synthetic.builder.data_dir)
  assert again.info.splits["train"].num_examples == 8
  with pytest.raises(ValueError, match="no built dataset there"):
    data.load_builder(tmp_path)
  with pytest.raises(ValueError, match="no split 'test'"):
    data.train_dataset(synthetic.builder, "test", clip_len=4, crop_size=16, per_host_batch=2)


def test_randaugment_of_whole_frames_before_the_crop(synthetic):
  """randaugment=True: augmented clips of the same videos and labels as without it, and
  resuming gives the same batches (the op-by-op order is tested in test_data_tf_augment)."""
  kw = dict(clip_len=4, randaugment=True, randaugment_magnitude=9)
  plain, augmented = (take(train(synthetic.builder, **dict(kw, randaugment=ra)), 2)
                      for ra in (False, True))
  assert augmented[0]["video"].shape == plain[0]["video"].shape
  np.testing.assert_array_equal(augmented[1]["label"], plain[1]["label"])
  assert any(not np.array_equal(a["video"], p["video"]) for a, p in zip(augmented, plain))
  full = take(train(synthetic.builder, **kw), 3)
  resumed = take(train(synthetic.builder, start_step=2, **kw), 1)
  np.testing.assert_array_equal(full[2]["video"], resumed[0]["video"])

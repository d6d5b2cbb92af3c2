"""Video files with PyAV: decoding (all frames or chosen ones), build-time JPEG frames, writing.

Every failure to read a video raises :class:`VideoDecodeError`, whose message names the file and
says what went wrong (missing, unreadable/corrupt, no video stream, no frames).
This module imports no TensorFlow or JAX, so build worker processes stay light.
"""
from __future__ import annotations

import io
import math
import os
from fractions import Fraction
from typing import Iterator, Sequence

import av
import numpy as np

__all__ = ["VideoDecodeError", "decode_video", "iter_frames", "jpeg_frames", "jpeg_frames_task",
           "write_video"]


class VideoDecodeError(RuntimeError):
  """A video cannot be used; ``path`` names it and ``reason`` says why."""

  def __init__(self, path, reason: str):
    self.path, self.reason = os.fspath(path), reason
    super().__init__(f"{self.path}: {reason}")


def _open(path):
  path = os.fspath(path)
  if os.path.isdir(path):
    raise VideoDecodeError(path, "a folder, not a video file")
  if not os.path.isfile(path):
    raise VideoDecodeError(path, "file not found")
  if os.path.getsize(path) == 0:
    raise VideoDecodeError(path, "file is empty (0 bytes); re-download or remove it")
  try:
    container = av.open(path)
  except (av.FFmpegError, OSError, ValueError) as e:
    raise VideoDecodeError(path, f"cannot be opened as a video (corrupt or unsupported): {e}")
  if not container.streams.video:
    container.close()
    raise VideoDecodeError(path, "has no video stream")
  fmt = container.format.name  # FFmpeg reads still images as one-frame "videos"
  if fmt == "image2" or fmt.endswith("_pipe"):
    container.close()
    raise VideoDecodeError(path, f"an image ({fmt.removesuffix('_pipe')}), not a video")
  return container


FPS_TOLERANCE = 1.01  # a source up to 1% above the requested rate keeps every frame


def _source_fps(stream) -> float | None:
  rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  return float(rate) if rate else None


def _check_complete(path, stream, decoded: int, last_time: float | None) -> None:
  """A file that decodes to many fewer frames than its index lists (a download cut short)
  is corrupt: FFmpeg's frame-threaded decoders end such a stream quietly, and the upstream's
  reader, which samples from the listed count, would fail on it. A clip cut by stream copy
  (an edit list) also indexes frames the decoder drops, but its duration ends where the
  decoded frames end. A frame or two fewer is normal; webm lists no count (0)."""
  listed, rate = stream.frames, _source_fps(stream)
  if not listed or listed - decoded <= max(2, 0.02 * listed):
    return
  if stream.duration and stream.time_base and rate and last_time is not None:
    end = float(((stream.start_time or 0) + stream.duration) * stream.time_base)
    if end - last_time <= max(2 / rate, 0.02 * end):
      return
  raise VideoDecodeError(path, f"truncated or corrupt: decoded {decoded} of the {listed} "
                               "frames its index lists; re-download or remove it")


def iter_frames(path, *, fps: float | None = None, max_fps: float | None = None,
                threads: int = 0) -> Iterator[tuple[av.VideoFrame, float]]:
  """Yield ``(frame, output_fps)`` in display order, dropping frames to reach the frame rate.

  ``fps=None`` keeps the source rate, capped at ``max_fps``; a requested rate above the source
  rate keeps every frame (frames are never duplicated). ``threads=0`` lets FFmpeg choose.
  """
  container = _open(path)
  try:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    src = _source_fps(stream)
    target = fps if fps else src
    if target and max_fps:
      target = min(target, max_fps)
    # Within 1% of the source rate every frame is kept: a "30 fps" file reporting 30.03
    # would otherwise lose one frame in 300 and shift every later one.
    keep_all = not src or not target or target >= src / FPS_TOLERANCE
    out_fps = src if keep_all else target
    t0, last_slot, count, last_time = None, -1, 0, None
    for frame in container.decode(stream):
      count += 1
      last_time = frame.time if frame.time is not None else last_time
      if not keep_all:
        t = frame.time if frame.time is not None else (count - 1) / src
        t0 = t if t0 is None else t0
        slot = math.floor((t - t0) * target + 1e-6)
        if slot <= last_slot:
          continue
        last_slot = slot
      yield frame, float(out_fps or 0.0)
    _check_complete(path, stream, count, last_time)
  except av.FFmpegError as e:
    raise VideoDecodeError(path, f"decoding failed (corrupt stream): {e}") from e
  finally:
    container.close()


def decode_video(path, indices: Sequence[int] | None = None, *, fps: float | None = None,
                 max_fps: float | None = None) -> tuple[np.ndarray, float]:
  """Decode a video to RGB ``(n, H, W, 3)`` uint8 and its frame rate.

  With ``indices``, returns only those frames, in the given order (repeats allowed) and stops
  decoding after the last one needed. ``fps``/``max_fps`` resample as :func:`iter_frames`.
  """
  want = None if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
  if want is not None and want.size and want.min() < 0:
    raise ValueError(f"{path}: negative frame index in {want.tolist()}")
  needed = None if want is None else set(want.tolist())
  last = -1 if want is None or not want.size else int(want.max())
  frames, rate, count = {}, 0.0, 0
  for i, (frame, rate) in enumerate(iter_frames(path, fps=fps, max_fps=max_fps)):
    count = i + 1
    if needed is None or i in needed:
      frames[i] = frame.to_ndarray(format="rgb24")
    if needed is not None and i >= last:
      break
  if not frames and (want is None or want.size):
    raise VideoDecodeError(path, "contains no decodable frames")
  if want is None:
    return np.stack([frames[i] for i in range(len(frames))]), rate
  missing = sorted(needed - frames.keys())
  if missing:
    raise VideoDecodeError(path, f"has only {count} frames; "
                                 f"frame {missing[0]} was requested")
  if not want.size:
    return np.zeros((0, 0, 0, 3), np.uint8), rate
  return np.stack([frames[i] for i in want.tolist()]), rate


def _scaled_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
  """(height, width) with the short side brought down to `short_side`; never enlarged (the
  upstream resizes the source's own pixels: a 240p SSv2 video goes 240 -> 224 once)."""
  short, long_ = min(height, width), max(height, width)
  if not short_side or short <= short_side:
    return height, width
  new_long = max(int(long_ * short_side / short + 0.5), short_side)
  return (short_side, new_long) if height <= width else (new_long, short_side)


def jpeg_frames(path, *, short_side: int | None = 320, fps: float | None = None,
                max_fps: float | None = 30.0, quality: int = 85, threads: int = 1):
  """Build-time conversion: decode, bring the short side down, encode each frame as JPEG.

  Frames go to RGB as the upstreams' decoder (decord: FFmpeg's swscale to rgb24) gives them,
  then through libjpeg (Pillow, ``quality`` 1-95, 4:2:0 chroma), whose exact RGB <-> YCbCr
  round trip adds no colour shift. Returns ``(list of JPEG bytes, output fps, (height,
  width))``. Raises :class:`VideoDecodeError`.
  """
  from PIL import Image
  jpegs, size, rate = [], None, 0.0
  for frame, rate in iter_frames(path, fps=fps, max_fps=max_fps, threads=threads):
    if size is None:
      size = _scaled_size(frame.height, frame.width, short_side)
    if size != (frame.height, frame.width):
      frame = frame.reformat(width=size[1], height=size[0], interpolation="BICUBIC")
    out = io.BytesIO()
    Image.fromarray(frame.to_ndarray(format="rgb24")).save(out, "JPEG", quality=quality)
    jpegs.append(out.getvalue())
  if not jpegs:
    raise VideoDecodeError(path, "contains no decodable frames")
  return jpegs, rate, size


def jpeg_frames_task(task):
  """Build worker: ``(key, path, name, label, opts)`` -> ``(key, name, label, result)``.

  ``result`` is ``(jpegs, fps)`` or, for a video that cannot be used, the reason (a string).
  """
  key, path, name, label, opts = task
  try:
    jpegs, fps, _ = jpeg_frames(path, **opts)
    return key, name, label, (jpegs, fps)
  except VideoDecodeError as e:
    return key, name, label, e.reason
  except Exception as e:  # noqa: BLE001 -- an odd file must never stop a build
    return key, name, label, f"unexpected decoding error: {type(e).__name__}: {e}"


def write_video(path, frames: np.ndarray, fps: float = 25, codec: str = "libx264",
                pix_fmt: str = "yuv420p", options: dict | None = None) -> None:
  """Write RGB uint8 frames (n, H, W, 3) to a video file (H.264 by default)."""
  frames = np.asarray(frames, dtype=np.uint8)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with av.open(os.fspath(path), mode="w") as container:
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
    stream.height, stream.width = frames.shape[1], frames.shape[2]
    stream.pix_fmt = pix_fmt
    stream.options = dict(options or {})
    for image in frames:
      frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
      container.mux(stream.encode(frame))
    container.mux(stream.encode())

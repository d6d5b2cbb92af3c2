"""RandAugment in TensorFlow, for the host pipeline: on the whole decoded frames, before the
RandomResizedCrop, in the upstream's order (the original repository runs timm's RandAugment on
the full frames, mmaction2 after a short-side resize; both before the crop).

The ops, magnitudes and arithmetic are those of ``augment.py`` (the accelerator version, which
documents them against timm/PIL); the tests compare the two op by op. Each layer runs only the
op it drew (``tf.switch_case``), in float32 arithmetic on 0-255 frames (T, H, W, 3).
"""
from __future__ import annotations

import math

import tensorflow as tf

from .augment import FILL, OPS

__all__ = ["randaugment", "apply_op", "draw_policy"]


# ---- value maps -------------------------------------------------------------------------

def _select(cond, a, b):
  """``tf.where(cond, a, b)`` for integer-valued float32 images, as arithmetic: exact here,
  and several times faster than TensorFlow's select kernel on the CPU."""
  return b + tf.cast(cond, tf.float32) * (a - b)


def _channel_index(frames):
  """int32 (T, H, W, 3): (frame * 3 + channel) * 256 + value, a row of a per-frame-and-channel
  table (no transposes: TensorFlow's are slow on the CPU)."""
  t = tf.shape(frames)[0]
  rows = tf.reshape(tf.range(t) * 3, [-1, 1, 1, 1]) + tf.range(3)
  return rows * 256 + tf.cast(frames, tf.int32)


def _autocontrast(frames):
  """Per frame and channel, lo..hi -> 0..255: floor((x - lo) * 255 / (hi - lo)), exact in
  float32 (the numerator is an integer below 2**16, the divisor at most 255)."""
  lo = tf.reduce_min(frames, axis=[1, 2], keepdims=True)
  hi = tf.reduce_max(frames, axis=[1, 2], keepdims=True)
  out = tf.floor((frames - lo) * 255 / tf.maximum(hi - lo, 1))
  return _select(hi > lo, out, frames)


def _equalize_lut(frames, mag, sign):
  """PIL's ``ImageOps.equalize`` table of each frame and channel, flat (T * 768,): a level,
  since TensorFlow's bincount has no XLA kernel."""
  t = tf.shape(frames)[0]
  hist = tf.reshape(tf.math.bincount(tf.reshape(_channel_index(frames), [-1]),
                                     minlength=t * 768, maxlength=t * 768), [t * 3, 256])
  top = 255 - tf.argmax(tf.cast(hist[:, ::-1] > 0, tf.int32), axis=1, output_type=tf.int32)
  last = tf.gather(hist, top, batch_dims=1)[:, None]
  step = (tf.reduce_sum(hist, axis=1, keepdims=True) - last) // 255
  lut = (step // 2 + tf.cumsum(hist, axis=1) - hist) // tf.maximum(step, 1)
  return (tf.reshape(tf.where(step > 0, tf.minimum(lut, 255), tf.range(256)[None, :]), [-1]),)


def _apply_lut(frames, lut):
  return tf.cast(tf.gather(lut, _channel_index(frames)), tf.float32)


def _invert(frames):
  return 255.0 - frames


def _posterize(frames, scale):
  return tf.floor(frames / scale) * scale


def _solarize(frames, threshold):
  return _select(frames >= threshold, 255.0 - frames, frames)


def _solarize_add(frames, add):
  return _select(frames < 128, tf.minimum(frames + add, 255.0), frames)


# ---- ImageEnhance blends ----------------------------------------------------------------

def _gray(frames):
  r, g, b = frames[..., 0], frames[..., 1], frames[..., 2]
  return tf.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)[..., None]


def _smooth(frames, for_xla=False):
  """PIL ImageFilter.SMOOTH (3x3 [1 1 1; 1 5 1; 1 1 1]/13), border pixels unchanged. The 3x3
  sum of integers is exact in float32 in any order: as kernels, two 3-tap sums of slices (far
  faster than a convolution); for XLA, nine shifted views of the padded frames, all of the
  frame's shape, which it fuses into one loop (3x faster than its form of the slices)."""
  h, w = tf.shape(frames)[1], tf.shape(frames)[2]
  if for_xla:
    padded = tf.pad(frames, [[0, 0], [1, 1], [1, 1], [0, 0]])
    total = 4 * frames
    for i in range(3):
      for j in range(3):
        total = total + padded[:, i:i + h, j:j + w]
    inner = tf.round(total / 13)
  else:
    rows = frames[:, :-2] + frames[:, 1:-1] + frames[:, 2:]
    total = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:] + 4 * frames[:, 1:-1, 1:-1]
    inner = tf.pad(tf.round(total / 13), [[0, 0], [1, 1], [1, 1], [0, 0]])
  r, c = tf.range(h)[:, None], tf.range(w)[None, :]
  border = (r == 0) | (r == h - 1) | (c == 0) | (c == w - 1)
  return _select(border[None, :, :, None], frames, inner)


def _blend_table(factor):
  """Row d, column x: PIL's blend of value x towards the degenerate value d at ``factor``,
  clip(floor(d + factor * (x - d))) in float32, product and sum each rounded; flat (65536,)
  uint8 (a quarter of the bytes to look up: Color ran 2x faster).
  A level, computed by TensorFlow kernels: compiled, XLA would skip the product's rounding
  (an FMA, or excess precision), and about one draw in a thousand would move a pixel by 1."""
  d = tf.range(256, dtype=tf.float32)[:, None]
  x = tf.range(256, dtype=tf.float32)[None, :]
  return tf.cast(tf.reshape(tf.clip_by_value(tf.floor(d + factor * (x - d)), 0, 255), [-1]),
                 tf.uint8)


def _blend(degenerate_fn, degenerate_for_xla=None):
  """ImageEnhance's blend towards the degenerate image, (as kernels, for XLA), equal value for
  value: the arithmetic, and a lookup in ``_blend_table``."""
  def kernels(frames, factor, table, *level):
    degenerate = degenerate_fn(frames, *level)
    return tf.clip_by_value(tf.floor(degenerate + factor * (frames - degenerate)), 0, 255)

  def lookup(frames, factor, table, *level):
    degenerate = (degenerate_for_xla or degenerate_fn)(frames, *level)
    index = tf.cast(degenerate, tf.int32) * 256 + tf.cast(frames, tf.int32)
    return tf.cast(tf.gather(table, index), tf.float32)
  return kernels, lookup


def _contrast_mean(frames):
  """Each frame's grey mean, rounded (T, 1, 1, 1)."""
  mean = tf.reduce_mean(tf.cast(_gray(tf.cast(frames, tf.float32)), tf.float64),
                        axis=[1, 2, 3], keepdims=True)
  return tf.cast(tf.floor(mean + 0.5), tf.float32)


# ---- geometric ops ----------------------------------------------------------------------

def _warp_level(params_fn):
  """The level of an affine warp: TensorFlow's projective transform (8,) from PIL's
  ``transform(AFFINE)`` coefficients, and its rounded products a*x, b*y, d*x, e*y over the
  frame's columns x and rows y, which ``_warp_xla`` adds up."""
  def level(frames, mag, sign):
    h, w = tf.shape(frames)[1], tf.shape(frames)[2]
    a, b, c, d, e, f = (tf.cast(v, tf.float32) for v in params_fn(
        mag, sign, tf.cast(h, tf.float32), tf.cast(w, tf.float32)))
    # PIL's coordinates put pixel centres at index + 0.5; TensorFlow's at the index
    transform = tf.stack([a, b, c + (a + b - 1) / 2, d, e, f + (d + e - 1) / 2, 0.0, 0.0])
    x, y = tf.range(w, dtype=tf.float32), tf.range(h, dtype=tf.float32)
    return transform, transform[0] * x, transform[1] * y, transform[3] * x, transform[4] * y
  return level


def _warp(frames, transform, *_):
  """Bilinear warp, fill 128 outside: each of the 4 taps outside the frame reads the fill."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=frames, transforms=transform[None], output_shape=tf.shape(frames)[1:3],
      fill_value=FILL, interpolation="BILINEAR", fill_mode="CONSTANT")
  return tf.clip_by_value(tf.round(out), 0, 255)


# ``_warp`` for XLA, the same bits: TensorFlow's kernel in its float32 order (source coordinate
# (a*x + b*y) + c; weights hi - x and x - lo; value_lo = w0 * tap + w1 * tap, and the same
# along y), each product rounded. XLA's CPU compiler would fuse a product into the sum after it
# (an FMA: one rounding), so the products are integer ones: a weight w = m * 2**k with an
# integer mantissa m, round(w * v) = float32(m * v's mantissa) * 2**(k + v's exponent), one
# correctly rounded conversion and an exact scaling.

def _mantissa(u):
  """(m, k) with u = m * 2**k, m < 2**24 an integer: for u >= 0, normal or zero."""
  bits = tf.bitcast(u, tf.int32)
  field = tf.bitwise.right_shift(bits, 23)
  m = tf.bitwise.bitwise_and(bits, 0x7FFFFF)
  return tf.where(field > 0, tf.bitwise.bitwise_or(m, 0x800000), m), tf.maximum(field, 1) - 150


def _pow2(k):
  """2**k in float32, for k >= -126 (smaller k give 2**-126: only products below 2**-78,
  which the final rounding removes, come out too large)."""
  return tf.bitcast(tf.bitwise.left_shift(tf.maximum(k, -126) + 127, 23), tf.float32)


def _times_pixel(weight, pixel):
  """round(w * pixel) for a weight (m, k) and uint8 pixels: m * pixel < 2**32."""
  m, k = weight
  return tf.cast(tf.cast(m, tf.uint32) * tf.cast(pixel, tf.uint32), tf.float32) * _pow2(k)


def _times(weight, value):
  """round(w * value) for a weight (m, k) and float32 values >= 0."""
  (m, k), (mv, kv) = weight, _mantissa(value)
  return tf.cast(tf.cast(m, tf.int64) * tf.cast(mv, tf.int64), tf.float32) * _pow2(k + kv)


def _weights(coordinate):
  """Source coordinates (H, W) -> the taps lo, hi = lo + 1 (H, W) and their weights
  hi - coordinate, coordinate - lo as (m, k), each (1, H, W, 1)."""
  lo = tf.floor(coordinate)
  hi = lo + 1
  w_lo, w_hi = (tuple(v[None, :, :, None] for v in _mantissa(w))
                for w in (hi - coordinate, coordinate - lo))
  return lo, hi, w_lo, w_hi


def _taps(frames, rows, cols):
  """uint8 frames at integer-valued source rows and columns (H, W); the fill outside."""
  t, h, w = tf.shape(frames)[0], tf.shape(frames)[1], tf.shape(frames)[2]
  r, c = tf.cast(rows, tf.int32), tf.cast(cols, tf.int32)
  inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
  index = tf.clip_by_value(r, 0, h - 1) * w + tf.clip_by_value(c, 0, w - 1)
  values = tf.gather(tf.reshape(tf.cast(frames, tf.uint8), [t, -1, 3]), index, axis=1)
  return tf.where(inside[None, :, :, None], values, tf.constant(int(FILL), tf.uint8))


def _interpolate(frames, w0, rows0, cols0, w1, rows1, cols1):
  """w0 * frames[rows0, cols0] + w1 * frames[rows1, cols1], each product rounded."""
  return (_times_pixel(w0, _taps(frames, rows0, cols0))
          + _times_pixel(w1, _taps(frames, rows1, cols1)))


def _warp_xla(along):
  """``_warp`` for XLA: along "xy" (Rotate), or along "x" or "y" only, for warps that keep
  each row (ShearX, TranslateX: e = 1, d = 0 and a zero offset, so TensorFlow's source row is
  the row itself, with weights 1 and 0) or each column (ShearY, TranslateY)."""
  def pixels(frames, transform, ax, by, dx, ey):
    h, w = tf.shape(frames)[1], tf.shape(frames)[2]
    x = (ax[None, :] + by[:, None]) + transform[2]  # TensorFlow's source coordinates
    y = (dx[None, :] + ey[:, None]) + transform[5]
    if along == "x":
      x0, x1, w0, w1 = _weights(x)
      rows = tf.broadcast_to(tf.range(h)[:, None], [h, w])
      out = _interpolate(frames, w0, rows, x0, w1, rows, x1)
    elif along == "y":
      y0, y1, w0, w1 = _weights(y)
      cols = tf.broadcast_to(tf.range(w)[None, :], [h, w])
      out = _interpolate(frames, w0, y0, cols, w1, y1, cols)
    else:
      (x0, x1, u0, u1), (y0, y1, v0, v1) = _weights(x), _weights(y)
      lo, hi = (_interpolate(frames, u0, r, x0, u1, r, x1) for r in (y0, y1))
      out = _times(v0, lo) + _times(v1, hi)
    return tf.clip_by_value(tf.round(out), 0, 255)
  return pixels


def _rotate(mag, sign, h, w):
  angle = -math.pi / 180 * sign * mag / 10 * 30
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = w / 2, h / 2
  return cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy


def _shear_x(mag, sign, h, w):
  return 1.0, sign * mag / 10 * 0.3, 0.0, 0.0, 1.0, 0.0


def _shear_y(mag, sign, h, w):
  return 1.0, 0.0, 0.0, sign * mag / 10 * 0.3, 1.0, 0.0


def _translate_x(mag, sign, h, w):
  return 1.0, 0.0, sign * mag / 10 * 0.45 * w, 0.0, 1.0, 0.0


def _translate_y(mag, sign, h, w):
  return 1.0, 0.0, 0.0, 0.0, 1.0, sign * mag / 10 * 0.45 * h


# ---- the ops: pixels(frames, *level(frames, mag, sign)) -----------------------------------
# `level` turns the magnitude into the op's parameters (and takes Contrast's frame means,
# Equalize's tables and the warps' coordinate products from the uint8 frames); it always runs
# as TensorFlow kernels, so that XLA, compiling `pixels`, cannot fold or reassociate that
# arithmetic (it rewrites x / 10 * 0.9 as x * 0.09: another float32). What XLA compiles
# rounds as the kernels do: integer arithmetic, table lookups, divisions whose rounding cannot
# cross an integer or a half, and the warps' sums in TensorFlow's order with no float product
# left to fuse into them; so both engines give the same bits (for magnitudes as drawn, in
# [0, 10]; TensorFlow's x86 build, whose projective transform does not fuse either).

def _none(frames, mag, sign):
  return ()


def _xla(pixels):
  """(as kernels, for XLA): the same function."""
  return pixels, pixels


def _factor(frames, mag, sign):
  factor = tf.maximum(0.1, 1.0 + sign * mag / 10 * 0.9)
  return factor, _blend_table(factor)


_BRANCHES = {  # name: (level, (pixels as TensorFlow kernels, pixels for XLA))
    "AutoContrast": (_none, _xla(_autocontrast)),
    "Equalize": (_equalize_lut, _xla(_apply_lut)),
    "Invert": (_none, _xla(_invert)),
    "Rotate": (_warp_level(_rotate), (_warp, _warp_xla("xy"))),
    "PosterizeIncreasing": (lambda frames, mag, sign: (2.0 ** (8.0 - (4.0 - tf.floor(
        mag / 10 * 4))),), _xla(_posterize)),
    "SolarizeIncreasing": (lambda frames, mag, sign: (256 - tf.floor(mag / 10 * 256),),
                           _xla(_solarize)),
    "SolarizeAdd": (lambda frames, mag, sign: (tf.minimum(128.0, tf.floor(mag / 10 * 110)),),
                    _xla(_solarize_add)),
    "ColorIncreasing": (_factor, _blend(lambda x: tf.broadcast_to(_gray(x), tf.shape(x)))),
    "ContrastIncreasing": (lambda frames, mag, sign: (*_factor(frames, mag, sign),
                                                      _contrast_mean(frames)),
                           _blend(lambda x, mean: tf.broadcast_to(mean, tf.shape(x)))),
    "BrightnessIncreasing": (_factor, _blend(tf.zeros_like)),
    "SharpnessIncreasing": (_factor, _blend(_smooth, lambda x: _smooth(x, for_xla=True))),
    "ShearX": (_warp_level(_shear_x), (_warp, _warp_xla("x"))),
    "ShearY": (_warp_level(_shear_y), (_warp, _warp_xla("y"))),
    "TranslateXRel": (_warp_level(_translate_x), (_warp, _warp_xla("x"))),
    "TranslateYRel": (_warp_level(_translate_y), (_warp, _warp_xla("y"))),
}
assert tuple(_BRANCHES) == OPS


def _on_uint8(pixels):
  """``pixels`` taking and giving uint8 frames: every op's values are integers in 0..255, so
  the layers pass a quarter of the bytes and the casts fuse into the compiled ops."""
  def op(frames, *level):
    return tf.cast(pixels(tf.cast(frames, tf.float32), *level), tf.uint8)
  return op


# compiled=True: each op's pixel arithmetic compiled by XLA, its element-wise passes fused into
# one, where TensorFlow's CPU kernels make a pass over the frames each, and the warps as
# gathers (benchmarks/randaugment_ops.py). XLA compiles them once per frame size (about 2 s
# of CPU and 5 MB kept for the fifteen).
_LEVELS = [level for level, _ in _BRANCHES.values()]
_KERNEL_PIXELS = [_on_uint8(kernels) for _, (kernels, _) in _BRANCHES.values()]
_COMPILED_PIXELS = [tf.function(_on_uint8(xla), jit_compile=True, reduce_retracing=True)
                    for _, (_, xla) in _BRANCHES.values()]


def _apply_uint8(frames, op, mag, sign, compiled: bool):
  def branch(level, pixels):
    return lambda: pixels(frames, *level(frames, mag, sign))
  ops = _COMPILED_PIXELS if compiled else _KERNEL_PIXELS
  return tf.switch_case(tf.cast(op, tf.int32), [branch(*b) for b in zip(_LEVELS, ops)])


def apply_op(frames, op, magnitude, sign=1.0, compiled: bool = True):
  """Op number ``op`` (index in ``augment.OPS``) on 0-255 integer-valued frames (T, H, W, 3);
  float32 result."""
  return tf.cast(_apply_uint8(tf.cast(frames, tf.uint8), op, tf.cast(magnitude, tf.float32),
                              tf.cast(sign, tf.float32), compiled), tf.float32)


def draw_policy(seed, num_layers: int = 4, magnitude: float = 7, magnitude_std: float = 0.5,
                prob: float = 0.5):
  """One clip's (op index, magnitude, sign, applied?) per layer: the draws of
  ``augment.draw_policy`` from a stateless seed."""
  s = [tf.random.experimental.stateless_fold_in(seed, k) for k in range(4)]
  ops = tf.random.stateless_uniform([num_layers], s[0], 0, len(OPS), dtype=tf.int32)
  mags = tf.clip_by_value(magnitude + magnitude_std * tf.random.stateless_normal(
      [num_layers], s[1]), 0.0, 10.0)
  signs = tf.where(tf.random.stateless_uniform([num_layers], s[2]) < 0.5, -1.0, 1.0)
  applied = tf.random.stateless_uniform([num_layers], s[3]) < prob
  return ops, mags, signs, applied


def randaugment(seed, frames, magnitude: float = 7, num_layers: int = 4,
                magnitude_std: float = 0.5, prob: float = 0.5, compiled: bool = True):
  """timm's ``rand-m7-n4-mstd0.5-inc1`` on one clip (T, H, W, 3) uint8: ``num_layers`` ops
  drawn with replacement, each applied with probability ``prob`` at magnitude
  ~ N(magnitude, magnitude_std) clipped to [0, 10] and a random sign; the same for every
  frame. ``seed``: stateless seed, int64 (2,). ``compiled``: the pixel arithmetic through XLA
  (same result)."""
  ops, mags, signs, applied = draw_policy(seed, num_layers, magnitude, magnitude_std, prob)
  out = tf.cast(frames, tf.uint8)
  for i in range(num_layers):
    out = tf.cond(applied[i],
                  lambda i=i, x=out: _apply_uint8(x, ops[i], mags[i], signs[i], compiled),
                  lambda x=out: x)
  return out

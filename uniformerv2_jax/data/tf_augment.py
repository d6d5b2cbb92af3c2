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


def _autocontrast(frames, mag, sign):
    """Per frame and channel, lo..hi -> 0..255: floor((x - lo) * 255 / (hi - lo)), exact in
    float32 (the numerator is an integer below 2**16, the divisor at most 255)."""
    lo = tf.reduce_min(frames, axis=[1, 2], keepdims=True)
    hi = tf.reduce_max(frames, axis=[1, 2], keepdims=True)
    out = tf.floor((frames - lo) * 255 / tf.maximum(hi - lo, 1))
    return _select(hi > lo, out, frames)


def _equalize(frames, mag, sign):
    t = tf.shape(frames)[0]
    index = _channel_index(frames)
    hist = tf.reshape(tf.math.bincount(tf.reshape(index, [-1]), minlength=t * 768,
                                       maxlength=t * 768), [t * 3, 256])
    top = 255 - tf.argmax(tf.cast(hist[:, ::-1] > 0, tf.int32), axis=1, output_type=tf.int32)
    last = tf.gather(hist, top, batch_dims=1)[:, None]
    step = (tf.reduce_sum(hist, axis=1, keepdims=True) - last) // 255
    lut = (step // 2 + tf.cumsum(hist, axis=1) - hist) // tf.maximum(step, 1)
    lut = tf.where(step > 0, tf.minimum(lut, 255), tf.range(256)[None, :])
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), index), tf.float32)


def _invert(frames, mag, sign):
    return 255.0 - frames


def _posterize(frames, mag, sign):
    scale = 2.0 ** (8.0 - (4.0 - tf.floor(mag / 10 * 4)))
    return tf.floor(frames / scale) * scale


def _solarize(frames, mag, sign):
    return _select(frames >= 256 - tf.floor(mag / 10 * 256), 255.0 - frames, frames)


def _solarize_add(frames, mag, sign):
    add = tf.minimum(128.0, tf.floor(mag / 10 * 110))
    return _select(frames < 128, tf.minimum(frames + add, 255.0), frames)


# ---- ImageEnhance blends ----------------------------------------------------------------

def _gray(frames):
    r, g, b = frames[..., 0], frames[..., 1], frames[..., 2]
    return tf.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)[..., None]


def _smooth(frames):
    """PIL ImageFilter.SMOOTH (3x3 [1 1 1; 1 5 1; 1 1 1]/13), border pixels unchanged. The 3x3
    sum as two 3-tap sums of slices: exact in float32 and far faster than a convolution here."""
    rows = frames[:, :-2] + frames[:, 1:-1] + frames[:, 2:]
    total = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:] + 4 * frames[:, 1:-1, 1:-1]
    inner = tf.pad(tf.round(total / 13), [[0, 0], [1, 1], [1, 1], [0, 0]])
    h, w = tf.shape(frames)[1], tf.shape(frames)[2]
    r, c = tf.range(h)[:, None], tf.range(w)[None, :]
    border = (r == 0) | (r == h - 1) | (c == 0) | (c == w - 1)
    return _select(border[None, :, :, None], frames, inner)


def _blend(degenerate_fn):
    def op(frames, mag, sign):
        factor = tf.maximum(0.1, 1.0 + sign * mag / 10 * 0.9)
        degenerate = degenerate_fn(frames)
        return tf.clip_by_value(tf.floor(degenerate + factor * (frames - degenerate)), 0, 255)
    return op


def _contrast_mean(frames):
    mean = tf.reduce_mean(tf.cast(_gray(frames), tf.float64), axis=[1, 2, 3], keepdims=True)
    return tf.broadcast_to(tf.cast(tf.floor(mean + 0.5), tf.float32), tf.shape(frames))


# ---- geometric ops ----------------------------------------------------------------------

def _warp(params_fn):
    """Bilinear affine warp (PIL's ``transform(AFFINE)`` coefficients), fill 128 outside: each
    of the 4 taps outside the frame reads the fill, as TensorFlow's projective transform does."""
    def op(frames, mag, sign):
        h, w = tf.shape(frames)[1], tf.shape(frames)[2]
        a, b, c, d, e, f = (tf.cast(v, tf.float32) for v in params_fn(
            mag, sign, tf.cast(h, tf.float32), tf.cast(w, tf.float32)))
        # PIL's coordinates put pixel centres at index + 0.5; TensorFlow's at the index
        transform = tf.stack([a, b, c + (a + b - 1) / 2, d, e, f + (d + e - 1) / 2, 0.0, 0.0])
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=frames, transforms=transform[None], output_shape=tf.stack([h, w]),
            fill_value=FILL, interpolation="BILINEAR", fill_mode="CONSTANT")
        return tf.clip_by_value(tf.round(out), 0, 255)
    return op


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


_BRANCHES = {
    "AutoContrast": _autocontrast, "Equalize": _equalize, "Invert": _invert,
    "Rotate": _warp(_rotate), "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _blend(lambda x: tf.broadcast_to(_gray(x), tf.shape(x))),
    "ContrastIncreasing": _blend(_contrast_mean),
    "BrightnessIncreasing": _blend(tf.zeros_like),
    "SharpnessIncreasing": _blend(_smooth),
    "ShearX": _warp(_shear_x), "ShearY": _warp(_shear_y),
    "TranslateXRel": _warp(_translate_x), "TranslateYRel": _warp(_translate_y),
}
assert tuple(_BRANCHES) == OPS

def _on_uint8(fn):
    """``fn`` taking and giving uint8 frames: every op's values are integers in 0..255, so the
    layers pass a quarter of the bytes and the casts fuse into the compiled ops."""
    def op(frames, mag, sign):
        return tf.cast(fn(tf.cast(frames, tf.float32), mag, sign), tf.uint8)
    return op


# compiled=True: each op compiled by XLA where it can be, its element-wise passes fused into
# one, where TensorFlow's CPU kernels make a pass over the frames each (the same bits, 2-9x
# faster: benchmarks/randaugment_ops.py). XLA compiles them once per frame size (about 1.5 s
# of CPU for the nine). The warps (ImageProjectiveTransform) and Equalize (a bincount of
# run-time length) have no XLA kernel and always run as TensorFlow ops.
_NO_XLA = ("Equalize", "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_KERNEL_OPS = [_on_uint8(fn) for fn in _BRANCHES.values()]
_COMPILED_OPS = [fn if name in _NO_XLA else tf.function(fn, jit_compile=True,
                                                        reduce_retracing=True)
                 for name, fn in zip(_BRANCHES, _KERNEL_OPS)]


def _apply_uint8(frames, op, mag, sign, compiled: bool):
    ops = _COMPILED_OPS if compiled else _KERNEL_OPS
    branches = [lambda fn=fn: fn(frames, mag, sign) for fn in ops]
    return tf.switch_case(tf.cast(op, tf.int32), branches)


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
    frame. ``seed``: stateless seed, int64 (2,). ``compiled``: the element-wise ops through XLA
    (same result)."""
    ops, mags, signs, applied = draw_policy(seed, num_layers, magnitude, magnitude_std, prob)
    out = tf.cast(frames, tf.uint8)
    for i in range(num_layers):
        out = tf.cond(applied[i],
                      lambda i=i, x=out: _apply_uint8(x, ops[i], mags[i], signs[i], compiled),
                      lambda x=out: x)
    return out

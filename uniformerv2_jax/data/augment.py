"""Accelerator-side augmentation in JAX: normalisation and video RandAugment.

``randaugment`` follows timm's ``rand-m7-n4-mstd0.5-inc1`` policy as the original UniFormerV2
uses it: per clip, ``num_layers`` ops drawn uniformly with replacement from the 15 "increasing"
ops, each applied with probability 0.5 at magnitude ~ N(m, 0.5) clipped to [0, 10], with a
random sign for signed ops; the same ops and magnitudes for every frame of a clip; fill 128.

Ops (timm name: what, at magnitude m in [0, 10]):
AutoContrast, Equalize, Invert; Rotate (+-3m degrees); PosterizeIncreasing (keep 4 - int(0.4m)
bits); SolarizeIncreasing (invert values >= 256 - int(25.6m)); SolarizeAdd (+int(11m) to values
< 128); Color/Contrast/Brightness/SharpnessIncreasing (PIL ImageEnhance factor 1 +- 0.09m);
ShearX/ShearY (+-0.03m, about the top-left corner as PIL); TranslateXRel/YRel (+-0.045m of the
width/height).

Differences from timm/PIL (all small): warps use bilinear interpolation (timm: bicubic for the
original's hparams) with half-pixel-centre geometry; PIL's 8-bit truncations are reproduced
for the enhance ops and LUTs but not bit-exactly in every rounding; AutoContrast/Equalize
statistics are per frame and channel, as PIL computes them per image; AutoContrast uses exact
integer arithmetic (PIL's float steps can map the maximum to 254).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["MEAN", "STD", "OPS", "normalize", "randaugment", "apply_op", "draw_policy"]

MEAN, STD = 114.75, 57.375
FILL = 128.0
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
_LUT_OPS = (0, 1, 2, 4, 5, 6)
_BLEND_OPS = (7, 8, 9, 10)
_AFFINE_OPS = (3, 11, 12, 13, 14)


def normalize(video, dtype=jnp.float32):
  """(x - 114.75) / 57.375 of uint8 or float 0-255 RGB (…, 3); jit-friendly."""
  return ((jnp.asarray(video).astype(jnp.float32) - MEAN) / STD).astype(dtype)


# ---- per-value lookup tables (T, 3, 256) -------------------------------------------------

def _equalize_lut(channel):
  """PIL ImageOps.equalize table of one uint8-valued channel (H, W)."""
  hist = jnp.bincount(channel.astype(jnp.int32).ravel(), length=256)
  last = hist[255 - jnp.argmax(hist[::-1] > 0)]
  step = (hist.sum() - last) // 255
  lut = (step // 2 + jnp.cumsum(hist) - hist) // jnp.maximum(step, 1)
  return jnp.where(step > 0, jnp.minimum(lut, 255), jnp.arange(256)).astype(jnp.float32)


def _autocontrast_lut(channel):
  """PIL ImageOps.autocontrast (cutoff 0) in exact integer arithmetic."""
  lo, hi = channel.min().astype(jnp.int32), channel.max().astype(jnp.int32)
  lut = (jnp.arange(256) - lo) * 255 // jnp.maximum(hi - lo, 1)
  return jnp.where(hi > lo, jnp.clip(lut, 0, 255), jnp.arange(256)).astype(jnp.float32)


def _lut(clip, op, mag):
  """The LUT of a LUT op (identity for the others)."""
  v = jnp.arange(256.0)
  shift = 8 - (4 - jnp.floor(mag / 10 * 4))
  thresh = 256 - jnp.floor(mag / 10 * 256)
  add = jnp.minimum(128.0, jnp.floor(mag / 10 * 110))
  per_clip = jnp.stack([
      v, v, 255 - v, v, jnp.floor(v / 2 ** shift) * 2 ** shift,
      jnp.where(v >= thresh, 255 - v, v), jnp.where(v < 128, jnp.minimum(v + add, 255), v)])
  chans = jnp.moveaxis(clip, -1, 1)  # (T, 3, H, W)
  per_frame = {0: jax.vmap(jax.vmap(_autocontrast_lut)), 1: jax.vmap(jax.vmap(_equalize_lut))}
  table = jnp.broadcast_to(per_clip[jnp.minimum(op, 6)], (clip.shape[0], 3, 256))
  for k, fn in per_frame.items():
    table = jnp.where(op == k, fn(chans), table)
  return table


def _apply_lut(clip, table):
  """Gather ``table[t, c, clip[t, h, w, c]]`` as one flat take."""
  t = jnp.arange(clip.shape[0])[:, None, None, None]
  c = jnp.arange(3)[None, None, None, :]
  flat = (t * 3 + c) * 256 + clip.astype(jnp.int32)
  return jnp.take(table.reshape(-1), flat)


# ---- ImageEnhance blends ----------------------------------------------------------------

def _gray(clip):
  r, g, b = clip[..., 0], clip[..., 1], clip[..., 2]
  return jnp.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def _smooth(clip):
  """PIL ImageFilter.SMOOTH (3x3 [1 1 1; 1 5 1; 1 1 1]/13), border pixels unchanged."""
  pad = jnp.pad(clip, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = clip.shape[1:3]
  total = sum(pad[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
  inner = jnp.round((total + 4 * clip) / 13)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  border = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
  return jnp.where(border[None, :, :, None], clip, inner)


def _blend(clip, op, factor):
  gray = _gray(clip)[..., None]
  mean = jnp.floor(gray.mean(axis=(1, 2, 3), keepdims=True) + 0.5)
  degenerate = jnp.select(
      [op == 7, op == 8, op == 9],
      [jnp.broadcast_to(gray, clip.shape), jnp.broadcast_to(mean, clip.shape),
       jnp.zeros_like(clip)], _smooth(clip))
  return jnp.clip(jnp.floor(degenerate + factor * (clip - degenerate)), 0, 255)


# ---- geometric ops (dm-pix affine warps) ------------------------------------------------

def _affine_params(op, mag, sign, height, width):
  """PIL ``transform(AFFINE, (a, b, c, d, e, f))``: input (x, y) = (ax+by+c, dx+ey+f)."""
  angle = -math.pi / 180 * sign * mag / 10 * 30
  shear = sign * mag / 10 * 0.3
  tx, ty = sign * mag / 10 * 0.45 * width, sign * mag / 10 * 0.45 * height
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = width / 2, height / 2
  rot = jnp.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])
  one, zero = jnp.ones_like(shear), jnp.zeros_like(shear)
  table = jnp.stack([
      rot,
      jnp.stack([one, shear, zero, zero, one, zero]),
      jnp.stack([one, zero, zero, shear, one, zero]),
      jnp.stack([one, zero, tx, zero, one, zero]),
      jnp.stack([one, zero, zero, zero, one, ty])])
  pick = jnp.argmax(jnp.array(_AFFINE_OPS) == op)
  return table[pick]


def _warp(clip, params):
  """Bilinear affine warp of all frames at once; outside the frame reads the fill value.

  A 4-tap gather of whole pixel rows (T*3 values each): dm-pix's ``affine_transform`` also
  interpolates along the channel axis and was ~10x slower here.
  """
  a, b, c, d, e, f = (params[i] for i in range(6))
  t, h, w, ch = clip.shape
  image = jnp.moveaxis(clip, 0, 2).reshape(h * w, t * ch)
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                            indexing="ij")
  # PIL continuous coordinates have pixel centres at index + 0.5
  src_r = d * (cols + 0.5) + e * (rows + 0.5) + f - 0.5
  src_c = a * (cols + 0.5) + b * (rows + 0.5) + c - 0.5
  r0, c0 = jnp.floor(src_r), jnp.floor(src_c)
  fr, fc = src_r - r0, src_c - c0
  out = jnp.zeros((h, w, t * ch), jnp.float32)
  for dr, wr in ((0, 1 - fr), (1, fr)):
    for dc, wc in ((0, 1 - fc), (1, fc)):
      rr, cc = (r0 + dr).astype(jnp.int32), (c0 + dc).astype(jnp.int32)
      inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
      idx = jnp.clip(rr, 0, h - 1) * w + jnp.clip(cc, 0, w - 1)
      value = jnp.where(inside[..., None], jnp.take(image, idx, axis=0), FILL)
      out = out + (wr * wc)[..., None] * value
  out = jnp.moveaxis(out.reshape(h, w, t, ch), 2, 0)
  return jnp.clip(jnp.round(out), 0, 255)


# ---- policy -----------------------------------------------------------------------------

def apply_op(clip, op, magnitude, sign=1.0):
  """Apply op number ``op`` (index in :data:`OPS`) to a float clip (T, H, W, 3) in 0-255."""
  clip = jnp.asarray(clip, jnp.float32)
  op = jnp.asarray(op, jnp.int32)
  mag = jnp.asarray(magnitude, jnp.float32)
  factor = jnp.maximum(0.1, 1.0 + sign * mag / 10 * 0.9)
  height, width = clip.shape[1:3]
  out_lut = _apply_lut(clip, _lut(clip, op, mag))
  out_blend = _blend(clip, op, factor)
  out_warp = _warp(clip, _affine_params(op, mag, sign, height, width))
  is_blend = jnp.isin(op, jnp.array(_BLEND_OPS))
  is_warp = jnp.isin(op, jnp.array(_AFFINE_OPS))
  return jnp.where(is_warp, out_warp, jnp.where(is_blend, out_blend, out_lut))


def draw_policy(key, num_layers: int = 4, magnitude: float = 7, magnitude_std: float = 0.5,
                prob: float = 0.5):
  """One clip's ops: (op index, magnitude, sign, applied?) per layer, timm's draws: ops
  uniform with replacement, magnitude ~ N(m, std) clipped to [0, 10], sign +-1 and
  application each with their probability."""
  k_op, k_mag, k_sign, k_apply = jax.random.split(key, 4)
  ops = jax.random.randint(k_op, (num_layers,), 0, len(OPS))
  mags = jnp.clip(magnitude + magnitude_std * jax.random.normal(k_mag, (num_layers,)), 0, 10)
  signs = jnp.where(jax.random.uniform(k_sign, (num_layers,)) < 0.5, -1.0, 1.0)
  applied = jax.random.uniform(k_apply, (num_layers,)) < prob
  return ops, mags, signs, applied


def _augment_clip(key, clip, magnitude, num_layers, magnitude_std, prob):
  def layer(clip, xs):  # one traced body for all layers: compiles once
    op, mag, sign, on = xs
    return jnp.where(on, apply_op(clip, op, mag, sign), clip), None

  policy = draw_policy(key, num_layers, magnitude, magnitude_std, prob)
  return jax.lax.scan(layer, clip, policy)[0]


def randaugment(rng, videos, magnitude: float = 7, num_layers: int = 4,
                magnitude_std: float = 0.5, prob: float = 0.5):
  """RandAugment of uint8 or float 0-255 videos (B, T, H, W, 3); same dtype out; jit-able.

  Each clip draws its own ops; all frames of a clip get the same ops and magnitudes.
  """
  videos = jnp.asarray(videos)
  keys = jax.random.split(rng, videos.shape[0])
  fn = jax.vmap(lambda k, v: _augment_clip(k, v, magnitude, num_layers, magnitude_std, prob))
  out = fn(keys, videos.astype(jnp.float32))
  return out.astype(videos.dtype)

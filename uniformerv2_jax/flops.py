"""Analytic cost of UniFormerV2 and accelerator peaks, for MFU.

Counts multiply-adds of every matmul and convolution (what fvcore reports as
"GFLOPs" in the paper's tables); real FLOPs are twice that, and a training step
costs about three forward passes.
"""

from __future__ import annotations

import jax

from uniformerv2_jax.config import ModelConfig


def backbone_macs(cfg: ModelConfig) -> float:
  """Multiply-adds of the CLIP backbone (Local MHRA included) on one clip."""
  c, t, hw = cfg.width, cfg.frames, cfg.grid ** 2
  s = hw + 1
  kt = cfg.kernel_size if cfg.temporal_downsample else 1
  macs = t * hw * 3 * kt * cfg.patch_size ** 2 * c                      # patch embedding
  block = s * c * 3 * c + 2 * s * s * c + s * c * c + 2 * s * c * 4 * c  # attention + MLP
  if not cfg.no_lmhra:
    r = cfg.lmhra_width
    block += (2 if cfg.double_lmhra else 1) * hw * (c * r + 3 * r + r * c)
  return float(macs + cfg.layers * t * block)


def forward_macs(cfg: ModelConfig) -> float:
  """Multiply-adds of one forward pass on one clip."""
  c, t, hw = cfg.width, cfg.frames, cfg.grid ** 2
  s = hw + 1
  glob = (t * hw * c * 27                        # DPE
          + c * c + t * s * c * 2 * c            # q and kv projections
          + 2 * t * s * c + c * c                # attention + output projection
          + 2 * c * cfg.mlp_width)               # MLP
  return backbone_macs(cfg) + float(cfg.n_layers * glob + c * cfg.num_classes)


def train_flops_per_clip(cfg: ModelConfig) -> float:
  """FLOPs of a training step per clip: forward + backward = 3 forwards, 2 FLOPs a MAC. A
  frozen backbone runs its forward only: nothing before it trains, so no gradient flows
  into it (the global blocks and the head: 3 forwards)."""
  if cfg.frozen:
    return 2 * backbone_macs(cfg) + 3 * 2 * (forward_macs(cfg) - backbone_macs(cfg))
  return 3 * 2 * forward_macs(cfg)


def inference_flops_per_clip(cfg: ModelConfig) -> float:
  return 2 * forward_macs(cfg)


# Dense bf16 peak FLOP/s per device, by a part of jax's device_kind (lower-case), the first
# that matches. H100: the 797 TFLOP/s measured on this project's H100 for an 8192^3 bf16
# matmul (the datasheet says 989); the others are datasheet values. JAX names a v5e chip
# "TPU v5 lite" and a v5p chip "TPU v5" (libtpu's v5p topologies too), so "tpu v5" comes last.
PEAK_FLOPS = {
    "h100": 797e12,
    "h200": 797e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v6 lite": 918e12,
    "tpu v5": 459e12,
}


def device_peak_flops(device=None) -> float | None:
  """bf16 peak of a device, or None when unknown (e.g. CPU). The training log's MFU, the
  benchmarks' and the TPU compilation's step times all divide by it."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  for name, peak in PEAK_FLOPS.items():
    if name in kind:
      return peak
  return None

"""Kinetics-710, L/14@336 8x336 from CLIP (batch 256, lr 5e-6, 5/40 epochs, activation checkpointing)."""

from configs.common import REMAT, recipe


def get_config():
  return recipe(model="l14_336", dataset="kinetics710", num_classes=710, clip_len=8, crop_size=336,
                batch=256, lr=5e-6, warmup=5, epochs=40, init_from="pretrained/clip_l14_336",
                new_head=True, model_overrides=REMAT)

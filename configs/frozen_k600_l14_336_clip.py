"""Kinetics-600, frozen-backbone L/14@336 8x336 from CLIP: only the global blocks and head
train (batch 512, lr 8e-4, 0/50 epochs, 3x1 test views)."""

from configs.frozen_kinetics import frozen_from_clip


def get_config():
  return frozen_from_clip(600)

"""Kinetics-700, L/14 32x224 from K710 L/14, head remapped."""

from configs.kinetics_l14 import kinetics_l14


def get_config():
  return kinetics_l14(700, 32)

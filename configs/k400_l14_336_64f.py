"""Kinetics-400, L/14@336 64x336 from K710 L/14@336, head remapped."""

from configs.kinetics_l14 import kinetics_l14


def get_config():
  return kinetics_l14(400, 64, 336)

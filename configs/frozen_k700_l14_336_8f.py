"""Kinetics-700, frozen-backbone L/14@336 8x336 from the frozen K710 model, head remapped."""

from configs.frozen_kinetics import frozen_kinetics


def get_config():
  return frozen_kinetics(700, 8)

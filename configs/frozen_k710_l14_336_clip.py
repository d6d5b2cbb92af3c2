"""Frozen-backbone L/14@336 8x336 from CLIP on K710 (its run is what the frozen Kinetics recipes
start from: pretrained/frozen_k710_l14_336): only the global blocks and head train
(batch 512, lr 8e-4, 0/50 epochs, 3x1 test views). K400/600/700: frozen_k*_l14_336_clip.py."""

from configs.frozen_kinetics import frozen_from_clip


def get_config():
  return frozen_from_clip(710)

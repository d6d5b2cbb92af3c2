"""Kinetics-600, B/16 8x224 from CLIP (batch 256, lr 1e-5, 5/55 epochs)."""

from configs.common import recipe


def get_config():
  return recipe(model="b16", dataset="kinetics600", num_classes=600, clip_len=8, crop_size=224,
                batch=256, lr=1e-5, warmup=5, epochs=55, init_from="pretrained/clip_b16",
                new_head=True)

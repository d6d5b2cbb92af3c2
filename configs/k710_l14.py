"""Kinetics-710, L/14 8x224 from CLIP (batch 512, lr 1e-5, 5/40 epochs, 4x3 views)."""

from configs.common import recipe


def get_config():
  return recipe(model="l14", dataset="kinetics710", num_classes=710, clip_len=8, crop_size=224,
                batch=512, lr=1e-5, warmup=5, epochs=40, init_from="pretrained/clip_l14",
                new_head=True)

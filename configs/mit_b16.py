"""Moments in Time, B/16 8x224 from K710+K400 B/16 (batch 512, lr 2e-5, 5/24 epochs)."""

from configs.common import recipe


def get_config():
  return recipe(model="b16", dataset="mit", num_classes=339, clip_len=8, crop_size=224,
                batch=512, lr=2e-5, warmup=5, epochs=24, init_from="pretrained/k400_b16",
                new_head=True)

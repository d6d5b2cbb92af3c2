"""Frozen-backbone L/14@336 8x336 from CLIP on K710: only the global blocks and head train
(batch 512, lr 8e-4, 0/50 epochs, 3x1 test views). Override dataset/num_classes for K400/600/700."""

from configs.common import recipe


def get_config():
  return recipe(model="l14_336", dataset="kinetics710", num_classes=710, clip_len=8,
                crop_size=336, batch=512, lr=8e-4, warmup=0, epochs=50,
                init_from="pretrained/clip_l14_336", new_head=True, views=(3, 1),
                model_overrides=dict(frozen=True))

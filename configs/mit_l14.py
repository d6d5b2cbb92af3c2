"""Moments in Time, L/14 8x224 from K710+K400 L/14 (batch 512, lr 1e-5, 5/18 epochs).

pretrained/k400_l14 is the K400 L/14 8x224 model (the upstream's
`k400+k710_uniformerv2_l14_8x224.pyth`, or configs/k400_l14_8f.py's run)."""

from configs.common import recipe


def get_config():
  return recipe(model="l14", dataset="mit", num_classes=339, clip_len=8, crop_size=224,
                batch=512, lr=1e-5, warmup=5, epochs=18, init_from="pretrained/k400_l14",
                new_head=True)

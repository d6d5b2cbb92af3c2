"""Moments in Time, L/14@336 8x336 from K710+K400 L/14@336 (batch 512, lr 1e-5, 5/18 epochs).

pretrained/k400_l14_336 is a K400 L/14@336 model: the upstream started from its 8x336 one
(`k400/k400+k710_uniformerv2_l14_8x336.pyth` in exp/mit/mit_l14_f8x336/config.yaml), converted
with `python -m convert uniformerv2`. The recipes here list only 32 and 64 frames at 336; either
loads too, as the weights do not depend on the clip length."""

from configs.common import REMAT, recipe


def get_config():
  return recipe(model="l14_336", dataset="mit", num_classes=339, clip_len=8, crop_size=336,
                batch=512, lr=1e-5, warmup=5, epochs=18, init_from="pretrained/k400_l14_336",
                new_head=True, model_overrides=REMAT)

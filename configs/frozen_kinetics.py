"""Frozen-backbone L/14@336 recipes for Kinetics-400/600/700, fine-tuned from the frozen K710
model (head remapped): 8x336 batch 512 or 32x336 batch 256, lr 5e-5, 1/5 epochs, 3x1 views."""

from configs.common import recipe


def frozen_kinetics(n: int, frames: int):
  return recipe(model="l14_336", dataset=f"kinetics{n}", num_classes=n, clip_len=frames,
                crop_size=336, batch=512 if frames == 8 else 256, lr=5e-5, warmup=1, epochs=5,
                init_from="pretrained/frozen_k710_l14_336", head_map=f"k{n}", views=(3, 1),
                model_overrides=dict(frozen=True))

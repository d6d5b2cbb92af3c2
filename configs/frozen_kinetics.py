"""Frozen-backbone L/14@336 recipes: from CLIP on Kinetics-400/600/700/710 (8x336, batch 512,
lr 8e-4, 0/50 epochs), and for Kinetics-400/600/700 from the frozen K710 model (head remapped):
8x336 batch 512 or 32x336 batch 256, lr 5e-5, 1/5 epochs. Test views 3x1."""

from configs.common import recipe


def frozen_kinetics(n: int, frames: int):
  return recipe(model="l14_336", dataset=f"kinetics{n}", num_classes=n, clip_len=frames,
                crop_size=336, batch=512 if frames == 8 else 256, lr=5e-5, warmup=1, epochs=5,
                init_from="pretrained/frozen_k710_l14_336", head_map=f"k{n}", views=(3, 1),
                model_overrides=dict(frozen=True))


def frozen_from_clip(n: int):
  return recipe(model="l14_336", dataset=f"kinetics{n}", num_classes=n, clip_len=8,
                crop_size=336, batch=512, lr=8e-4, warmup=0, epochs=50,
                init_from="pretrained/clip_l14_336", new_head=True, views=(3, 1),
                model_overrides=dict(frozen=True))

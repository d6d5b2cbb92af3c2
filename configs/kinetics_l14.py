"""Kinetics-400/600/700 L/14 recipes fine-tuned from K710 (head remapped); see recipes.md."""

from configs.common import REMAT, recipe


def kinetics_l14(n: int, frames: int, res: int = 224):
  """8/16 frames: batch 256; 32 frames: batch 128; lr 1.5e-6, 1/5 epochs, 4x3 views."""
  model = "l14" if res == 224 else "l14_336"
  return recipe(model=model, dataset=f"kinetics{n}", num_classes=n, clip_len=frames,
                crop_size=res, batch=256 if frames < 32 else 128, lr=1.5e-6, warmup=1, epochs=5,
                init_from=f"pretrained/k710_{model}", head_map=f"k{n}",
                model_overrides=REMAT if frames > 8 or res > 224 else None)

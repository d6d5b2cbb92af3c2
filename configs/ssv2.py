"""Something-Something V2 recipes from CLIP (recipes.md): double Local MHRA (reduction 1.5),
temporal downsampling, global blocks on 8 (B) / 16 (L) layers, drop path 0.2 / 0.4, no flip,
2 augmented samples per video (128 videos x 2), 5/22 epochs, 1x3 test views."""

from configs.common import REMAT, SSV2, SSV2_RETURN, recipe


def ssv2(model: str, frames: int):
  overrides = dict(SSV2, return_list=SSV2_RETURN[model])
  if model == "l14" or frames > 16:
    overrides.update(REMAT)
  return recipe(model=model, dataset="ssv2", num_classes=174, clip_len=frames, crop_size=224,
                batch=256, lr=4e-5 if model == "b16" else 2e-5, warmup=5, epochs=22,
                init_from=f"pretrained/clip_{model}_ssv2",  # CLIP converted with SSV2 settings
                new_head=True, flip=False, num_samples=2, views=(1, 3),
                model_overrides=overrides)

"""Kinetics-400, B/16 8x224 fine-tuned from K710 B/16 with the K710 head remapped (batch 256, lr 2e-6, 1/5 epochs)."""

from configs.common import recipe


def get_config():
  return recipe(model="b16", dataset="kinetics400", num_classes=400, clip_len=8, crop_size=224,
                batch=256, lr=2e-6, warmup=1, epochs=5, init_from="pretrained/k710_b16",
                head_map="k400")

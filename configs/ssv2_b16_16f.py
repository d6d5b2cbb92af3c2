"""Something-Something V2, b16 16x224 from CLIP."""

from configs.ssv2 import ssv2


def get_config():
  return ssv2("b16", 16)

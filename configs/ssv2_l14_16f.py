"""Something-Something V2, l14 16x224 from CLIP."""

from configs.ssv2 import ssv2


def get_config():
  return ssv2("l14", 16)

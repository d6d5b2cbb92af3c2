"""UniFormerV2 in JAX/Flax NNX."""

from uniformerv2_jax.checkpoint import (load_pretrained, read_class_names, read_config,
                                        save_pretrained)
from uniformerv2_jax.config import ModelConfig, model_config
from uniformerv2_jax.model import UniFormerV2
from uniformerv2_jax.torch_layout import CheckpointMismatchError
from uniformerv2_jax.weights import from_torch_state_dict

__all__ = ["ModelConfig", "model_config", "UniFormerV2", "from_torch_state_dict",
           "CheckpointMismatchError", "load_pretrained", "save_pretrained", "read_config",
           "read_class_names"]

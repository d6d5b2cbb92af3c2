"""Base training config (the shared schema) and `recipe()`, the helper every recipe file uses.

Defaults are the upstream's effective values (docs/recipes.md, "Optimisation (all recipes)").
Where a default here differs from mmaction2's configs, the comment says so.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from uniformerv2_jax.config import ModelConfig


def _unset_model_fields(given: dict) -> dict:
  """Every other ModelConfig field as a placeholder: None keeps the preset's value, and
  --config.model.X=... can set any of them (Python literals: tuples as '(4, 5, 6)'). Untyped,
  as model_config accepts a number for mlp_dropout and 0/1 for flags, and checks the values."""
  return {f.name: ml_collections.config_dict.placeholder(object)
          for f in dataclasses.fields(ModelConfig) if f.name not in given}


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Model: a preset name + any ModelConfig field (uniformerv2_jax/config.py); fields left
  # None take the preset's value.
  model = dict(name="b16", num_classes=400, dtype="bfloat16",  # upstream: fp16 autocast
               param_dtype="float32", scan_layers=False, remat="none", attention="auto")
  c.model = ml_collections.ConfigDict(dict(model, **_unset_model_fields(model)))

  c.dataset = ml_collections.ConfigDict(dict(
      name="kinetics400",        # TFDS config of uniformerv2_jax.data.builder, "synthetic", or
                                 # "fake" (random in-memory clips: benchmarks and tests)
      data_dir="",               # TFDS data_dir holding the built dataset
      builder="video_classification",
      train_split="train",
      eval_split="validation",
      num_classes=400,
      class_names=None,          # path / packaged name, or None
      num_train=256,             # synthetic dataset only
      num_val=64,                # synthetic dataset only
      synthetic_size=64,         # synthetic only: frame side (pixels)
      synthetic_frames=24,       # synthetic only: frames per video
      synthetic_radius=(0.09, 0.16),  # synthetic only: shape radius range (fraction of side)
      synthetic_speed=(1.2, 2.2),     # synthetic only: pixels per frame range
  ))
  c.input = ml_collections.ConfigDict(dict(
      clip_len=8, crop_size=224, flip=True, randaugment=True, magnitude=7, num_layers=4,
      # frames: the upstream's order, RandAugment of the whole decoded frames before the crop,
      # on the host CPU; crops: on the accelerator after the crop (spares the host; the
      # geometric ops and AutoContrast/Equalize/Contrast/Sharpness then see the crop)
      randaugment_on="frames",
      # frames: the ops' pixel arithmetic XLA-compiled (the same result, under half the CPU;
      # once per frame size, ~2 s of compile and 5 MB: with thousands of frame sizes, False)
      randaugment_compiled=True,
      num_samples=1,
      crop_area=(0.08, 1.0),     # train RandomResizedCrop: area fraction range (mmaction2)
      crop_ratio=(3 / 4, 4 / 3)))  # and aspect ratio (w/h) range
  c.train = ml_collections.ConfigDict(dict(
      global_batch_size=256,
      epochs=55.0,
      warmup_epochs=5.0,
      base_lr=1e-5,              # not scaled with the batch size (upstream)
      warmup_start_lr=1e-6,      # mmaction2: a fraction of base_lr
      min_lr=1e-6,               # mmaction2: a fraction of base_lr
      weight_decay=0.05,         # 0 for every 1-D parameter (mmaction2: for biases and norms,
                                 # so it decays class_embedding and balance)
      grad_clip=20.0,            # global L2 norm
      b1=0.9, b2=0.999, eps=1e-8,
      grad_accum_steps=1,        # microbatches per step (same global batch on fewer devices)
      seed=0,
      log_every_steps=50,
      checkpoint_every_steps=1000,
      keep_checkpoints=3,        # the last K (at least 2); the best (validation top-1) too
      # TensorBoard event files: "" = WORKDIR/tensorboard (a local path or a gs:// URL)
      tensorboard_dir="",
      eval_every_epochs=1.0,
      steps_per_epoch=ml_collections.FieldReference(None, field_type=int),  # None: dataset size
      eval_batch_size=ml_collections.FieldReference(None, field_type=int),  # None: global batch
      max_eval_batches=ml_collections.FieldReference(None, field_type=int),
  ))
  c.init_from = ml_collections.FieldReference(None, field_type=str)
  # The classifier (head.fc) starts from the seeded initialisation instead of init_from's:
  # a CLIP tower has no classifier, and MiT's 339 classes are not its K400 source's. (The
  # upstream deletes a pretrained classifier whose class count differs: DELETE_SPECIAL_HEAD.)
  c.init_new_head = False
  c.head_map = ml_collections.FieldReference(None, field_type=str)
  # Mesh axis sizes (one may be -1: all remaining devices). Tensors with fewer elements than
  # min_fsdp_size stay replicated on the fsdp axis (uniformerv2_jax.sharding.MIN_FSDP_SIZE).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1, min_fsdp_size=2 ** 18))
  c.eval = ml_collections.ConfigDict(dict(
      num_clips=4, num_crops=3, spatial="mmaction2", per_device_batch=4,
      head_map=ml_collections.FieldReference(None, field_type=str), save_scores=False,
      # The checkpoint's class names vs the dataset's: the same classes in another order (the
      # original repository's Kinetics heads) are scored by name; other names stop with an
      # error. False: row i of the head is class i, unchecked (the upstream's behaviour).
      match_class_names=True))
  return c


def recipe(*, model, dataset, num_classes, clip_len, crop_size, batch, lr, warmup, epochs,
           init_from=None, head_map=None, new_head=False, flip=True, num_samples=1,
           views=(4, 3), model_overrides=None) -> ml_collections.ConfigDict:
  """One row of the recipes table as a config."""
  c = get_base_config()
  c.model.name = model
  c.model.num_classes = num_classes
  c.model.t_size = clip_len
  for k, v in (model_overrides or {}).items():
    c.model[k] = v
  c.dataset.name = dataset
  c.dataset.num_classes = num_classes
  c.input.clip_len = clip_len
  c.input.crop_size = crop_size
  c.input.flip = flip
  c.input.num_samples = num_samples
  c.train.global_batch_size = batch
  c.train.base_lr = lr
  c.train.warmup_epochs = warmup
  c.train.epochs = epochs
  c.init_from = init_from
  c.head_map = head_map
  c.init_new_head = new_head
  c.eval.num_clips, c.eval.num_crops = views
  return c


# Something-Something V2 model settings (docs/recipes.md, "Model settings per family").
# replica_batch: DropPath masks and BatchNorm statistics per 32 clips, the upstream's per-GPU
# batch (256 clips over the NUM_GPUS: 8 of its exp/*/config.yaml; the SSv2 run scripts are not
# in docs/recipes.md, so the GPU count is an assumption); 0 would share them over the batch.
SSV2 = dict(no_lmhra=False, double_lmhra=True, dw_reduction=1.5, temporal_downsample=True,
            backbone_drop_path_rate=0.2, drop_path_rate=0.4, replica_batch=32)
SSV2_RETURN = {"b16": tuple(range(4, 12)), "l14": tuple(range(8, 24))}
# Activation checkpointing the upstream used for long clips / 336, on 15-24 blocks (its
# checkpoint_num: the first that many). recipes.md does not say which recipe used which count,
# so all blocks (remat_blocks=-1); --config.model.remat_blocks=15 recomputes fewer (faster,
# more memory).
REMAT = dict(remat="full")

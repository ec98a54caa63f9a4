"""Tiny training config for tests: fake dataset, test-size Swins, a few steps.

The config argument is the prepared data directory: ``tests/configs/tiny.py:/tmp/data``.
"""

from ml_collections import ConfigDict

from mfer_jax import config_lib


def get_config(arg: str | None = None) -> ConfigDict:
  c = config_lib.base_config()
  c.data.data_dir = arg or ""
  c.data.face_size = 32
  c.data.batch_size = 8
  c.data.eval_batch_size = 16
  c.data.sampling.epoch_size = 48           # 6 steps per epoch
  c.data.augment.enabled = True
  for enc, size in ((c.model.image, (32, 32)), (c.model.audio, (16, 32))):
    enc.variant = "test1"   # one block per stage: compiles faster (swin.VARIANTS)
    enc.img_size = size
    enc.window_size = 4
    enc.drop_path_rate = 0.1
  c.model.fusion.update(dim=32, num_layers=1, num_heads=4, gate_hidden=16)
  c.train.num_epochs = 2
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 2
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 4
  c.train.async_checkpointing = True
  return c

"""Tiny config for the feature-cache tests: a test-size ViT on faces, wav2vec 2.0 on audio.

The config argument is the prepared data directory: ``tests/configs/tiny_features.py:/tmp/data``.
Init files and the cache directory come as overrides (``--config.model.image.init_file=...``).
"""

from ml_collections import ConfigDict

from mfer_jax import config_lib


def get_config(arg: str | None = None) -> ConfigDict:
  c = config_lib.base_config()
  c.data.data_dir = arg or ""
  c.data.face_size = 32
  c.data.batch_size = 8
  c.data.eval_batch_size = 16
  c.data.sampling.epoch_size = 48
  c.model.image.update(family="vit", variant="test", img_size=(32, 32), drop_path_rate=0.0)
  c.model.audio.update(family="wav2vec2", variant="test")
  c.model.fusion.update(dim=32, num_layers=1, num_heads=4, gate_hidden=16)
  # One chunk without context covers each test video, so a direct forward pass of the
  # zero-padded track is the reference.
  c.features.update(batch_size=8, audio_chunk_seconds=4.0, audio_context_seconds=0.0)
  c.train.num_epochs = 2
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 2
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 6
  c.train.async_checkpointing = False
  return c

"""Pretrained initialisation of the encoders from files the user names in the config.

Second in the resume order (workdir checkpoint, then these files, then scratch): used only
when the workdir has no checkpoint yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from mfer_jax import console, errors
from ml_collections import ConfigDict

from mfer_jax.models import encoders
from mfer_jax.models import model as model_lib
from mfer_jax.models import swin_import
from mfer_jax.training.state import ModelSpec, TrainState


class InitFileError(errors.UserError, ValueError):
  """An init file named in the config cannot be used; the message names the config key."""


def apply_init_files(config: ConfigDict, spec: ModelSpec, state: TrainState) -> TrainState:
  """Loads ``model.image.init_file`` / ``model.audio.init_file`` into the state's params.

  The loaded values take each param's existing sharding, so this works on a sharded state.
  Optimizer moments start at zero whatever the params are, so they need no change.
  """
  if spec.from_features:
    return state   # the init files made the cached features; the model has no encoders
  model = spec.merge(state.params)
  loaded = False
  for key, enc_cfg, arch_fn, encoder in (
      ("model.image.init_file", config.model.image, model_lib.image_arch, model.image_encoder),
      ("model.audio.init_file", config.model.audio, model_lib.audio_arch,
       model.audio_encoder)):
    path = enc_cfg.init_file
    if not path:
      continue
    if encoder is None:
      logging.warning("%s=%s is ignored: fusion %r builds no such encoder.", key, path,
                      config.model.fusion.name)
      continue
    try:
      encoders.load_pretrained(encoder, path, arch_fn(config.model))
    except (OSError, swin_import.CheckpointError) as e:
      raise InitFileError(f"{key}={path}: {errors.one_line(str(e))}; convert a timm or "
                          f"Hugging Face checkpoint of the {enc_cfg.family} family with "
                          "`python -m mfer_jax.tools.convert --help`, or set the key to '' to "
                          "train from scratch") from e
    console.say(f"Initialised the {key.split('.')[1]} encoder from {path}")
    loaded = True
  if not loaded:
    return state
  params = nnx.state(model, nnx.Param)
  # The EMA starts from the loaded weights too, not from the random ones they replaced.
  ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
  return state.replace(params=params, ema_params=ema)

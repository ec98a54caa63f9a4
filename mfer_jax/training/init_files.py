"""Pretrained initialisation of the encoders from files the user names in the config.

Second in the resume order (workdir checkpoint, then these files, then scratch): used only
when the workdir has no checkpoint yet.
"""

from __future__ import annotations

from absl import logging
from flax import nnx

from mfer_jax import console, errors
from ml_collections import ConfigDict

from mfer_jax.models import swin_import
from mfer_jax.models.model import encoder_config
from mfer_jax.training.state import ModelSpec, TrainState


class InitFileError(errors.UserError, ValueError):
  """An init file named in the config cannot be used; the message names the config key."""


def apply_init_files(config: ConfigDict, spec: ModelSpec, state: TrainState) -> TrainState:
  """Loads ``model.image.init_file`` / ``model.audio.init_file`` into the state's params.

  The loaded values take each param's existing sharding, so this works on a sharded state.
  Optimizer moments start at zero whatever the params are, so they need no change.
  """
  model = spec.merge(state.params)
  loaded = False
  for key, enc_cfg, in_chans, encoder in (
      ("model.image.init_file", config.model.image, 3, model.image_encoder),
      ("model.audio.init_file", config.model.audio, config.model.audio.in_chans,
       model.audio_encoder)):
    path = enc_cfg.init_file
    if not path:
      continue
    if encoder is None:
      logging.warning("%s=%s is ignored: fusion %r builds no such encoder.", key, path,
                      config.model.fusion.name)
      continue
    try:
      params = swin_import.load_swin_params(path, encoder_config(enc_cfg, in_chans))
      swin_import.apply_to_model(encoder, params)
    except (OSError, swin_import.CheckpointError) as e:
      raise InitFileError(f"{key}={path}: {errors.one_line(str(e))}; convert a timm or "
                          "Microsoft Swin checkpoint with `python -m mfer_jax.tools.convert "
                          "--help`, or set the key to '' to train from scratch") from e
    console.say(f"Initialised the {key.split('.')[1]} encoder from {path}")
    loaded = True
  if not loaded:
    return state
  return state.replace(params=nnx.state(model, nnx.Param))

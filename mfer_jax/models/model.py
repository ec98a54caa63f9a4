"""The full audio-visual expression model: two Swin encoders, fusion, head.

Inputs arrive as the pipeline makes them (uint8 faces and uint8 log-mel windows) and are
resized and normalised here, on the device, so the host stays light and prediction uses
exactly the same preprocessing as training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from mfer_jax.models import fusion as fusion_lib
from mfer_jax.models import layers
from mfer_jax.models import normalisation
from mfer_jax.models import swin


def _normalise(x: jax.Array, channels: int) -> jax.Array:
  """ImageNet mean/std for 3 channels, one grey mean/std for 1 (`models.normalisation`)."""
  mean, std = normalisation.input_stats(channels)
  return (x - jnp.asarray(mean)) / jnp.asarray(std)


def face_to_input(face: jax.Array, size: tuple[int, int]) -> jax.Array:
  """uint8 RGB faces [B, h, w, 3] -> normalised float32 [B, H, W, 3] at the encoder size."""
  x = face.astype(jnp.float32) / 255.0
  if x.shape[1:3] != tuple(size):
    x = jax.image.resize(x, (x.shape[0], *size, 3), method="bilinear")
  return _normalise(x, 3)


def mel_to_input(mel: jax.Array, size: tuple[int, int], channels: int) -> jax.Array:
  """uint8 log-mel [B, n_mels, T] -> normalised float32 [B, H, W, channels].

  Mel bins run along the image height and time along the width, like the authors' rendered
  spectrogram images; ``channels=3`` repeats the map as they did, ``channels=1`` feeds it once
  (a 3-channel init file is folded into it exactly, see `models.normalisation`).
  """
  x = mel.astype(jnp.float32)[..., None] / 255.0
  if x.shape[1:3] != tuple(size):
    x = jax.image.resize(x, (x.shape[0], *size, 1), method="bilinear")
  return _normalise(jnp.repeat(x, channels, axis=-1), channels)


def encoder_config(cfg: ConfigDict, in_chans: int) -> swin.SwinConfig:
  return swin.swin_config(cfg.variant, img_size=tuple(cfg.img_size), window_size=cfg.window_size,
                          in_chans=in_chans, drop_path_rate=cfg.drop_path_rate)


class ExpressionModel(nnx.Module):
  """Face Swin + audio Swin + fusion + 8-class head.

  Args:
    cfg: ``config.model`` (see `mfer_jax.config_lib`): num_classes, precision, remat, image,
      audio, fusion, modality_dropout.
    rngs: parameter RNGs.
    precision: overrides ``cfg.precision`` (the planner resolves ``matmul="auto"`` for the
      accelerator it plans for, not for the CPU it compiles on).

  Attributes:
    precision: the resolved `layers.Precision` every part uses.
  """

  def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs,
               precision: layers.Precision | None = None):
    self.precision = precision or layers.Precision.from_config(cfg.precision)
    kw = dict(rngs=rngs, precision=self.precision, remat=cfg.remat)
    name = cfg.fusion.name
    self.image_size = tuple(cfg.image.img_size)
    self.audio_size = tuple(cfg.audio.img_size)
    self.audio_chans = int(cfg.audio.in_chans)
    self.modality_dropout = float(cfg.modality_dropout)
    # Single-modality ablations do not build (or pay for) the other encoder.
    self.image_encoder = (swin.SwinTransformer(encoder_config(cfg.image, 3), **kw)
                          if name != "audio_only" else None)
    self.audio_encoder = (swin.SwinTransformer(encoder_config(cfg.audio, self.audio_chans), **kw)
                          if name != "visual_only" else None)
    self.fusion = fusion_lib.Fusion(
        cfg.fusion,
        self.image_encoder.num_features if self.image_encoder else 0,
        self.audio_encoder.num_features if self.audio_encoder else 0,
        cfg.num_classes, **kw)

  def _availability(self, has_face: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """bool [B, 2]: (visual, audio) available; modality dropout blanks one of them."""
    avail = jnp.stack([has_face.astype(bool), jnp.ones_like(has_face, bool)], axis=-1)
    if rngs is None or self.modality_dropout == 0.0:
      return avail
    key = rngs.dropout()
    k_drop, k_which = jax.random.split(key)
    drop = jax.random.bernoulli(k_drop, self.modality_dropout, has_face.shape)
    pick_visual = jax.random.bernoulli(k_which, 0.5, has_face.shape)
    # Never blank the only modality an example has.
    drop_v = drop & pick_visual & avail[:, 1]
    drop_a = drop & ~pick_visual & avail[:, 0]
    return avail & ~jnp.stack([drop_v, drop_a], axis=-1)

  def __call__(self, face: jax.Array, mel: jax.Array, has_face: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Predicts expression logits.

    Args:
      face: uint8 [B, h, w, 3] face crops (zeros where there is no face).
      mel: uint8 [B, n_mels, T] log-mel windows.
      has_face: bool [B].
      rngs: dropout / drop-path / modality-dropout RNGs when training; None for inference.

    Returns:
      {"logits": float32 [B, classes], "gates": float32 [B, 2] (visual, audio) weights}.
    """
    avail = self._availability(has_face, rngs)
    v_tokens = a_tokens = None
    if self.image_encoder is not None:
      grid, _ = self.image_encoder(face_to_input(face, self.image_size), rngs=rngs)
      v_tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
    if self.audio_encoder is not None:
      grid, _ = self.audio_encoder(mel_to_input(mel, self.audio_size, self.audio_chans),
                                   rngs=rngs)
      a_tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
    logits, gates = self.fusion(v_tokens, a_tokens, avail, rngs=rngs)
    return {"logits": logits, "gates": gates}

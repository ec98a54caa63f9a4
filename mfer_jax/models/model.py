"""The full audio-visual expression model: two encoders, fusion, head.

Inputs arrive as the pipeline makes them (uint8 faces and uint8 log-mel windows) and are
resized and normalised here, on the device, so the host stays light and prediction uses
exactly the same preprocessing as training.

The encoders are chosen by ``config.model.image.family`` / ``.audio.family``
(`mfer_jax.models.encoders`: Swin or a ViT on faces and on the log-mel image). Built with
``from_features=True`` (training on a feature cache, ``data.features_dir``), the model has no
encoders: its ``face`` and ``mel`` inputs are the cached pooled features [B, C] of the
configured encoders (clips: [B, T, C]), and it runs the fusion, the temporal head and the
classifier only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from mfer_jax import sharding
from mfer_jax.models import encoders
from mfer_jax.models import fusion as fusion_lib
from mfer_jax.models import layers
from mfer_jax.models import normalisation
from mfer_jax.models import temporal as temporal_lib
from mfer_jax.models import vit


def _normalise(x: jax.Array, channels: int, stats=None) -> jax.Array:
  """Per-channel normalisation with ``stats``, an encoder family's RGB (mean, std) (see
  `input_stats`; None: ImageNet's), as `models.normalisation.input_stats` gives them."""
  mean, std = normalisation.input_stats(channels, stats)
  return (x - jnp.asarray(mean)) / jnp.asarray(std)


def input_stats(arch) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """The pixel statistics an encoder family was pretrained with; None: ImageNet's default."""
  if isinstance(arch, vit.ViTConfig) and arch.input_stats != "imagenet":
    return vit.INPUT_STATS[arch.input_stats]
  return None


def face_to_input(face: jax.Array, size: tuple[int, int], stats=None) -> jax.Array:
  """uint8 RGB faces [B, h, w, 3] -> normalised float32 [B, H, W, 3] at the encoder size."""
  x = face.astype(jnp.float32) / 255.0
  if x.shape[1:3] != tuple(size):
    x = jax.image.resize(x, (x.shape[0], *size, 3), method="bilinear")
  return _normalise(x, 3, stats)


def mel_to_input(mel: jax.Array, size: tuple[int, int], channels: int,
                 stats=None) -> jax.Array:
  """uint8 log-mel [B, n_mels, T] -> normalised float32 [B, H, W, channels].

  Mel bins run along the image height and time along the width, like the authors' rendered
  spectrogram images; ``channels=3`` repeats the map as they did, ``channels=1`` feeds it once
  (a 3-channel init file is folded into it exactly, see `models.normalisation`).
  """
  x = mel.astype(jnp.float32)[..., None] / 255.0
  if x.shape[1:3] != tuple(size):
    x = jax.image.resize(x, (x.shape[0], *size, 1), method="bilinear")
  return _normalise(jnp.repeat(x, channels, axis=-1), channels, stats)


def image_arch(cfg: ConfigDict) -> encoders.Arch:
  """Architecture of ``cfg.image`` (``config.model``)."""
  if cfg.image.get("family", "swin") not in encoders.IMAGE_FAMILIES:
    raise encoders.EncoderConfigError(
        f"model.image.family={cfg.image.family!r}: choose one of "
        f"{', '.join(encoders.IMAGE_FAMILIES)}")
  return encoders.arch_config(cfg.image, 3, key="model.image")


def audio_arch(cfg: ConfigDict) -> encoders.Arch:
  """Architecture of ``cfg.audio`` (``config.model``)."""
  return encoders.arch_config(cfg.audio, int(cfg.audio.in_chans), key="model.audio")


class ExpressionModel(nnx.Module):
  """Face encoder + audio encoder + fusion + optional temporal head + 8-class head.

  Frames (``face`` [B, h, w, 3]) get one label each. Clips (``face`` [B, T, h, w, 3]) run the
  encoders and the fusion on all B x T frames, the temporal head (``cfg.temporal``,
  `mfer_jax.models.temporal`) on the T fused features of each clip, and the head on every
  frame, so they get [B, T] labels. With the 'none' head a clip is exactly its frames run one
  by one.

  Args:
    cfg: ``config.model`` (see `mfer_jax.config_lib`): num_classes, precision, remat, image,
      audio, fusion, temporal, modality_dropout.
    rngs: parameter RNGs.
    precision: overrides ``cfg.precision`` (the planner resolves ``matmul="auto"`` for the
      accelerator it plans for, not for the CPU it compiles on).
    from_features: no encoders; ``face`` and ``mel`` are cached encoder features.

  Attributes:
    precision: the resolved `layers.Precision` every part uses.
  """

  def __init__(self, cfg: ConfigDict, *, rngs: nnx.Rngs,
               precision: layers.Precision | None = None, from_features: bool = False):
    self.precision = precision or layers.Precision.from_config(cfg.precision)
    kw = dict(rngs=rngs, precision=self.precision, remat=cfg.remat)
    name = cfg.fusion.name
    self.from_features = bool(from_features)
    self.image_size = tuple(cfg.image.img_size)
    self.audio_size = tuple(cfg.audio.img_size)
    self.audio_chans = int(cfg.audio.in_chans)
    self.modality_dropout = float(cfg.modality_dropout)
    v_arch, a_arch = image_arch(cfg), audio_arch(cfg)
    use_v, use_a = name != "audio_only", name != "visual_only"
    if cfg.audio.family in encoders.WAVEFORM_FAMILIES and use_a and not from_features:
      raise encoders.EncoderConfigError(
          f"model.audio.family={cfg.audio.family!r} encodes the raw waveform, which prepared "
          "records do not hold: extract its features with `python -m mfer_jax.tools.extract` "
          "and train on them with --config.data.features_dir=FEATURES (configs/"
          "abaw_features.py), or choose swin | vit for the log-mel")
    self.image_stats = input_stats(v_arch)
    self.audio_stats = input_stats(a_arch)
    # Single-modality ablations do not build (or pay for) the other encoder.
    self.image_encoder = (encoders.build(v_arch, **kw)
                          if use_v and not from_features else None)
    self.audio_encoder = (encoders.build(a_arch, **kw)
                          if use_a and not from_features else None)
    self.fusion = fusion_lib.Fusion(
        cfg.fusion, encoders.width(v_arch) if use_v else 0,
        encoders.width(a_arch) if use_a else 0, cfg.num_classes, **kw)
    self._use = (use_v, use_a)
    self.temporal = temporal_lib.make_head(cfg.temporal, self.fusion.feature_dim, **kw)

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

  def _feature_tokens(self, x: jax.Array) -> jax.Array:
    """Cached features [B, C] (or [B, N, C]) -> float32 tokens [B, N, C] (the fusion casts
    matmul operands to the compute dtype, as for encoder tokens)."""
    x = x.astype(jnp.float32)
    return x[:, None] if x.ndim == 2 else x

  def __call__(self, face: jax.Array, mel: jax.Array, has_face: jax.Array,
               present: jax.Array | None = None, *,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Predicts expression logits for frames, or for every frame of clips.

    Args:
      face: uint8 [B, h, w, 3] face crops (zeros where there is no face), or [B, T, h, w, 3];
        with ``from_features``, the image encoder's cached features [B, C] (or [B, T, C]).
      mel: uint8 [B, n_mels, W] log-mel windows, or [B, T, n_mels, W]; with
        ``from_features``, the audio encoder's cached features [B, C] (or [B, T, C]).
      has_face: bool [B] for frames, [B, T] for clips (its rank says which).
      present: clips only: bool [B, T], False for padded slots (no record); the temporal head
        ignores them. Default: every slot present.
      rngs: dropout / drop-path / modality-dropout RNGs when training; None for inference.

    Returns:
      {"logits": float32 [B, classes] (or [B, T, classes]), "gates": float32 [B, 2] (or
      [B, T, 2]) (visual, audio) weights, "available": bool [B, 2] (or [B, T, 2]), whether
      each modality was seen (after modality dropout)}; with unimodal heads
      (``fusion.unimodal_loss_weight`` > 0) also "unimodal_logits" float32 [B, 2, classes]
      (or [B, T, 2, classes]) of the (visual, audio) heads.
    """
    clip_shape = None
    # has_face tells frames ([B]) from clips ([B, T]) for pixels and cached features alike.
    if has_face.ndim == 2:
      clip_shape = has_face.shape
      face = face.reshape(-1, *face.shape[2:])
      mel = mel.reshape(-1, *mel.shape[2:])
      has_face = has_face.reshape(-1)
    elif self.temporal is not None:
      raise ValueError(f"a temporal head needs clips [B, T, ...]; got frames of shape "
                       f"{face.shape}")
    avail = self._availability(has_face, rngs)
    v_tokens = a_tokens = None
    if self.from_features:
      v_tokens = self._feature_tokens(face) if self._use[0] else None
      a_tokens = self._feature_tokens(mel) if self._use[1] else None
    if self.image_encoder is not None:
      grid, _ = self.image_encoder(face_to_input(face, self.image_size, self.image_stats),
                                   rngs=rngs)
      v_tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
    if self.audio_encoder is not None:
      grid, _ = self.audio_encoder(
          mel_to_input(mel, self.audio_size, self.audio_chans, self.audio_stats), rngs=rngs)
      a_tokens = grid.reshape(grid.shape[0], -1, grid.shape[-1])
    fused, gates, unimodal = self.fusion.features(v_tokens, a_tokens, avail, rngs=rngs)
    if clip_shape is not None and self.temporal is not None:
      b, t = clip_shape
      present = jnp.ones((b, t), bool) if present is None else present.astype(bool)
      clip = sharding.constrain(fused.reshape(b, t, -1), ("batch", None, "embed"))
      fused = self.temporal(clip, present, rngs=rngs).reshape(b * t, -1)
    logits = self.fusion.classify(fused, rngs=rngs)
    out = {"logits": logits, "gates": gates, "available": avail}
    if unimodal is not None:
      out["unimodal_logits"] = unimodal
    if clip_shape is not None:
      out = {k: v.reshape(*clip_shape, *v.shape[1:]) for k, v in out.items()}
    return out


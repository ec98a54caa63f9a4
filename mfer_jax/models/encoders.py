"""Encoder families by name: one place that turns ``config.model.image`` / ``.audio`` into a model.

``family`` selects the encoder:

  swin      Swin Transformer (`mfer_jax.models.swin`) on faces or on the log-mel image
  vit       Vision Transformer: DINOv2 / MAE / CLIP / ViT (`mfer_jax.models.vit`), on faces
            or on the log-mel image
  wav2vec2  wav2vec 2.0 / HuBERT on the raw 16 kHz waveform (`mfer_jax.models.wav2vec2`),
  hubert    audio only. Prepared records hold log-mel windows, not waveforms, so these run in
            feature extraction (`mfer_jax.features`) and prediction, and training reads their
            cached features (``data.features_dir``)

Every encoder maps its input to ``(tokens, pooled)``: a token grid ([B, h, w, C] or
[B, T, C]) that the fusion flattens, and a pooled [B, C] feature (what feature caches keep).
Pretrained weights load by family from the files `python -m mfer_jax.tools.convert` writes
(or the original timm / Hugging Face files).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Union

from flax import nnx
from ml_collections import ConfigDict

from mfer_jax import errors
from mfer_jax.models import import_common
from mfer_jax.models import swin
from mfer_jax.models import swin_import
from mfer_jax.models import vit
from mfer_jax.models import vit_import
from mfer_jax.models import wav2vec2
from mfer_jax.models import wav2vec2_import
from mfer_jax.models.layers import FLOAT32, Precision

IMAGE_FAMILIES = ("swin", "vit")
AUDIO_FAMILIES = ("swin", "vit", "wav2vec2", "hubert")
WAVEFORM_FAMILIES = ("wav2vec2", "hubert")

Arch = Union[swin.SwinConfig, vit.ViTConfig, wav2vec2.Wav2Vec2Config]


class EncoderConfigError(errors.UsageError, ValueError):
  """An encoder config that names no known family or variant; names the key and choices."""


def arch_config(enc: ConfigDict, in_chans: int, *, key: str = "model.image") -> Arch:
  """The architecture named by an encoder config (``config.model.image`` / ``.audio``).

  Args:
    enc: the encoder ConfigDict (family, variant, img_size, window_size, drop_path_rate, pool).
    in_chans: input channels of an image encoder.
    key: the config key, for error messages.

  Raises:
    EncoderConfigError: unknown family or variant, or a size the architecture cannot take.
  """
  family = enc.get("family", "swin")
  try:
    if family == "swin":
      return swin.swin_config(enc.variant, img_size=tuple(enc.img_size),
                              window_size=enc.window_size, in_chans=in_chans,
                              drop_path_rate=enc.drop_path_rate)
    if family == "vit":
      extra = {"pool": enc.pool} if enc.get("pool") else {}
      return vit.vit_config(enc.variant, img_size=tuple(enc.img_size), in_chans=in_chans,
                            drop_path_rate=enc.drop_path_rate, **extra)
    if family in WAVEFORM_FAMILIES:
      return wav2vec2.wav2vec2_config(family, enc.variant)
  except ValueError as e:
    raise EncoderConfigError(f"{key}: {e}") from e
  raise EncoderConfigError(f"{key}.family={family!r}: choose one of "
                           f"{', '.join(AUDIO_FAMILIES if 'audio' in key else IMAGE_FAMILIES)}")


def build(arch: Arch, *, rngs: nnx.Rngs, precision: Precision = FLOAT32,
          remat: str = "none") -> nnx.Module:
  """The encoder module of ``arch``; every family follows ``precision`` and remats each
  transformer block under ``remat`` (`layers.REMAT_POLICIES`)."""
  if isinstance(arch, swin.SwinConfig):
    return swin.SwinTransformer(arch, rngs=rngs, precision=precision, remat=remat)
  if isinstance(arch, vit.ViTConfig):
    return vit.VisionTransformer(arch, rngs=rngs, precision=precision, remat=remat)
  return wav2vec2.Wav2Vec2Model(arch, rngs=rngs, precision=precision, remat=remat)


def width(arch: Arch) -> int:
  """Channels of the encoder's tokens and pooled feature."""
  if isinstance(arch, swin.SwinConfig):
    return arch.stage_dims[-1]
  return arch.num_features


def load_params(path: str, arch: Arch) -> dict:
  """Reads a checkpoint for ``arch`` with its family's importer (CheckpointError if unfit)."""
  if isinstance(arch, swin.SwinConfig):
    return swin_import.load_swin_params(path, arch)
  if isinstance(arch, vit.ViTConfig):
    return vit_import.load_vit_params(path, arch)
  return wav2vec2_import.load_wav2vec2_params(path, arch)


def load_pretrained(encoder: nnx.Module, path: str, arch: Arch) -> None:
  """Loads ``path`` into ``encoder`` in place, keeping each param's dtype and sharding."""
  swin_import.apply_to_model(encoder, load_params(path, arch))


def describe(arch: Arch) -> dict[str, Any]:
  """The architecture as a JSON-able dict (feature caches record and compare it)."""
  d = dataclasses.asdict(arch)
  d["family"] = ("swin" if isinstance(arch, swin.SwinConfig) else
                 "vit" if isinstance(arch, vit.ViTConfig) else arch.family)
  return json.loads(json.dumps(d))


def weights_hash(path: str) -> str:
  """SHA-256 of an init file ('' for none: a randomly initialised encoder)."""
  return import_common.sha256_file(path) if path else ""

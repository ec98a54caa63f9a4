"""Frozen encoders from a config, run batched over all devices: faces, mels, waveforms -> features.

`FeatureExtractor` builds the image and audio encoders that ``config.model`` names, with the
weights of their ``init_file`` (or a seeded random initialisation when there is none), and
turns inputs into one pooled feature per video frame:

* faces: uint8 crops [N, S, S, 3] -> the image encoder's pooled feature [N, C], with exactly
  the preprocessing of training (`mfer_jax.models.model.face_to_input`: resized on device to
  the encoder's size, normalised with its family's statistics);
* log-mel windows (Swin / ViT audio): uint8 [N, n_mels, W] -> [N, C], as in training;
* a waveform (wav2vec 2.0 / HuBERT): float32 16 kHz mono of a whole track -> one feature per
  video frame. The encoder's 20 ms frames are aligned like the log-mel columns of the data
  preparation (`mfer_jax.media.audio_features.centre_columns`): video frame i (1-based) of a
  video at ``fps`` is at t = (i - 1) / fps, encoder frame j is centred on t = j * 20 ms
  (`wav2vec2.padded_frames`), and frame i takes the mean of the encoder frames within
  ``features.audio_pool_seconds`` centred on column round(t / 20 ms). Long tracks run in
  chunks of ``audio_chunk_seconds``, each seeing ``audio_context_seconds`` more audio on
  both sides (zeros beyond the ends: silence); every chunk has the same shape, so the encoder
  compiles once.

Batches have a fixed size (a multiple of the device count, the last one padded) and are
sharded over a data-parallel mesh of all local devices; the parameters are replicated.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from mfer_jax import sharding
from mfer_jax.media import audio_features
from mfer_jax.models import encoders
from mfer_jax.models import model as model_lib
from mfer_jax.models import wav2vec2
from mfer_jax.models.layers import Precision

SAMPLE_RATE = wav2vec2.SAMPLE_RATE


def _build(arch, init_file: str, seed: int, precision: Precision) -> nnx.Module:
  """The encoder with its init file's weights, or a seeded random init without one."""
  if not init_file:
    return encoders.build(arch, rngs=nnx.Rngs(seed), precision=precision)
  model = nnx.eval_shape(lambda: encoders.build(arch, rngs=nnx.Rngs(0), precision=precision))
  encoders.load_pretrained(model, init_file, arch)
  return model


def normalize_waveform(wave: np.ndarray) -> np.ndarray:
  """Zero mean, unit variance (HF's Wav2Vec2FeatureExtractor, eps 1e-7); silence stays 0."""
  wave = np.asarray(wave, np.float32)
  if wave.size == 0 or not np.any(wave):
    return wave
  return ((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)).astype(np.float32)


def pool_columns(columns: np.ndarray, centres: np.ndarray, width: int) -> np.ndarray:
  """Mean of ``columns[c - width//2 : c - width//2 + width]`` for every centre (clipped)."""
  n = columns.shape[0]
  lo = np.clip(centres - width // 2, 0, n)
  hi = np.clip(centres - width // 2 + width, 0, n)
  csum = np.concatenate([np.zeros((1, columns.shape[1])),
                         np.cumsum(columns.astype(np.float64), axis=0)])
  count = np.maximum(hi - lo, 1)[:, None]
  return ((csum[hi] - csum[lo]) / count).astype(np.float32)


class FeatureExtractor:
  """The configured encoders, frozen, with batched and sharded forward functions.

  Args:
    config: the whole config: ``model`` (image / audio encoders and init files, precision),
      ``features`` (batch size, audio settings), ``seed`` (random init without init file).
    devices: devices of the data-parallel mesh (default: all local devices).

  Attributes:
    image_arch, audio_arch: the encoders' architectures.
    image_dim, audio_dim: widths of their pooled features.
    audio_from_waveform: whether the audio encoder reads the raw waveform (wav2vec2 / hubert)
      rather than log-mel windows.
  """

  def __init__(self, config: ConfigDict, devices=None):
    self.config = config
    feat = config.features
    precision = Precision.from_config(config.model.precision)
    self.image_arch = model_lib.image_arch(config.model)
    self.audio_arch = model_lib.audio_arch(config.model)
    self.image_dim = encoders.width(self.image_arch)
    self.audio_dim = encoders.width(self.audio_arch)
    self.audio_from_waveform = isinstance(self.audio_arch, wav2vec2.Wav2Vec2Config)
    devices = list(jax.local_devices() if devices is None else devices)
    self.mesh = sharding.make_mesh((-1, 1, 1), devices=devices)
    self._replicated = NamedSharding(self.mesh, P())
    n = len(devices)
    self.batch_size = max(n, -(-int(feat.batch_size) // n) * n)
    self.chunk_batch = n   # one audio chunk per device and call: chunks are seconds long
    self._image = self._compile(
        _build(self.image_arch, config.model.image.init_file, config.seed, precision),
        self._image_input)
    self._audio = self._compile(
        _build(self.audio_arch, config.model.audio.init_file, config.seed + 1, precision),
        self._waveform_input if self.audio_from_waveform else self._mel_input,
        tokens=self.audio_from_waveform)

  # --------------------------------------------------------------------------- preprocessing

  def _image_input(self, faces: jax.Array) -> jax.Array:
    return model_lib.face_to_input(faces, self.image_arch.img_size,
                                   model_lib.input_stats(self.image_arch))

  def _mel_input(self, mels: jax.Array) -> jax.Array:
    return model_lib.mel_to_input(mels, self.audio_arch.img_size, self.audio_arch.in_chans,
                                  model_lib.input_stats(self.audio_arch))

  @staticmethod
  def _waveform_input(wave: jax.Array) -> jax.Array:
    return wave

  def _compile(self, model: nnx.Module, prepare: Callable, tokens: bool = False) -> Callable:
    """A jitted ``params, batch -> features`` with replicated params and a sharded batch."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, self._replicated)

    def forward(state, batch):
      out_tokens, pooled = nnx.merge(graphdef, state)(prepare(batch))
      return out_tokens if tokens else pooled

    fn = jax.jit(forward)
    mesh = self.mesh

    batch_sh = NamedSharding(mesh, P("data"))

    def run(batch: np.ndarray) -> np.ndarray:
      with sharding.use_rules(mesh, sharding.DEFAULT_RULES):
        return np.asarray(fn(state, jax.device_put(batch, batch_sh)))

    return run

  def _batched(self, run: Callable, inputs: np.ndarray, batch: int, dim: int) -> np.ndarray:
    """Runs fixed-size batches (the last padded with zeros) and concatenates the results."""
    n = inputs.shape[0]
    if n == 0:
      return np.zeros((0, dim), np.float32)
    out = []
    for start in range(0, n, batch):
      chunk = inputs[start:start + batch]
      if chunk.shape[0] < batch:
        pad = np.zeros((batch - chunk.shape[0], *chunk.shape[1:]), chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      out.append(run(chunk)[:min(batch, n - start)])
    return np.concatenate(out).astype(np.float32)

  # --------------------------------------------------------------------------- public API

  def image_features(self, faces: np.ndarray) -> np.ndarray:
    """uint8 faces [N, S, S, 3] -> float32 pooled image features [N, image_dim]."""
    return self._batched(self._image, np.asarray(faces, np.uint8), self.batch_size,
                         self.image_dim)

  def mel_features(self, mels: np.ndarray) -> np.ndarray:
    """uint8 log-mel windows [N, n_mels, W] -> float32 audio features [N, audio_dim]."""
    if self.audio_from_waveform:
      raise ValueError("the audio encoder reads waveforms; use waveform_features")
    return self._batched(self._audio, np.asarray(mels, np.uint8), self.batch_size,
                         self.audio_dim)

  def waveform_columns(self, wave: np.ndarray, num_columns: int) -> np.ndarray:
    """Encoder frames 0..num_columns-1 (frame j centred on t = j * hop) of a 16 kHz track.

    Samples beyond the track are silence (zeros), so any number of columns can be asked for.
    """
    cfg = self.audio_arch
    feat = self.config.features
    hop, half = cfg.hop, cfg.receptive_field // 2
    chunk = max(1, int(round(feat.audio_chunk_seconds * SAMPLE_RATE / hop)))
    context = max(0, int(round(feat.audio_context_seconds * SAMPLE_RATE / hop)))
    num_chunks = max(1, -(-int(num_columns) // chunk))
    length = (chunk + 2 * context - 1) * hop + cfg.receptive_field
    # Sample s of the track sits at offset + s; chunk k reads from (k*chunk - context)*hop - half.
    offset = context * hop + half
    total = offset + num_chunks * chunk * hop + length
    track = np.zeros(total, np.float32)
    wave = np.asarray(wave, np.float32)[:max(0, total - offset)]
    track[offset:offset + wave.size] = wave
    starts = offset - half - context * hop + np.arange(num_chunks) * chunk * hop
    chunks = np.stack([track[s:s + length] for s in starts])
    frames = self._batched(lambda b: self._audio(b).reshape(b.shape[0], -1),
                           chunks, self.chunk_batch,
                           (chunk + 2 * context) * self.audio_dim)
    frames = frames.reshape(num_chunks, chunk + 2 * context, self.audio_dim)
    return frames[:, context:context + chunk].reshape(-1, self.audio_dim)[:num_columns]

  def waveform_features(self, wave: np.ndarray, fps, frames: np.ndarray) -> np.ndarray:
    """Per-video-frame audio features of a whole 16 kHz track.

    Args:
      wave: float32 mono at 16 kHz, sample 0 at the first video frame's time.
      fps: the video's exact frame rate (Fraction, or float).
      frames: 1-based frame numbers to return features for.

    Returns:
      float32 [len(frames), audio_dim]: for frame i, the mean of the encoder frames within
      ``audio_pool_seconds`` centred on t = (i - 1) / fps.
    """
    cfg = self.audio_arch
    feat = self.config.features
    frames = np.asarray(frames, np.int64)
    if frames.size == 0:
      return np.zeros((0, self.audio_dim), np.float32)
    if feat.audio_normalize:
      wave = normalize_waveform(wave)
    params = audio_features.FeatureParams(sample_rate=SAMPLE_RATE, hop_length=cfg.hop)
    centres = audio_features.centre_columns(fps, int(frames.max()), params)[frames - 1]
    width = max(1, int(round(feat.audio_pool_seconds * SAMPLE_RATE / cfg.hop)))
    needed = int(centres.max()) - width // 2 + width
    num_columns = max(audio_features.num_mel_columns(np.size(wave), params), needed)
    return pool_columns(self.waveform_columns(wave, num_columns), centres, width)

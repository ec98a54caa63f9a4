"""Audio features: a uint8 log-mel spectrogram per video, and one window of it per frame.

The builder and prediction both build windows with `frame_windows` (or `audio_windows`), so a
model sees the same input at training and at prediction time.

Pipeline, per video:

1. `load_audio`: decode the first audio track (`mfer_jax.media.decode`), average the channels, and
   resample with librosa to ``params.sample_rate``.
2. `compute_log_mel`: ``librosa.feature.melspectrogram`` (power 2, ``center=True``, so column j
   is centred on ``t = j * hop_length / sample_rate``), then ``power_to_db(ref=max)`` clipped at
   ``-top_db``, then dB in [-top_db, 0] mapped linearly to uint8 [0, 255]. A silent (all-zero)
   track gives all zeros, the same value as the padding beyond the ends.
3. `frame_windows`: frame i (1-based) of a video at ``fps`` is at ``t = (i - 1) / fps``; its
   window has ``window_frames`` columns and its centre column (index ``window_frames // 2``) is
   mel column ``round(t * sample_rate / hop_length)`` (round half up, computed exactly with
   fractions). Columns beyond either end of the track are 0 (silence).
"""

from __future__ import annotations

import dataclasses
import fractions
import os
from typing import Any, Mapping

import numpy as np

from mfer_jax.media import decode


@dataclasses.dataclass(frozen=True)
class FeatureParams:
  """Log-mel parameters; the defaults are written to every dataset's metadata.json.

  Attributes:
    sample_rate: audio is resampled to this rate (Hz) before the mel.
    n_fft: FFT size in samples.
    hop_length: samples between mel columns (320 at 16 kHz = 20 ms, 50 columns/s).
    n_mels: mel bins.
    fmin, fmax: mel filter bank range in Hz.
    window_seconds: audio context per frame, centred on the frame time.
    top_db: dynamic range kept below each video's loudest bin (ref=max per video).
  """

  sample_rate: int = 16000
  n_fft: int = 1024
  hop_length: int = 320
  n_mels: int = 64
  fmin: float = 0.0
  fmax: float = 8000.0
  window_seconds: float = 2.0
  top_db: float = 80.0

  def __post_init__(self):
    for name in ("sample_rate", "n_fft", "hop_length", "n_mels", "window_seconds", "top_db"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if not 0 <= self.fmin < self.fmax:
      raise ValueError(f"need 0 <= fmin < fmax, got fmin={self.fmin} fmax={self.fmax}")
    if self.window_frames < 1:
      raise ValueError(f"window_seconds={self.window_seconds} gives no mel column")
    if self.fmax > self.sample_rate / 2:
      raise ValueError(f"fmax={self.fmax} is above the Nyquist frequency of "
                       f"sample_rate={self.sample_rate}")

  @property
  def window_frames(self) -> int:
    """Mel columns per window: round(window_seconds * sample_rate / hop_length)."""
    return int(round(self.window_seconds * self.sample_rate / self.hop_length))

  def to_dict(self) -> dict[str, Any]:
    """The ``features`` entry of metadata.json (plus the derived window_frames)."""
    d = dataclasses.asdict(self)
    d["window_frames"] = self.window_frames
    d["ref"] = "max"
    d["quantisation"] = "uint8: dB in [-top_db, 0] -> [0, 255]"
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "FeatureParams":
    """Inverse of `to_dict`; unknown keys (face_size, derived values) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def load_audio(path: str | os.PathLike, params: FeatureParams,
               video_start_time: float | None = None) -> tuple[np.ndarray, int]:
  """Decodes a media file's audio as float32 mono at ``params.sample_rate``.

  Returns:
    (samples, original sample rate); (empty array, 0) when the file has no audio track.

  Raises:
    decode.MediaError: if the audio cannot be decoded.
  """
  audio, rate = decode.decode_audio(path, video_start_time)
  return resample(audio, rate, params), rate


def resample(audio: np.ndarray, rate: int, params: FeatureParams) -> np.ndarray:
  """Resamples float mono audio from ``rate`` to ``params.sample_rate`` with librosa."""
  import librosa  # pylint: disable=g-import-not-at-top  (slow import, only where needed)

  audio = np.asarray(audio, np.float32)
  if rate and rate != params.sample_rate and audio.size:
    audio = librosa.resample(audio, orig_sr=rate, target_sr=params.sample_rate)
  return audio.astype(np.float32, copy=False)


def num_mel_columns(num_samples: int, params: FeatureParams) -> int:
  """Columns that librosa's centred STFT gives for ``num_samples`` samples."""
  return 1 + num_samples // params.hop_length


def compute_log_mel(audio: np.ndarray, params: FeatureParams) -> np.ndarray:
  """uint8 log-mel [n_mels, n_columns] of a whole track (float mono at params.sample_rate)."""
  import librosa  # pylint: disable=g-import-not-at-top

  audio = np.asarray(audio, np.float32)
  n_cols = num_mel_columns(audio.size, params)
  if audio.size == 0 or not np.any(audio):
    # ref=max of an all-zero track would make silence 0 dB (loudest): keep it at the floor.
    return np.zeros((params.n_mels, n_cols), np.uint8)
  power = librosa.feature.melspectrogram(
      y=audio, sr=params.sample_rate, n_fft=params.n_fft, hop_length=params.hop_length,
      n_mels=params.n_mels, fmin=params.fmin, fmax=params.fmax, center=True, power=2.0)
  db = librosa.power_to_db(power, ref=np.max, top_db=params.top_db)
  return quantise_db(db, params)


def quantise_db(db: np.ndarray, params: FeatureParams) -> np.ndarray:
  """dB in [-top_db, 0] -> uint8 [0, 255] (linear, rounded, clipped)."""
  scaled = (np.asarray(db, np.float64) + params.top_db) * (255.0 / params.top_db)
  return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def dequantise_db(q: np.ndarray, params: FeatureParams) -> np.ndarray:
  """uint8 [0, 255] -> dB in [-top_db, 0]; the inverse of `quantise_db` up to half a step."""
  return np.asarray(q, np.float32) * (params.top_db / 255.0) - params.top_db


def centre_columns(fps: fractions.Fraction | float, num_frames: int,
                   params: FeatureParams) -> np.ndarray:
  """Mel column at the time of each frame: round_half_up((i - 1) / fps * sr / hop), int64 [N].

  Computed with exact fractions so that 30000/1001 fps never drifts by a column.
  """
  fps = fractions.Fraction(fps).limit_denominator(1_000_000) if isinstance(fps, float) \
      else fractions.Fraction(fps)
  # column(i) = floor(((i-1) * sr * den / (num * hop)) + 1/2) = floor((2 a + b) / (2 b)).
  a = np.arange(num_frames, dtype=np.int64) * (params.sample_rate * fps.denominator)
  b = fps.numerator * params.hop_length
  return (2 * a + b) // (2 * b)



def frame_window(mel: np.ndarray, t_seconds: float, params: FeatureParams) -> np.ndarray:
  """The window [n_mels, window_frames] centred on time ``t_seconds`` (a copy)."""
  centre = int(np.floor(t_seconds * params.sample_rate / params.hop_length + 0.5))
  return window_at(mel, centre, params)


def window_at(mel: np.ndarray, centre: int, params: FeatureParams) -> np.ndarray:
  """The window whose column ``window_frames // 2`` is mel column ``centre`` (a copy)."""
  w = params.window_frames
  start = centre - w // 2
  out = np.zeros((mel.shape[0], w), np.uint8)
  lo, hi = max(start, 0), min(start + w, mel.shape[1])
  if hi > lo:
    out[:, lo - start:hi - start] = mel[:, lo:hi]
  return out


class FrameWindows:
  """Cheap per-frame windows of one video: ``windows[i]`` is frame i+1's [n_mels, W] view.

  The mel is padded once; each window is a strided view (copy it if you keep it).
  """

  def __init__(self, mel: np.ndarray, fps: fractions.Fraction | float, num_frames: int,
               params: FeatureParams):
    w = params.window_frames
    self.params = params
    self.centres = centre_columns(fps, num_frames, params)
    # Centres far beyond the track (a track much shorter than the video) would fall off the
    # padding: clamp them to the padding, whose windows are silence anyway.
    self._starts = np.clip(self.centres - w // 2 + w, 0, mel.shape[1] + w)
    self._padded = np.pad(mel, ((0, 0), (w, w)))

  def __len__(self) -> int:
    return int(self.centres.shape[0])

  def __getitem__(self, i: int) -> np.ndarray:
    s = int(self._starts[i])
    return self._padded[:, s:s + self.params.window_frames]


def frame_windows(mel: np.ndarray, fps: fractions.Fraction | float, num_frames: int,
                  params: FeatureParams) -> FrameWindows:
  """Windows for frames 1..num_frames of a video at ``fps`` from its whole-track mel."""
  return FrameWindows(mel, fps, num_frames, params)


def audio_windows(audio: np.ndarray, fps: fractions.Fraction | float, num_frames: int,
                  params: FeatureParams) -> FrameWindows:
  """(audio at params.sample_rate, fps, num_frames) -> every frame's window, mel computed once."""
  return FrameWindows(compute_log_mel(audio, params), fps, num_frames, params)

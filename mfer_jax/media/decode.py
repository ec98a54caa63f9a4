"""Reads video files with PyAV: probe (rates, counts) and decode (frames, audio track).

Shared by the builder and by prediction, so both see the same frame count, frame times and
audio samples for a file.

Timing rules (the builder's audio alignment relies on them):

- ``fps`` is the video stream's average frame rate as an exact `fractions.Fraction`
  (29.97 is 30000/1001). If the container gives none, the codec's guessed rate, then its base
  rate is used.
- The i-th decoded frame (1-based) is at ``t = (i - 1) / fps``, measured from the first video
  frame. Frame pts are not used for this: Aff-Wild2's files are constant-rate, and a stream
  with irregular pts (variable frame rate) still gets the constant-rate times, which is what
  the annotations (one line per decoded frame) assume.
- Audio sample 0 of `decode_audio` is at the same t = 0. If the audio stream starts later
  than the first video frame, silence is prepended; if it starts earlier, the leading samples
  are dropped (both taken from the first packets' pts, so encoder priming that the container
  declares is honoured).
"""

from __future__ import annotations

import dataclasses
import fractions
import os
from typing import Iterator

import av
import numpy as np

from mfer_jax import errors

# File extensions searched for media, in order of preference (Aff-Wild2 has .mp4 and .avi).
MEDIA_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".flv", ".mov", ".m4v")


class MediaError(errors.UserError, RuntimeError):
  """A media file that cannot be opened or decoded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class MediaInfo:
  """What the builder needs to know about one media file.

  Attributes:
    path: the file.
    fps: exact average frame rate.
    num_frames: number of decoded video frames.
    duration: num_frames / fps, in seconds.
    sample_rate: audio sample rate in Hz, or 0 without an audio track.
    channels: audio channels, or 0 without an audio track.
    video_codec, audio_codec: codec names ("" when absent).
    start_time: pts time (s) of the first decoded video frame.
  """

  path: str
  fps: fractions.Fraction
  num_frames: int
  duration: float
  sample_rate: int
  channels: int
  video_codec: str
  audio_codec: str
  start_time: float

  @property
  def has_audio(self) -> bool:
    return self.sample_rate > 0


def open_media(path: str | os.PathLike):
  """Opens a media file with PyAV; a MediaError names the file if it cannot be opened."""
  try:
    return av.open(str(path))
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise MediaError(f"{path}: cannot open media file ({e})") from e


def video_stream(container, path):
  """The first video stream of an open container (MediaError naming the file if none)."""
  if not container.streams.video:
    raise MediaError(f"{path}: has no video stream")
  return container.streams.video[0]


def frame_rate(stream, path) -> fractions.Fraction:
  """The video stream's exact frame rate: average, else guessed, else base rate."""
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate:
      return fractions.Fraction(rate.numerator, rate.denominator)
  raise MediaError(f"{path}: the video stream declares no frame rate")


def probe(path: str | os.PathLike) -> MediaInfo:
  """Reads the rates and counts frames by decoding every video frame (no pixel conversion).

  Raises:
    MediaError: if the file cannot be opened, has no video stream, or decodes to no frames.
  """
  with open_media(path) as container:
    stream = video_stream(container, path)
    fps = frame_rate(stream, path)
    video_codec = stream.codec_context.name
    audio = container.streams.audio[0] if container.streams.audio else None
    sample_rate = int(audio.codec_context.sample_rate or 0) if audio is not None else 0
    channels = int(audio.codec_context.channels or 0) if audio is not None else 0
    audio_codec = audio.codec_context.name if audio is not None else ""
    num_frames = 0
    start_time = None
    try:
      for frame in container.decode(stream):
        if start_time is None:
          start_time = float(frame.time) if frame.time is not None else 0.0
        num_frames += 1
    except av.error.FFmpegError as e:
      raise MediaError(f"{path}: video decoding failed after {num_frames} frames ({e})") from e
  if num_frames == 0:
    raise MediaError(f"{path}: no video frame could be decoded")
  return MediaInfo(path=str(path), fps=fps, num_frames=num_frames,
                   duration=float(num_frames / fps), sample_rate=sample_rate,
                   channels=channels, video_codec=video_codec, audio_codec=audio_codec,
                   start_time=start_time or 0.0)


def decode_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
  """Yields the video frames as uint8 RGB [H, W, 3], in decode order (= display order).

  Raises:
    MediaError: if the file cannot be opened or decoding fails.
  """
  with open_media(path) as container:
    stream = video_stream(container, path)
    stream.thread_type = "AUTO"
    try:
      for frame in container.decode(stream):
        yield frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
      raise MediaError(f"{path}: video decoding failed ({e})") from e


class TolerantFrames:
  """Every video frame of a file as (1-based number, uint8 RGB [H, W, 3] or None), in order.

  A packet that fails to decode stands for one unreadable frame (``None``), so the frame
  count, and every later frame's time, stay right after a corrupt frame in the middle (unlike
  `decode_frames`, which stops). Prediction and face tracking read videos this way:

      frames = TolerantFrames(path)
      for number, rgb in frames:
        ...
      frames.fps, frames.start_time, frames.num_frames, frames.unreadable

  The attributes are complete once the iteration has finished; each iteration decodes the
  file again.

  Raises (while iterating):
    MediaError: if the file cannot be opened, has no video stream or no decodable frame.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    self.fps: fractions.Fraction | None = None
    self.start_time = 0.0
    self.num_frames = 0
    self.unreadable: list[int] = []

  def __iter__(self) -> Iterator[tuple[int, np.ndarray | None]]:
    number, start, unreadable = 0, None, []
    with open_media(self.path) as container:
      stream = video_stream(container, self.path)
      self.fps = frame_rate(stream, self.path)
      for packet in container.demux(stream):
        try:
          decoded = packet.decode()
        except av.error.FFmpegError:
          if packet.size:                    # the empty flush packet is not a frame
            number += 1
            unreadable.append(number)
            yield number, None
          continue
        for f in decoded:
          number += 1
          if start is None and f.time is not None:
            start = float(f.time)
          yield number, f.to_ndarray(format="rgb24")
      try:
        remaining = stream.decode(None)
      except av.error.FFmpegError:
        remaining = []
      for f in remaining:
        number += 1
        yield number, f.to_ndarray(format="rgb24")
    if number == 0:
      raise MediaError(f"{self.path}: no video frame could be decoded")
    self.start_time, self.num_frames, self.unreadable = start or 0.0, number, unreadable


def decode_audio(path: str | os.PathLike,
                 video_start_time: float | None = None) -> tuple[np.ndarray, int]:
  """Decodes the whole first audio track as float32 mono (channel mean) at its own rate.

  Args:
    path: the media file.
    video_start_time: pts time of the first video frame (`MediaInfo.start_time`); the audio is
      shifted so that sample 0 is at that time. None: no shift.

  Returns:
    (samples float32 [n], sample_rate); (empty array, 0) when the file has no audio track.

  Raises:
    MediaError: if the file cannot be opened or the audio cannot be decoded.
  """
  with open_media(path) as container:
    if not container.streams.audio:
      return np.zeros(0, np.float32), 0
    stream = container.streams.audio[0]
    sample_rate = int(stream.codec_context.sample_rate)
    # Planar float whatever the codec's sample format (s16 PCM, fltp AAC, s16p MP3); the
    # channels are averaged here rather than by swresample's downmix, which scales by 1/sqrt(2).
    resampler = av.AudioResampler(format="fltp", rate=sample_rate)
    chunks = []
    first_time = None
    try:
      for frame in container.decode(stream):
        if first_time is None and frame.time is not None:
          first_time = float(frame.time)
        for out in resampler.resample(frame):
          chunks.append(out.to_ndarray().mean(axis=0))
      for out in resampler.resample(None):
        chunks.append(out.to_ndarray().mean(axis=0))
    except av.error.FFmpegError as e:
      raise MediaError(f"{path}: audio decoding failed ({e})") from e
  audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
  if video_start_time is not None and first_time is not None:
    shift = int(round((first_time - video_start_time) * sample_rate))
    if shift > 0:
      audio = np.concatenate([np.zeros(shift, np.float32), audio])
    elif shift < 0:
      audio = audio[-shift:]
  return audio, sample_rate

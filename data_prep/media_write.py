"""Writes a video file (frames plus an optional audio track) with PyAV.

Used by the synthetic dataset generator and by tests that need media with known content (an
audio click at a known frame time, an exact 30000/1001 frame rate).

Timing contract, which the builder's frame/audio alignment relies on:

- frame i (0-based) has pts i in the stream time base 1/fps, so it is shown at t = i / fps;
  ``fps`` is kept as an exact `fractions.Fraction` (29.97 is 30000/1001, not 29.97);
- audio sample k is at t = k / sample_rate, so the audio starts at t = 0 together with frame 1.
  AAC's encoder delay (priming samples) is recorded by the muxer (an edit list in .mp4), so the
  decoded audio also starts at pts 0;
- audio and video are fed to the muxer interleaved in time order.

Output is deterministic for the same input and PyAV version: libx264 runs single-threaded
(multi-threaded x264 makes rate-control decisions that depend on thread timing), and no
creation time is written. The file is written under a temporary name and renamed when
complete, so an interrupted write never leaves a file that looks finished.
"""

from __future__ import annotations

import fractions
import os
import pathlib
from typing import Iterable

import av
import numpy as np

# Container format per file extension (the temporary name has no usable extension).
_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".avi": "avi", ".mkv": "matroska"}
# Default codec pair per extension: Aff-Wild2 holds H.264/AAC .mp4 and MPEG-4/PCM .avi files.
_DEFAULT_CODECS = {"mp4": ("h264", "aac"), "mov": ("h264", "aac"), "avi": ("mpeg4", "pcm_s16le"),
                   "matroska": ("h264", "aac")}
# PyAV names the H.264 encoder after the library that implements it.
_ENCODER_NAMES = {"h264": "libx264"}


def as_fraction(fps: float | fractions.Fraction | str) -> fractions.Fraction:
  """Turns a frame rate into an exact fraction; 29.97 and 23.976 become 30000/1001, 24000/1001.

  Args:
    fps: a Fraction, an int, a float or a string such as "30000/1001".

  Returns:
    The exact rate. Floats within 1e-3 of an NTSC rate (N*1000/1001) map to that rate; other
    floats are limited to a denominator of 1001.

  Raises:
    ValueError: if the rate is not positive.
  """
  rate = fractions.Fraction(fps).limit_denominator(1001)
  if isinstance(fps, float):
    ntsc = fractions.Fraction(round(fps * 1001 / 1000) * 1000, 1001)
    if abs(float(ntsc) - fps) < 1e-3:
      rate = ntsc
  if rate <= 0:
    raise ValueError(f"fps must be positive, got {fps!r}")
  return rate


def _temporary_path(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _audio_frame(chunk: np.ndarray, codec_format: str, layout: str, sample_rate: int,
                 pts: int) -> av.AudioFrame:
  """Builds an AudioFrame from float samples [n, channels] in [-1, 1] for the encoder format."""
  if codec_format == "s16":  # packed int16: one plane, channels interleaved
    data = (np.clip(chunk, -1.0, 1.0) * 32767.0).round().astype(np.int16).reshape(1, -1)
  elif codec_format == "fltp":  # planar float: one plane per channel
    data = np.ascontiguousarray(chunk.T, dtype=np.float32)
  elif codec_format == "flt":
    data = np.ascontiguousarray(chunk, dtype=np.float32).reshape(1, -1)
  else:
    raise ValueError(f"audio sample format {codec_format!r} is not supported here")
  frame = av.AudioFrame.from_ndarray(data, format=codec_format, layout=layout)
  frame.sample_rate = sample_rate
  frame.pts = pts
  frame.time_base = fractions.Fraction(1, sample_rate)
  return frame


class _AudioFeeder:
  """Encodes the audio track in chunks, so it can be interleaved with the video frames."""

  def __init__(self, container, audio: np.ndarray, sample_rate: int, codec: str):
    if audio.ndim == 1:
      audio = audio[:, None]
    if audio.ndim != 2 or audio.shape[1] not in (1, 2):
      raise ValueError(f"audio must be [n] or [n, 1|2] samples, got shape {audio.shape}")
    self.samples = np.asarray(audio, dtype=np.float32)
    self.sample_rate = int(sample_rate)
    layout = "mono" if audio.shape[1] == 1 else "stereo"
    self.stream = container.add_stream(codec, rate=self.sample_rate, layout=layout)
    self.layout = layout
    self.format = self.stream.codec_context.format.name
    # AAC takes exactly frame_size samples per frame (the last may be shorter); PCM takes any.
    self.frame_size = self.stream.codec_context.frame_size or 1024
    self.container = container
    self.written = 0

  def feed_until(self, num_samples: int) -> None:
    """Encodes whole encoder frames until at least ``num_samples`` samples are written."""
    total = len(self.samples)
    num_samples = min(num_samples, total)
    while self.written < num_samples:
      end = min(self.written + self.frame_size, total)
      frame = _audio_frame(self.samples[self.written:end], self.format, self.layout,
                           self.sample_rate, self.written)
      self.container.mux(self.stream.encode(frame))
      self.written = end

  def finish(self) -> None:
    self.feed_until(len(self.samples))
    self.container.mux(self.stream.encode(None))


def write_video(path: str | os.PathLike,
                frames: Iterable[np.ndarray] | np.ndarray,
                fps: float | fractions.Fraction | str,
                audio: np.ndarray | None = None,
                sample_rate: int = 16000,
                video_codec: str | None = None,
                audio_codec: str | None = None,
                crf: int = 23,
                preset: str = "veryfast",
                bit_rate: int = 1_000_000) -> pathlib.Path:
  """Writes frames (and audio) to a video file, via a temporary name and a rename.

  Args:
    path: output file; the extension picks the container (.mp4, .avi, .mkv, .mov).
    frames: uint8 RGB frames [H, W, 3], as an array [T, H, W, 3] or any iterable (a generator
      keeps memory flat). H and W must be even (yuv420p).
    fps: frame rate; a Fraction, "30000/1001", or a float (29.97 becomes 30000/1001).
    audio: optional float samples in [-1, 1], [n] mono or [n, 2] stereo, at ``sample_rate``.
      Sample 0 plays at t = 0 together with the first frame.
    sample_rate: audio sample rate in Hz.
    video_codec: "h264" or "mpeg4" (any PyAV encoder name works); default by extension:
      .mp4/.mov/.mkv -> h264, .avi -> mpeg4.
    audio_codec: "aac" or "pcm_s16le" (or another PyAV encoder); default by extension:
      .mp4/.mov/.mkv -> aac, .avi -> pcm_s16le.
    crf: H.264 constant rate factor (lower is better quality).
    preset: x264 speed preset.
    bit_rate: target bit rate for non-H.264 video codecs (mpeg4), in bit/s.

  Returns:
    The path written.

  Raises:
    ValueError: on an unknown extension, a bad frame shape or dtype, or no frames.
  """
  path = pathlib.Path(path)
  container_format = _FORMATS.get(path.suffix.lower())
  if container_format is None:
    raise ValueError(f"unknown video extension {path.suffix!r}; use one of {sorted(_FORMATS)}")
  default_video, default_audio = _DEFAULT_CODECS[container_format]
  video_codec = video_codec or default_video
  audio_codec = audio_codec or default_audio
  rate = as_fraction(fps)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _temporary_path(path)
  try:
    _write(tmp, container_format, iter(frames), rate, audio, sample_rate,
           _ENCODER_NAMES.get(video_codec, video_codec), audio_codec, crf, preset, bit_rate)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def _write(tmp, container_format, frames, rate, audio, sample_rate, video_codec, audio_codec,
           crf, preset, bit_rate) -> None:
  """The body of `write_video`, writing to ``tmp``."""
  first = next(frames, None)
  if first is None:
    raise ValueError("no frames to write")
  height, width = _check_frame(first, None)
  if height % 2 or width % 2:
    raise ValueError(f"frame size must be even for yuv420p, got {width}x{height}")
  # No creation_time or encoder string with a date: the output must be byte-reproducible.
  with av.open(str(tmp), mode="w", format=container_format,
               options={"fflags": "+bitexact"}) as container:
    video = container.add_stream(video_codec, rate=rate)
    video.width, video.height, video.pix_fmt = width, height, "yuv420p"
    video.time_base = 1 / rate
    video.codec_context.thread_count = 1
    if video_codec == "libx264":
      video.options = {"crf": str(crf), "preset": preset, "threads": "1"}
    else:
      video.bit_rate = bit_rate
    feeder = None
    if audio is not None:
      feeder = _AudioFeeder(container, np.asarray(audio), sample_rate, audio_codec)
    index = 0
    frame = first
    while frame is not None:
      if feeder is not None:  # audio up to the end of this frame goes first: time order
        feeder.feed_until(int((index + 1) * sample_rate / rate))
      vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
      vf.pts = index
      container.mux(video.encode(vf))
      index += 1
      frame = next(frames, None)
      if frame is not None:
        _check_frame(frame, (height, width))
    container.mux(video.encode(None))
    if feeder is not None:
      feeder.finish()


def _check_frame(frame: np.ndarray, size: tuple[int, int] | None) -> tuple[int, int]:
  frame = np.asarray(frame)
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
    raise ValueError(f"frames must be uint8 RGB [H, W, 3], got {frame.dtype} {frame.shape}")
  if size is not None and frame.shape[:2] != size:
    raise ValueError(f"frame size changed from {size} to {frame.shape[:2]}")
  return frame.shape[:2]

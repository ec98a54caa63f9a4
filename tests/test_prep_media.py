"""decode.probe / decode_audio across containers and codecs, with a click to check timing."""

import fractions

import av
import numpy as np
import pytest

from mfer_jax.media import decode

SR = 48000


def _write(path, fmt, vcodec, acodec, fps, n=30, audio_format="fltp"):
  """A minimal PyAV writer for containers data_prep.media_write does not cover."""
  rate = fractions.Fraction(fps)
  samples = np.zeros(int(n / rate * SR), np.float32)
  click = int(round(10 / rate * SR))   # frame 11
  samples[click:click + 96] = 0.9
  with av.open(str(path), "w", format=fmt) as out:
    v = out.add_stream(vcodec, rate=rate)
    v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
    a = out.add_stream(acodec, rate=SR, layout="mono")
    fmt_a = a.codec_context.format.name
    size = a.codec_context.frame_size or 1024
    for i in range(0, samples.size, size):
      chunk = samples[i:i + size]
      if fmt_a in ("s16", "s16p"):
        data = (chunk * 32767).astype(np.int16)[None]
      elif fmt_a in ("s32", "s32p"):   # libmp3lame
        data = (chunk * 2147483647.0).astype(np.int32)[None]
      else:
        data = chunk[None]
      frame = av.AudioFrame.from_ndarray(data, format=fmt_a, layout="mono")
      frame.sample_rate, frame.pts = SR, i
      frame.time_base = fractions.Fraction(1, SR)
      out.mux(a.encode(frame))
    out.mux(a.encode(None))
    for i in range(n):
      vf = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * i, np.uint8), format="rgb24")
      vf.pts = None
      out.mux(v.encode(vf))
    out.mux(v.encode(None))
  return click


@pytest.mark.parametrize("ext,fmt,vcodec,acodec", [
    (".mkv", "matroska", "libx264", "libmp3lame"),
    (".webm", "webm", "libvpx", "libopus"),
    (".webm", "webm", "libvpx-vp9", "libopus"),
    (".flv", "flv", "flv", "libmp3lame"),
    (".avi", "avi", "mpeg4", "pcm_s16le"),
])
def test_probe_and_audio_across_formats(tmp_path, ext, fmt, vcodec, acodec):
  path = tmp_path / f"clip{ext}"
  click = _write(path, fmt, vcodec, acodec, fps=25)
  info = decode.probe(path)
  assert info.num_frames == 30 and info.fps == 25 and info.sample_rate == SR
  assert info.duration == pytest.approx(1.2) and info.has_audio
  audio, rate = decode.decode_audio(path, info.start_time)
  assert rate == SR and audio.dtype == np.float32 and audio.ndim == 1
  # Lossy codecs smear a click, but its energy stays within a few ms of where it was put.
  peak = int(np.argmax(np.convolve(audio ** 2, np.ones(96), "same")))
  assert abs(peak - (click + 48)) < SR // 200, (peak, click)
  frames = list(decode.decode_frames(path))
  assert len(frames) == 30 and frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8


def test_errors_name_the_file(tmp_path):
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"garbage" * 10)
  with pytest.raises(decode.MediaError, match="bad.mp4"):
    decode.probe(bad)
  with pytest.raises(decode.MediaError, match="missing.avi"):
    decode.probe(tmp_path / "missing.avi")

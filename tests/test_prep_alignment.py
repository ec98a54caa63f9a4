"""Audio/frame alignment: a click at frame k's time peaks at the centre of frame k's window.

Videos at 30, 29.97 (30000/1001), 25 and 10 fps with audio at 16, 44.1 and 48 kHz, in .mp4
(H.264 + AAC, whose encoder delay must be undone) and .avi (MPEG-4 + PCM), go through the real
builder; the record of the clicked frame is read back from its shard.
"""

import fractions

import numpy as np
import pytest
from array_record.python import array_record_module

import prep_raw
from data_prep import build
from mfer_jax.data import records
from mfer_jax.data import store

# (name, fps, sample rate, extension, clicked 1-based frame)
CASES = [
    ("fps30_sr48k", "30", 48000, ".mp4", 31),
    ("fps2997_sr44k", "30000/1001", 44100, ".mp4", 47),
    ("fps2997_sr48k_avi", "30000/1001", 48000, ".avi", 58),
    ("fps25_sr44k_avi", "25", 44100, ".avi", 33),
    ("fps10_sr16k", "10", 16000, ".mp4", 13),
    ("fps30_first_frame", "30", 48000, ".mp4", 1),
]


def _click_audio(num_frames, fps, sample_rate, frame):
  """Quiet noise plus a 2 ms burst starting at t = (frame - 1) / fps."""
  rng = np.random.default_rng(frame)
  n = int(num_frames / fps * sample_rate)
  audio = 0.001 * rng.standard_normal(n)
  start = int(round((frame - 1) / fps * sample_rate))
  width = sample_rate // 500
  audio[start:start + width] = 0.8 * rng.choice([-1.0, 1.0], width)
  return audio.astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("raw")
  out = tmp_path_factory.mktemp("data")
  for name, fps, sr, ext, frame in CASES:
    rate = fractions.Fraction(fps)
    n = int(3 * rate)   # 3 s: clicks sit away from the end
    prep_raw.write_media(root / "batch1" / f"{name}{ext}", n, fps=rate, sample_rate=sr,
                         audio=_click_audio(n, rate, sr, frame))
    prep_raw.write_annotation(root, "train", name, [0] * n)
  build.build(root, out, splits=["train"], workers=1, log=None)
  return out


@pytest.mark.parametrize("name,fps,sr,ext,frame", CASES, ids=[c[0] for c in CASES])
def test_click_peaks_at_window_centre(built, name, fps, sr, ext, frame):
  meta = store.load_metadata(built)
  assert meta["videos"][name]["sample_rate"] == sr
  assert fractions.Fraction(meta["videos"][name]["fps_fraction"]) == fractions.Fraction(fps)
  reader = array_record_module.ArrayRecordReader(
      str(store.shard_path(built, "train", name)))
  rec = records.decode_record(reader.read([frame - 1])[0])
  assert rec["frame"] == frame
  energy = rec["mel"].astype(np.int64).sum(axis=0)
  centre = meta["features"]["window_frames"] // 2
  assert abs(int(np.argmax(energy)) - centre) <= 1, (energy[centre - 3:centre + 4], centre)
  # And the neighbouring frame's window has the click off-centre by its frame step.
  other = records.decode_record(reader.read([frame])[0])["mel"].astype(np.int64).sum(axis=0)
  step = 16000 / 320 / float(fractions.Fraction(fps))
  assert abs(int(np.argmax(other)) - (centre - step)) <= 1

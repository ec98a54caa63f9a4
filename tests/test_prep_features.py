"""Log-mel features: librosa as the independent reference, quantisation, frame-time windows."""

import fractions

import librosa
import numpy as np
import pytest

from mfer_jax.media import audio_features

P = audio_features.FeatureParams()


def test_defaults_and_metadata_round_trip():
  assert (P.sample_rate, P.n_fft, P.hop_length, P.n_mels, P.window_frames) == \
      (16000, 1024, 320, 64, 100)
  d = P.to_dict()
  assert d["window_frames"] == 100 and d["top_db"] == 80
  assert audio_features.FeatureParams.from_dict({**d, "face_size": 112}) == P
  with pytest.raises(ValueError):
    audio_features.FeatureParams(fmax=9000)   # above Nyquist at 16 kHz
  with pytest.raises(ValueError, match="hop_length"):
    audio_features.FeatureParams(hop_length=0)


def test_log_mel_matches_librosa_reference():
  rng = np.random.default_rng(0)
  t = np.arange(16000 * 2) / 16000
  audio = (0.3 * np.sin(2 * np.pi * 300 * t) * (t > 0.5)
           + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
  got = audio_features.compute_log_mel(audio, P)
  # Reference written out from librosa's primitives, not through our code path.
  stft = np.abs(librosa.stft(audio, n_fft=1024, hop_length=320, center=True)) ** 2
  mel = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0, fmax=8000) @ stft
  db = 10 * np.log10(np.maximum(mel, 1e-10)) - 10 * np.log10(max(mel.max(), 1e-10))
  ref = np.clip(np.round((np.maximum(db, -80) + 80) / 80 * 255), 0, 255)
  assert got.dtype == np.uint8 and got.shape == ref.shape == (64, 1 + audio.size // 320)
  assert np.abs(got.astype(int) - ref).max() <= 1
  assert got.max() == 255 and got[:, :20].mean() < got[:, 40:].mean()


def test_silence_is_zero_not_loudest():
  assert not audio_features.compute_log_mel(np.zeros(16000, np.float32), P).any()
  assert audio_features.compute_log_mel(np.zeros(0, np.float32), P).shape == (64, 1)


def test_quantisation_round_trip():
  db = np.linspace(-80, 0, 1001)
  q = audio_features.quantise_db(db, P)
  assert q[0] == 0 and q[-1] == 255
  np.testing.assert_allclose(audio_features.dequantise_db(q, P), db, atol=80 / 255 / 2 + 1e-4)
  np.testing.assert_array_equal(audio_features.quantise_db(audio_features.dequantise_db(
      np.arange(256, dtype=np.uint8), P), P), np.arange(256))
  assert audio_features.quantise_db(np.array([-200.0, 5.0]), P).tolist() == [0, 255]


@pytest.mark.parametrize("fps", [fractions.Fraction(30), fractions.Fraction(30000, 1001),
                                 fractions.Fraction(25), fractions.Fraction(10)])
def test_centre_columns_are_exact_frame_times(fps):
  # Every frame of a 70-minute video: at 29.97 fps frames 301, 901, ... sit exactly between
  # two columns, and float64 rounds frame 123301 the wrong way (docs/alignment.md).
  n = 126000
  cols = audio_features.centre_columns(fps, n, P)
  half = fractions.Fraction(1, 2)
  expected = [int(fractions.Fraction(k) / fps * 16000 / 320 + half) for k in range(n)]
  assert cols.tolist() == expected   # floor(x + 1/2) with exact fractions


def test_windows_centre_and_silent_padding():
  mel = np.arange(1, 301, dtype=np.uint8)[None, :].repeat(2, 0)   # column j holds j + 1
  windows = audio_features.frame_windows(mel, 50, 400, P)         # 50 fps: 1 column/frame
  assert len(windows) == 400
  w0 = windows[0]
  assert w0.shape == (2, 100) and w0[0, 50] == 1 and not w0[:, :50].any()
  assert windows[120][0, 50] == 121
  np.testing.assert_array_equal(windows[120], audio_features.frame_window(mel, 120 / 50, P))
  assert windows[299][0, 50] == 300 % 256 and not windows[299][:, 51:].any()
  assert not windows[399].any()   # frames beyond the track: silence

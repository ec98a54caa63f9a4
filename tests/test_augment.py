"""Host augmentations: shapes and dtypes kept, each op does what it says, seeded = repeatable."""

import cv2
import numpy as np

from mfer_jax.data import augment
from mfer_jax.data import config


def _rng(seed=0):
  return np.random.default_rng(seed)


def _face():
  return _rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)


def test_random_resized_crop_matches_crop_then_resize():
  face = _face()
  out = augment.random_resized_crop(face, _rng(3), (0.5, 0.6), (3 / 4, 4 / 3))
  assert out.shape == face.shape and out.dtype == np.uint8
  # Replay the documented recipe with the same random numbers (first try always fits here).
  r = _rng(3)
  target = 112 * 112 * r.uniform(0.5, 0.6)
  aspect = np.exp(r.uniform(np.log(3 / 4), np.log(4 / 3)))
  cw, ch = round(np.sqrt(target * aspect)), round(np.sqrt(target / aspect))
  top, left = r.integers(0, 112 - ch + 1), r.integers(0, 112 - cw + 1)
  ref = cv2.resize(np.ascontiguousarray(face[top:top + ch, left:left + cw]), (112, 112),
                   interpolation=cv2.INTER_LINEAR)
  np.testing.assert_array_equal(out, ref)
  # An impossible box (area > image) falls back to the full image.
  full = augment.random_resized_crop(face, _rng(0), (2.0, 2.0), (1.0, 1.0))
  np.testing.assert_array_equal(full, face)


def test_color_jitter_factors():
  face = _face()
  # Zero amounts: identity.
  np.testing.assert_array_equal(augment.color_jitter(face, _rng(), 0, 0, 0), face)
  # Brightness only: x * b, saturated; b is the documented uniform draw.
  b = _rng(5).uniform(0.5, 1.5)
  ref = np.clip(np.round(face * b), 0, 255)
  got = augment.color_jitter(face, _rng(5), 0.5, 0, 0).astype(float)
  assert np.abs(got - ref).max() <= 1
  # Saturation 0 factor range [0, 2]: a grey image is unchanged by any saturation factor.
  grey = np.repeat(face[..., :1], 3, axis=2)
  np.testing.assert_array_equal(augment.color_jitter(grey, _rng(2), 0, 0, 1.0), grey)


def test_spec_masks_zero_whole_bands_within_limits():
  mel = np.full((64, 100), 200, np.uint8)
  mel.flags.writeable = False   # records hand out read-only views
  for seed in range(20):
    out = augment.spec_masks(mel, _rng(seed), time_masks=2, time_width=10, freq_masks=1,
                             freq_width=8)
    zero = out == 0
    assert set(np.unique(out)) <= {0, 200}
    cols = zero.all(axis=0)   # masked time steps are zero for every mel bin
    rows = zero.all(axis=1)
    assert (zero == (cols[None, :] | rows[:, None])).all()
    assert cols.sum() <= 2 * 10 and rows.sum() <= 8
  assert (mel == 200).all()


def test_augmenter_from_default_config_is_seeded():
  aug = augment.Augmenter.from_config(config.default_data_config().augment)
  face, mel = _face(), _rng(4).integers(1, 256, (64, 100), dtype=np.uint8)
  a = aug(face, True, mel, _rng(9))
  b = aug(face, True, mel, _rng(9))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert a[0].shape == face.shape and a[0].dtype == np.uint8 and a[1].dtype == np.uint8
  assert not np.array_equal(a[0], aug(face, True, mel, _rng(10))[0])
  # No face: the zero image stays zero; disabled: everything passes through.
  zeros = np.zeros_like(face)
  np.testing.assert_array_equal(aug(zeros, False, mel, _rng(0))[0], zeros)
  off = augment.Augmenter(enabled=False)
  assert off(face, True, mel, _rng(0))[0] is face
  flip = augment.Augmenter(random_resized_crop=False, hflip=1.0, brightness=0, contrast=0,
                           saturation=0, spec_time_masks=0, spec_freq_masks=0)
  np.testing.assert_array_equal(flip(face, True, mel, _rng(0))[0], face[:, ::-1])

"""Tests for data_prep.faces: the packaged detector finds the synthetic faces; crops."""

import numpy as np
import pytest

from mfer_jax.media import faces
from data_prep import synth_render

HEIGHT, WIDTH = 192, 256


def _scene(seed: int, face_code: int):
  """A synthetic frame with one face, and the face's drawn box."""
  rng = np.random.default_rng(seed)
  frame = synth_render.random_background(rng, HEIGHT, WIDTH)
  ident = synth_render.random_identity(rng, HEIGHT)
  center = (WIDTH / 2 + rng.uniform(-30, 30), HEIGHT / 2 + rng.uniform(-8, 8))
  synth_render.draw_face(frame, center, ident, face_code)
  return frame, faces.Box(*synth_render.face_box(center, ident))


def test_detector_finds_drawn_faces_of_several_identities():
  found = 0
  for seed in range(12):
    frame, truth = _scene(seed, face_code=seed % synth_render.NUM_FACE_CODES)
    best = faces.largest_face(frame)
    found += best is not None and best.iou(truth) > 0.5
  # 79/80 when measured on a larger sample; allow one miss.
  assert found >= 11


def test_empty_background_has_no_face():
  for seed in range(5):
    frame = synth_render.random_background(np.random.default_rng(seed), HEIGHT, WIDTH)
    assert faces.detect_faces(frame) == []


def test_detect_faces_rejects_bad_input():
  with pytest.raises(ValueError):
    faces.detect_faces(np.zeros((10, 10, 4), np.uint8))


def test_crop_face_is_square_uint8_and_face_centred():
  frame, truth = _scene(3, face_code=1)
  crop = faces.crop_face(frame, truth)
  assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
  # A box at the frame corner is padded with black, not shifted.
  corner = faces.crop_face(frame, faces.Box(0, 0, 40, 40), size=64, margin=0.5)
  assert corner.shape == (64, 64, 3) and corner[0, 0].sum() == 0 and corner[-1, -1].sum() > 0


def test_crop_face_maps_box_centre_to_crop_centre():
  frame = np.zeros((100, 100, 3), np.uint8)
  frame[40:60, 30:50] = 255  # a white 20x20 square = the box
  crop = faces.crop_face(frame, faces.Box(30, 40, 50, 60), size=40, margin=0.5)
  ys, xs = np.nonzero(crop[..., 0] > 127)
  assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 29, 10, 29)

"""mfer_jax.media.detector: the packaged models find drawn faces and their five landmarks.

Ground truth comes from `data_prep.synth_render.draw_posed_face`, which returns where the
eyes, nose tip and mouth corners of the drawn (turned) face are.
"""

import numpy as np
import pytest

from data_prep import synth_render
from mfer_jax.media import align, detector

HEIGHT, WIDTH = 240, 320


@pytest.fixture(scope="module")
def face_detector():
  return detector.FaceDetector()


def _scene(seed, yaw=0.0, roll=0.0, height=HEIGHT, width=WIDTH, center=None, size=None):
  rng = np.random.default_rng(seed)
  frame = synth_render.random_background(rng, height, width)
  ident = synth_render.random_identity(rng, height)
  ident = synth_render.FaceIdentity(ident.skin, ident.hair,
                                    size or ident.size * rng.uniform(0.45, 0.65),
                                    ident.aspect, ident.eye_gap)
  center = center or (width / 2 + rng.uniform(-30, 30), height / 2 + rng.uniform(-10, 10))
  truth = synth_render.draw_posed_face(frame, center, ident, seed % synth_render.NUM_FACE_CODES,
                                       yaw=yaw, roll=roll)
  return frame, truth, ident


def _error(landmarks, truth):
  """Mean landmark distance in units of the true eye distance."""
  return np.linalg.norm(landmarks - truth, axis=1).mean() / np.linalg.norm(truth[1] - truth[0])


def test_finds_turned_and_rolled_faces_with_their_landmarks(face_detector):
  errors, missed = [], []
  cases = [(yaw, roll) for yaw in (-40, -20, 0, 20, 40) for roll in (-20, 0, 20)]
  for seed, (yaw, roll) in enumerate(cases):
    frame, truth, _ = _scene(seed, yaw=yaw, roll=roll)
    faces = face_detector.detect(frame)
    assert len(faces) <= 1, (yaw, roll, len(faces))
    if not faces:
      missed.append((yaw, roll))
      continue
    face = faces[0]
    x0, y0, x1, y1 = face.box
    assert x0 < truth[:, 0].min() and truth[:, 0].max() < x1, (yaw, roll)
    assert y0 < truth[:, 1].min() and truth[:, 1].max() < y1, (yaw, roll)
    assert 0.5 <= face.score <= 1.0
    errors.append(_error(face.landmarks, truth))
  # The bar is 90% recall up to 45 degrees of yaw: no upright face up to 40 degrees
  # may be missed. The +-20 degree rolls on top are a stress test: with the cartoon as drawn
  # since the expression-intensity change of the synthetic faces (parabolic mouths), the two
  # most extreme combinations (yaw -40 and 40, each with roll 20) are missed; before it, one.
  # Landmark error median 0.17, worst 0.44 eye distances (part of it is the drawing: the
  # cartoon's landmarks are not quite where a real face has them).
  assert not [c for c in missed if c[1] == 0], missed
  assert len(missed) <= 2, missed
  assert np.median(errors) < 0.25 and max(errors) < 0.5, np.round(errors, 3)


def test_onet_landmarks_beat_yunet_own_under_roll(face_detector):
  """Why O-Net refines YuNet's landmarks: the aligned eye line is more level."""
  raw = detector.FaceDetector(refine_landmarks=False)
  tilt = {"refined": [], "raw": []}
  for seed, roll in enumerate((-30, -20, 20, 30)):
    frame, truth, _ = _scene(100 + seed, roll=roll)
    for name, det in (("refined", face_detector), ("raw", raw)):
      eyes = align.transform_points(align.alignment_matrix(det.detect(frame)[0].landmarks),
                                    truth[:2])
      tilt[name].append(abs(np.degrees(np.arctan2(*(eyes[1] - eyes[0])[::-1]))))
  assert np.mean(tilt["refined"]) < np.mean(tilt["raw"]), tilt
  assert max(tilt["refined"]) < 6, tilt


def test_empty_backgrounds_have_no_face(face_detector):
  for seed in range(6):
    frame = synth_render.random_background(np.random.default_rng(seed), HEIGHT, WIDTH)
    assert face_detector.detect(frame) == []


def test_reduced_detection_gives_full_resolution_coordinates():
  """A 1280x720 frame detected at max_side 640 (reduced 2x) and at full size agree."""
  frame, truth, _ = _scene(7, height=720, width=1280, center=(700.0, 380.0), size=300.0)
  reduced = detector.FaceDetector(max_side=640).detect(frame)
  full = detector.FaceDetector(max_side=1280).detect(frame)
  assert len(reduced) == len(full) == 1
  # YuNet's box moves a little with the scale; O-Net's landmarks, taken at full resolution
  # in both cases, hardly do.
  np.testing.assert_allclose(reduced[0].box, full[0].box, atol=0.12 * full[0].width)
  assert _error(reduced[0].landmarks, full[0].landmarks) < 0.1
  assert _error(reduced[0].landmarks, truth) < 0.2
  assert _error(full[0].landmarks, truth) < 0.2


def test_refine_follows_a_moving_face(face_detector):
  """O-Net on the previous frame's face gives the new landmarks, and moves the box along."""
  rng = np.random.default_rng(3)
  background = synth_render.random_background(rng, HEIGHT, WIDTH)
  ident = synth_render.FaceIdentity((224, 172, 138), (40, 32, 24), 130.0, 0.77, 0.39)
  first = background.copy()
  synth_render.draw_posed_face(first, (150.0, 120.0), ident, 0)
  face = face_detector.detect(first)[0]
  second = background.copy()
  truth = synth_render.draw_posed_face(second, (162.0, 114.0), ident, 0, roll=8)
  moved = face_detector.refine(second, face)
  assert _error(moved.landmarks, truth) < 0.2
  np.testing.assert_allclose(np.subtract(moved.center, face.center), [12, -6], atol=3)
  assert moved.score > 0.5
  # On an empty frame O-Net's face probability collapses: the tracker drops the face.
  assert face_detector.refine(background, face).score < 0.05


def test_bad_frames_are_refused(face_detector):
  with pytest.raises(ValueError):
    face_detector.detect(np.zeros((10, 10, 4), np.uint8))
  with pytest.raises(ValueError):
    face_detector.detect(np.zeros((10, 10, 3), np.float32))


def test_iou():
  assert detector.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
  assert detector.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
  assert detector.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0

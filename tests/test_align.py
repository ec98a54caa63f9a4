"""mfer_jax.media.align: the similarity fit and the warp onto the 112x112 ArcFace template.

The geometry is checked on pixels: faces with known landmarks are drawn, aligned, and the eyes
are found again in the aligned crop by their dark pupils.
"""

import cv2
import numpy as np
import pytest
import scipy.optimize

from data_prep import synth_render
from mfer_jax.media import align

HEIGHT, WIDTH = 480, 640


def _random_similarity(rng, angle_deg, scale):
  a = np.radians(angle_deg)
  rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
  return rot, rng.uniform(-50, 50, 2)


def test_planted_similarity_is_recovered_exactly():
  rng = np.random.default_rng(0)
  src = rng.uniform(0, 300, (5, 2))
  for angle, scale in ((0, 1.0), (30, 0.3), (-30, 2.5), (175, 0.7)):
    rot, shift = _random_similarity(rng, angle, scale)
    matrix = align.similarity_transform(src, src @ rot.T + shift)
    np.testing.assert_allclose(matrix, np.hstack([rot, shift[:, None]]), atol=1e-9)


def test_fit_is_the_least_squares_optimum():
  """With noisy points, no other similarity (found by scipy's optimiser) does better."""
  rng = np.random.default_rng(1)
  src = rng.uniform(0, 100, (5, 2))
  dst = src @ np.array([[0.8, -0.3], [0.3, 0.8]]).T + 7 + rng.normal(0, 2, (5, 2))

  def residuals(p):   # p = (a, b, tx, ty) for the matrix [[a, -b, tx], [b, a, ty]]
    m = np.array([[p[0], -p[1], p[2]], [p[1], p[0], p[3]]])
    return (align.transform_points(m, src) - dst).ravel()

  reference = scipy.optimize.least_squares(residuals, [1, 0, 0, 0], xtol=1e-14, ftol=1e-14).x
  matrix = align.similarity_transform(src, dst)
  ours = np.array([matrix[0, 0], matrix[1, 0], matrix[0, 2], matrix[1, 2]])
  np.testing.assert_allclose(ours, reference, atol=1e-6)
  np.testing.assert_allclose(matrix[0, 1], -matrix[1, 0])
  np.testing.assert_allclose(matrix[1, 1], matrix[0, 0])


def test_mirrored_points_still_give_a_rotation_not_a_reflection():
  src = align.ARCFACE_112
  mirrored = src * [-1, 1]
  matrix = align.similarity_transform(src, mirrored)
  assert np.linalg.det(matrix[:, :2]) > 0


@pytest.mark.parametrize("bad", [np.zeros((5, 2)), np.zeros((1, 2)), np.zeros((5, 3))])
def test_degenerate_points_are_refused(bad):
  with pytest.raises(ValueError):
    align.similarity_transform(bad, np.zeros_like(bad))


def _dots_frame(rng, landmarks):
  """A grey frame with a distinct saturated disc at each landmark."""
  del rng
  frame = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
  radius = max(2, int(0.08 * np.linalg.norm(landmarks[1] - landmarks[0])))
  colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
  for point, colour in zip(landmarks, colours):
    cv2.circle(frame, (int(round(point[0] * 16)), int(round(point[1] * 16))), radius * 16,
               colour, -1, cv2.LINE_AA, shift=4)
  return frame, colours


def _centroid(crop, colour):
  target = np.array(colour, float)
  weight = np.clip(1.0 - np.abs(crop.astype(float) - target).max(-1) / 127.0, 0, None)
  ys, xs = np.indices(weight.shape)
  return np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()


@pytest.mark.parametrize("angle,eye_distance", [(0, 35), (30, 20), (-30, 60), (12, 140),
                                                (-25, 110)])
def test_warp_puts_each_landmark_on_its_template_point(angle, eye_distance):
  """Exact geometry (pixel-centre convention, rotation sign, the antialiased shrink of big
  faces): discs drawn at the template's points under a similarity land on the template."""
  rng = np.random.default_rng(angle + eye_distance)
  rot, _ = _random_similarity(rng, angle, eye_distance / 35.24)
  points = (align.ARCFACE_112 - 56) @ rot.T + [WIDTH / 2, HEIGHT / 2]
  frame, colours = _dots_frame(rng, points)
  crop = align.align_face(frame, points)
  assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
  found = np.array([_centroid(crop, c) for c in colours])
  np.testing.assert_allclose(found, align.ARCFACE_112, atol=0.35)


def _pupil(crop, near):
  """Centroid of dark pixels within 8 px of ``near`` (the pupil; brows are further away)."""
  ys, xs = np.indices(crop.shape[:2])
  window = (xs - near[0]) ** 2 + (ys - near[1]) ** 2 <= 64
  darkness = np.clip(70.0 - crop.max(-1), 0, None) * window
  assert darkness.sum() > 0, "no pupil near the template eye"
  return np.array([(xs * darkness).sum(), (ys * darkness).sum()]) / darkness.sum()


@pytest.mark.parametrize("roll,face_height", [(-30, 90), (30, 90), (-12, 240), (30, 240),
                                              (0, 400), (-30, 400)])
def test_drawn_faces_come_out_level_with_eyes_on_the_template(roll, face_height):
  """The issue's bar: synthetic faces with known landmarks, rolled +-30 degrees and scaled;
  after alignment the eye line is level within 3 degrees and each eye is within 3 pixels of
  the template's (found in the crop's pixels, as the pupils)."""
  rng = np.random.default_rng(roll + 100 * face_height)
  frame = synth_render.random_background(rng, HEIGHT, WIDTH)
  frame[:] = np.clip(frame.astype(int) + 80, 0, 255)   # keep the background out of "dark"
  ident = synth_render.FaceIdentity(skin=(232, 190, 160), hair=(60, 48, 36),
                                    size=float(face_height), aspect=0.77, eye_gap=0.39)
  center = (WIDTH / 2 + rng.uniform(-20, 20), HEIGHT / 2 + rng.uniform(-10, 10))
  landmarks = synth_render.draw_posed_face(frame, center, ident, face_code=0, roll=roll)
  crop = align.align_face(frame, landmarks)
  left, right = (_pupil(crop, p) for p in align.ARCFACE_112[:2])
  tilt = np.degrees(np.arctan2(right[1] - left[1], right[0] - left[0]))
  assert abs(tilt) < 3.0
  assert np.linalg.norm(left - align.ARCFACE_112[0]) < 3.0
  assert np.linalg.norm(right - align.ARCFACE_112[1]) < 3.0


def test_big_shrink_averages_instead_of_aliasing():
  """One-pixel stripes shrunk 6x come out as an even grey, as pixel averaging gives."""
  frame = np.zeros((600, 600, 3), np.uint8)
  frame[:, ::2] = 255
  matrix = np.array([[1 / 6, 0, 0], [0, 1 / 6, 0]])
  out = align.warp(frame, matrix, 90)
  assert abs(out.mean() - 127.5) < 3 and out[5:-5, 5:-5].std() < 3
  # Plain bilinear sampling of the same frame lands on the stripes: far from the mean grey.
  aliased = cv2.warpAffine(frame, matrix, (90, 90), flags=cv2.INTER_LINEAR)
  assert abs(aliased.mean() - 127.5) > 40 or aliased.std() > 40


def test_crop_outside_the_frame_is_black():
  frame = np.full((100, 100, 3), 200, np.uint8)
  points = align.ARCFACE_112 + [500, 500]
  assert align.align_face(frame, points).max() == 0


def test_template_scales_with_crop_size():
  np.testing.assert_allclose(align.template(224), 2 * align.ARCFACE_112)
  with pytest.raises(ValueError):
    align.alignment_matrix(np.zeros((4, 2)))

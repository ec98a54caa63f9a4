"""Face alignment: a similarity warp of five landmarks onto the 112x112 ArcFace template.

Aff-Wild2's ``cropped_aligned`` faces, and most aligned 112x112 face crops in use (the
ArcFace / InsightFace family and the datasets cropped for it, OpenCV's
``FaceRecognizerSF.alignCrop``), are made the same way: five landmarks (both eye centres, the
nose tip, both mouth corners) are mapped onto fixed template positions by the least-squares
similarity transform (rotation, uniform scale, translation; no shear), and the frame is
warped with it. `ARCFACE_112` is that template, InsightFace's ``arcface_dst``:

    point                          x        y
    eye on the image's left        38.2946  51.6963
    eye on the image's right       73.5318  51.5014
    nose tip                       56.0252  71.7366
    mouth corner, image's left     41.5493  92.3655
    mouth corner, image's right    70.7299  92.2041

Coordinates are in pixels of the 112x112 crop with pixel (i, j)'s centre at (j, i), the
convention of ``cv2.warpAffine`` (and of `mfer_jax.media.detector`'s landmarks). The eyes sit
at 46% of the height and 35 pixels apart, the mouth 41 pixels below them: a tight crop from
the brows to just below the lips, as in the training crops. "Image's left" is the subject's
right: the order does not depend on where the person looks.

The transform is Umeyama's closed-form least-squares fit (the estimator InsightFace uses
through ``skimage.transform.SimilarityTransform``), written out here in numpy; the warp is
bilinear, and outside the frame the crop is black, like Aff-Wild2's crops at the image
border. One addition: a face shrunk more than 2x (an eye distance above about 70 pixels) is
first reduced to the crop's scale with pixel averaging (``cv2.INTER_AREA``), so fine detail
is averaged instead of aliased. Prediction
(`mfer_jax.prediction`) and data preparation (``data_prep.build --detect``) both crop with
`align_face`, so a model sees the same framing in training and in use.
"""

from __future__ import annotations

import cv2
import numpy as np

from mfer_jax import constants

# InsightFace's arcface_dst: five landmark positions in a 112x112 aligned crop (see above).
ARCFACE_112 = np.array([[38.2946, 51.6963],
                        [73.5318, 51.5014],
                        [56.0252, 71.7366],
                        [41.5493, 92.3655],
                        [70.7299, 92.2041]])
LANDMARK_NAMES = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")


def template(size: int = constants.FACE_SIZE) -> np.ndarray:
  """The template for a ``size`` x ``size`` crop: `ARCFACE_112` scaled by size / 112.

  Scaling is about pixel centres' origin (0, 0), as InsightFace does for other crop sizes, so
  the template keeps its place relative to the crop's pixels.
  """
  return ARCFACE_112 * (size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The least-squares similarity transform taking points ``src`` onto ``dst`` (Umeyama 1991).

  Minimises sum_i |s R src_i + t - dst_i|^2 over a rotation R (no reflection), a scale s > 0
  and a translation t.

  Args:
    src: [N, 2] points, N >= 2, not all equal.
    dst: [N, 2] target points.

  Returns:
    float64 [2, 3] matrix [s R | t], for ``cv2.warpAffine``.

  Raises:
    ValueError: on mismatched shapes, fewer than two points, or coincident ``src`` points.
  """
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
    raise ValueError(f"need two [N, 2] point sets with N >= 2, got {src.shape} and {dst.shape}")
  src_mean, dst_mean = src.mean(0), dst.mean(0)
  src_c, dst_c = src - src_mean, dst - dst_mean
  src_var = (src_c ** 2).sum() / len(src)
  if not np.isfinite(src_var) or src_var < 1e-12:
    raise ValueError(f"source points are coincident or not finite: {src.tolist()}")
  cov = dst_c.T @ src_c / len(src)
  u, sing, vt = np.linalg.svd(cov)
  # Force a proper rotation: flip the weakest axis if the best orthogonal map is a reflection.
  d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
  rot = u @ np.diag(d) @ vt
  scale = (sing * d).sum() / src_var
  shift = dst_mean - scale * rot @ src_mean
  return np.hstack([scale * rot, shift[:, None]])


def alignment_matrix(landmarks: np.ndarray, size: int = constants.FACE_SIZE) -> np.ndarray:
  """The [2, 3] matrix taking frame pixels to the aligned crop (landmarks onto `template`).

  Args:
    landmarks: [5, 2] in `LANDMARK_NAMES` order, frame pixels.
    size: crop side.
  """
  landmarks = np.asarray(landmarks, np.float64)
  if landmarks.shape != (5, 2):
    raise ValueError(f"landmarks must be [5, 2] ({', '.join(LANDMARK_NAMES)}), got "
                     f"{landmarks.shape}")
  return similarity_transform(landmarks, template(size))


def align_face(frame_rgb: np.ndarray, landmarks: np.ndarray,
               size: int = constants.FACE_SIZE) -> np.ndarray:
  """The aligned ``size`` x ``size`` face crop: ``landmarks`` warped onto the template.

  Args:
    frame_rgb: uint8 [H, W, 3] frame.
    landmarks: [5, 2] in `LANDMARK_NAMES` order, frame pixels.
    size: crop side (112: Aff-Wild2's crops).

  Returns:
    uint8 [size, size, 3]; black where the crop reaches outside the frame.
  """
  return warp(frame_rgb, alignment_matrix(landmarks, size), size)


def warp(frame: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
  """The ``size`` x ``size`` image ``matrix`` maps ``frame`` to: bilinear, black outside.

  A map that shrinks more than 2x first reduces the covered part of the frame to the output
  scale with pixel averaging (``cv2.INTER_AREA``), so detail is averaged rather than aliased;
  the warp then only rotates and shifts.
  """
  frame = np.ascontiguousarray(frame)
  matrix = np.asarray(matrix, np.float64)
  scale = np.sqrt(abs(np.linalg.det(matrix[:, :2])))
  if scale < 0.5:
    frame, matrix = _shrink_footprint(frame, matrix, size, scale)
  return cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _shrink_footprint(frame: np.ndarray, matrix: np.ndarray, size: int,
                      factor: float) -> tuple[np.ndarray, np.ndarray]:
  """The part of ``frame`` the crop covers, reduced by ``factor`` with pixel averaging, and
  the matrix that maps the reduced part to the crop as ``matrix`` mapped the frame."""
  inverse = cv2.invertAffineTransform(matrix)
  corners = transform_points(inverse, [[-1, -1], [size, -1], [-1, size], [size, size]])
  height, width = frame.shape[:2]
  x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int) - 1, 0)
  x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + 2, [width, height])
  if x1 - x0 < 2 or y1 - y0 < 2:   # the crop lies outside the frame: nothing to average
    return frame, matrix
  part = frame[y0:y1, x0:x1]
  new_w, new_h = max(1, round((x1 - x0) * factor)), max(1, round((y1 - y0) * factor))
  small = cv2.resize(part, (new_w, new_h), interpolation=cv2.INTER_AREA)
  fx, fy = new_w / (x1 - x0), new_h / (y1 - y0)
  # Reduced pixel (u, v) has its centre at frame ((u + 0.5) / fx - 0.5 + x0, likewise y).
  to_frame = np.array([[1.0 / fx, 0.0, 0.5 / fx - 0.5 + x0], [0.0, 1.0 / fy, 0.5 / fy - 0.5 + y0]])
  combined = matrix[:, :2] @ to_frame[:, :2]
  shift = matrix[:, :2] @ to_frame[:, 2] + matrix[:, 2]
  return small, np.hstack([combined, shift[:, None]])


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  """Applies a [2, 3] affine matrix to [N, 2] points."""
  points = np.asarray(points, np.float64)
  return points @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]

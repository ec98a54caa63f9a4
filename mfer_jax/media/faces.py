"""Face detection and Aff-Wild2-style face crops, with no model file to download.

Detector: dlib's frontal face detector (HOG features + a linear SVM over an image pyramid),
from the ``dlib-bin`` wheel. Its model is compiled into the extension module
(``dlib.get_frontal_face_detector()`` needs no file), so nothing is fetched at run time.

Why this one (checked on this machine, Python 3.11, November 2026):

- ``dlib-bin`` 20.0.1.post1: a cp311 manylinux wheel of 4 MB with no dependencies. On 80
  synthetic frames (256x192, `data_prep.synth_render` faces, every identity type) it found
  79 faces with IoU > 0.5 to the drawn box (mean IoU 0.82) and nothing on 40 empty
  backgrounds, at about 4 ms per frame on one core.
- ``mediapipe`` 1.2.2: the wheel holds no face-detection model (only hand-landmark and
  objectron modules and the Tasks C library; Tasks' FaceDetector needs a .tflite file from
  the network), and it requires ``opencv-contrib-python``, a second distribution writing the
  same ``cv2`` package as our ``opencv-python-headless`` 5.0.
- ``opencv-contrib-python-headless`` 4.14: ships the Haar cascades, but only by moving the
  whole stack back from OpenCV 5 to 4 (two wheels cannot share ``cv2``). It was also worse
  here: 73/80 faces (``frontalface_alt2``) with a looser box (mean IoU 0.6), at 9-10 ms per
  frame. OpenCV 5 itself has no cascades and its ``FaceDetectorYN`` needs a model file.

The detector is built lazily, once per process (`_detector`), so worker processes that never
detect pay nothing, and a process pool builds one per worker.
"""

from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np

from mfer_jax import constants

# Aff-Wild2's cropped_aligned images are 112x112 and show the whole face with some context.
CROP_SIZE = constants.FACE_SIZE
# Extra context around a detector box, per side, as a fraction of the box size. dlib's box
# runs from the brows to the chin, so 0.25 brings the forehead and the jaw line into the crop.
DEFAULT_MARGIN = 0.25


@dataclasses.dataclass(frozen=True)
class Box:
  """A face box in pixel coordinates (x1, y1 exclusive), with the detector's score."""

  x0: float
  y0: float
  x1: float
  y1: float
  score: float = 1.0

  @property
  def width(self) -> float:
    return self.x1 - self.x0

  @property
  def height(self) -> float:
    return self.y1 - self.y0

  @property
  def area(self) -> float:
    return max(0.0, self.width) * max(0.0, self.height)

  def iou(self, other: "Box") -> float:
    """Intersection over union with another box (0 when they do not overlap)."""
    ix = max(0.0, min(self.x1, other.x1) - max(self.x0, other.x0))
    iy = max(0.0, min(self.y1, other.y1) - max(self.y0, other.y0))
    inter = ix * iy
    union = self.area + other.area - inter
    return inter / union if union > 0 else 0.0


@functools.cache
def _detector():
  """The one place the detector is built: lazily, once per process."""
  import dlib  # pylint: disable=g-import-not-at-top  (heavy; only processes that detect load it)
  return dlib.get_frontal_face_detector()


def detect_faces(frame_rgb: np.ndarray, upsample: int = 0, min_score: float = 0.0) -> list[Box]:
  """Finds frontal faces in an RGB frame.

  Args:
    frame_rgb: uint8 image [H, W, 3] (RGB) or [H, W] (grey).
    upsample: how many times to double the image first. The detector's smallest face is about
      80x80 pixels; each doubling halves that and costs about 4x the time.
    min_score: SVM score threshold; 0 is dlib's default, lower finds more (and more false
      faces).

  Returns:
    Boxes, best score first, clipped to the frame.

  Raises:
    ValueError: if the frame is not uint8 [H, W, 3] or [H, W].
  """
  frame = np.asarray(frame_rgb)
  if frame.dtype != np.uint8 or not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)):
    raise ValueError(f"frame must be uint8 [H, W, 3] or [H, W], got {frame.dtype} {frame.shape}")
  height, width = frame.shape[:2]
  rects, scores, _ = _detector().run(np.ascontiguousarray(frame), upsample, min_score)
  boxes = [Box(max(0.0, r.left()), max(0.0, r.top()), min(float(width), r.right() + 1.0),
               min(float(height), r.bottom() + 1.0), float(s)) for r, s in zip(rects, scores)]
  return sorted(boxes, key=lambda b: -b.score)


def largest_face(frame_rgb: np.ndarray, **detect_kwargs) -> Box | None:
  """The largest detected face (the subject, in Aff-Wild2's one-person videos), or None."""
  boxes = detect_faces(frame_rgb, **detect_kwargs)
  return max(boxes, key=lambda b: b.area) if boxes else None


def crop_face(frame_rgb: np.ndarray, box: Box, size: int = CROP_SIZE,
              margin: float = DEFAULT_MARGIN) -> np.ndarray:
  """A square, face-centred crop resized to ``size`` x ``size``, like Aff-Wild2's crops.

  The square has side ``max(width, height) * (1 + 2 * margin)`` around the box centre; parts
  outside the frame are black.

  Args:
    frame_rgb: uint8 RGB frame [H, W, 3].
    box: the face box.
    size: output side in pixels.
    margin: context added on each side, as a fraction of the larger box side.

  Returns:
    uint8 [size, size, 3].
  """
  side = max(box.width, box.height) * (1.0 + 2.0 * margin)
  if side <= 0:
    raise ValueError(f"empty face box {box}")
  scale = size / side
  cx, cy = 0.5 * (box.x0 + box.x1), 0.5 * (box.y0 + box.y1)
  # One affine warp both crops and resizes; pixel centres map exactly (the -0.5 terms).
  matrix = np.array([[scale, 0.0, size / 2 - scale * cx - 0.5 + 0.5 * scale],
                     [0.0, scale, size / 2 - scale * cy - 0.5 + 0.5 * scale]])
  return cv2.warpAffine(np.ascontiguousarray(frame_rgb), matrix, (size, size),
                        flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))

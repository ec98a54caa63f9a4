"""From per-frame probabilities to ABAW label files: no-face policy, smoothing, writing.

ABAW Expression prediction format: the header line
``Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other`` and then one class index per
video frame, in frame order. Every frame gets a label.
"""

from __future__ import annotations

import io
import os
import pathlib

import numpy as np

from mfer_jax import constants, files
from mfer_jax.media import align

HEADER = constants.ANNOTATION_HEADER

# What a frame without a face gets (documented in the README):
#   audio:   the model's own prediction from the audio window alone (has_face=False, the same
#            input training used for frames without a crop);
#   nearest: the prediction of the nearest frame that has a face (ties: the earlier one);
#            a video with no face at all falls back to "audio".
NO_FACE_POLICIES = ("audio", "nearest")


def fill_no_face(probs: np.ndarray, has_face: np.ndarray, policy: str) -> np.ndarray:
  """Applies the no-face policy to [N, C] probabilities."""
  if policy not in NO_FACE_POLICIES:
    raise ValueError(f"no-face policy {policy!r}: choose one of {NO_FACE_POLICIES}")
  if policy == "audio" or has_face.all() or not has_face.any():
    return probs
  with_face = np.flatnonzero(has_face)
  # Index of the nearest frame with a face, for every frame.
  pos = np.searchsorted(with_face, np.arange(len(has_face)))
  left = with_face[np.clip(pos - 1, 0, len(with_face) - 1)]
  right = with_face[np.clip(pos, 0, len(with_face) - 1)]
  idx = np.arange(len(has_face))
  nearest = np.where(np.abs(idx - left) <= np.abs(right - idx), left, right)
  return probs[nearest]


def smooth(probs: np.ndarray, window: int) -> np.ndarray:
  """Centred moving average of [N, C] probabilities over ``window`` frames (<= 1: none).

  The window shrinks at the ends of the video instead of padding, so the first and last
  frames average only real frames.
  """
  if window <= 1 or len(probs) == 0:
    return probs
  half = window // 2
  csum = np.concatenate([np.zeros((1, probs.shape[1])), np.cumsum(probs, axis=0)])
  idx = np.arange(len(probs))
  lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(probs))
  return ((csum[hi] - csum[lo]) / (hi - lo)[:, None]).astype(probs.dtype)


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> None:
  """Writes an ABAW prediction file (header + one label per frame), atomically."""
  text = HEADER + "\n" + "".join(f"{int(l)}\n" for l in labels)
  files.atomic_write_bytes(path, text.encode())


# Face columns of the probabilities CSV: the box and the five landmarks the crop was aligned
# with (frame pixels), empty on frames without a face or when crops came from a folder.
FACE_COLUMNS = ("face_x0", "face_y0", "face_x1", "face_y1") + tuple(
    f"{name}_{axis}" for name in align.LANDMARK_NAMES for axis in ("x", "y"))


def write_probabilities(path: str | os.PathLike, probs: np.ndarray, labels: np.ndarray,
                        has_face: np.ndarray, gates: np.ndarray,
                        boxes: np.ndarray | None = None,
                        landmarks: np.ndarray | None = None) -> None:
  """Writes the per-frame CSV beside a label file, atomically.

  Columns: frame, label, has_face, p_<class>..., gate_visual, gate_audio, then `FACE_COLUMNS`
  (box x0, y0, x1, y1 and the landmarks' x, y; two decimals; empty without a face).
  """
  n = len(labels)
  face = np.full((n, len(FACE_COLUMNS)), np.nan)
  if boxes is not None:
    face[:, :4] = boxes
  if landmarks is not None:
    face[:, 4:] = np.asarray(landmarks).reshape(n, -1)
  buf = io.StringIO()
  buf.write(",".join(["frame", "label", "has_face", *(f"p_{c}" for c in constants.CLASS_NAMES),
                      "gate_visual", "gate_audio", *FACE_COLUMNS]) + "\n")
  for i in range(n):
    row = [str(i + 1), str(int(labels[i])), str(int(has_face[i]))]
    row += [f"{p:.6f}" for p in probs[i]] + [f"{g:.6f}" for g in gates[i]]
    row += ["" if np.isnan(v) else f"{v:.2f}" for v in face[i]]
    buf.write(",".join(row) + "\n")
  files.atomic_write_bytes(path, buf.getvalue().encode())


def probabilities_path(label_path: str | os.PathLike) -> pathlib.Path:
  """``x/video.txt`` -> ``x/video.probs.csv``."""
  p = pathlib.Path(label_path)
  return p.with_name(p.stem + ".probs.csv")

"""The faces of a video: detect, track, choose the person, align. One path for all callers.

Prediction (`mfer_jax.prediction.frames`) and data preparation (``data_prep.build --detect``)
both call this module, so a face reaches the model through the same detector
(`detector`: YuNet boxes, O-Net landmarks), tracker (`track`) and aligner (`align`: the
112x112 ArcFace template), whether it is being trained on or predicted.

A video is read twice:

1. `track_video` decodes every frame and links the faces into tracks (cheap to keep: a box
   and five points per face and frame);
2. `aligned_faces` decodes it again and warps the chosen tracks' faces into crops, one frame
   at a time, so memory holds crops only for the frames a caller keeps.

Decoding a 640x360 frame costs a twentieth of detecting faces in it, so the second pass is
cheap next to the first, and it avoids holding every decoded frame until the tracks (which
depend on the whole video: ``largest`` is the track in the most frames) are known.
"""

from __future__ import annotations

import dataclasses
import fractions
import os
from typing import Iterator

import cv2
import numpy as np

from mfer_jax import constants
from mfer_jax.media import align, decode, detector as detector_lib, track as track_lib


# How crops are made (detector + the ArcFace 112 template). Builders record it (data_prep's
# sidecars, the synthetic set's markers), so crops made another way are rebuilt, not mixed.
CROP_STYLE = "arcface112"
# JPEG quality of the crops data_prep writes into records (and prediction round-trips its
# crops through, so the model sees the same compression it was trained on).
JPEG_QUALITY = 90


def encode_crop(crop_rgb: np.ndarray) -> bytes:
  """A face crop as the JPEG bytes a record holds (`mfer_jax.data.records.decode_face`
  reads them back)."""
  ok, data = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(crop_rgb), cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
  if not ok:
    raise ValueError(f"cannot encode a crop of shape {crop_rgb.shape} as JPEG")
  return data.tobytes()


@dataclasses.dataclass
class VideoTracks:
  """Every face track of one video.

  Attributes:
    path: the media file.
    fps: its exact frame rate.
    start_time: pts time (s) of the first decoded frame (audio alignment).
    num_frames: decoded frames, unreadable ones included.
    tracks: in order of appearance (`track.FaceTracker.finish`).
    unreadable: 1-based numbers of frames that could not be decoded.
  """

  path: str
  fps: fractions.Fraction
  start_time: float
  num_frames: int
  tracks: list[track_lib.Track]
  unreadable: list[int]

  def select(self, person: str, min_frames: int = track_lib.DEFAULT_MIN_FRAMES
             ) -> list[tuple[str, track_lib.Track]]:
    """`track.select_tracks` on this video's tracks."""
    return track_lib.select_tracks(self.tracks, person, min_frames)


def track_video(path: str | os.PathLike, *, detect_every: int = 1,
                face_detector: detector_lib.FaceDetector | None = None,
                **tracker_options) -> VideoTracks:
  """Decodes ``path`` once and tracks every face in it.

  Args:
    path: any media file FFmpeg decodes.
    detect_every: run the detector every k-th frame (`track.FaceTracker`).
    face_detector: a detector to reuse (default: a new one with default settings).
    tracker_options: other `track.FaceTracker` arguments (max_gap, ...).

  Raises:
    decode.MediaError: if the file cannot be opened or no frame decodes.
  """
  tracker = track_lib.FaceTracker(face_detector or detector_lib.FaceDetector(), detect_every,
                                  **tracker_options)
  frames = decode.TolerantFrames(path)
  for number, frame in frames:
    tracker.update(number, frame)
  return VideoTracks(str(path), frames.fps, frames.start_time, frames.num_frames,
                     tracker.finish(), frames.unreadable)


def aligned_faces(path: str | os.PathLike, tracks: list[track_lib.Track],
                  size: int = constants.FACE_SIZE
                  ) -> Iterator[tuple[int, list[np.ndarray | None]]]:
  """Decodes ``path`` again and yields, frame by frame, each track's aligned crop.

  Args:
    path: the media file the tracks came from.
    tracks: the tracks to crop (`VideoTracks.select`).
    size: crop side (112: Aff-Wild2's crops).

  Yields:
    (1-based frame number, [uint8 [size, size, 3] crop or None, one per track]), for every
    decoded frame in order (None where the track has no face, or the frame is unreadable).

  Raises:
    decode.MediaError: as `track_video`.
  """
  for number, frame in decode.TolerantFrames(path):
    crops = []
    for t in tracks:
      face = t.face_at(number) if frame is not None else None
      crops.append(None if face is None else align.align_face(frame, face.landmarks, size))
    yield number, crops

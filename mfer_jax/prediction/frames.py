"""Per-frame inputs of a video for prediction: face crops and audio windows.

Frames are decoded once, in order, and only the face crop of each is kept (at the model's
face size), so a long high-resolution video needs memory for crops, not for frames. The audio
window of frame i is built by the same functions as in data preparation
(`mfer_jax.media.audio_features`): the whole track is resampled and turned into one log-mel, and
frame i's window is centred at t = (i - 1) / fps.

Faces come from Aff-Wild2's ``cropped_aligned/<name>/`` folder when one is given (exactly
what training saw), else from the face detector in `mfer_jax.media.faces`.
"""

from __future__ import annotations

import dataclasses
import fractions
import os
import pathlib

import av
import cv2
import numpy as np

from mfer_jax.data import affwild2
from mfer_jax.media import audio_features, decode, faces
from mfer_jax.data import records

# Frames larger than this (longest side) are downscaled for detection only: the detector's
# cost grows with the pixel count, and faces in Aff-Wild2 are large.
_DETECT_MAX_SIDE = 640


@dataclasses.dataclass
class VideoInputs:
  """Everything the model needs for every decoded frame of one video.

  Attributes:
    path: the media file.
    fps: exact frame rate.
    face: uint8 [N, S, S, 3] crops (zeros where there is no face).
    has_face: bool [N].
    mel: uint8 [N, n_mels, T] audio windows.
    unreadable: 1-based numbers of frames that could not be decoded (they count as frames,
      with no face).
    has_audio: False when the file has no audio track (the windows are silence).
    notes: human-readable warnings for the user.
  """

  path: str
  fps: fractions.Fraction
  face: np.ndarray
  has_face: np.ndarray
  mel: np.ndarray
  unreadable: list[int]
  has_audio: bool
  notes: list[str]

  @property
  def num_frames(self) -> int:
    return int(self.has_face.shape[0])


def _resize(img: np.ndarray, size: int) -> np.ndarray:
  if img.shape[:2] == (size, size):
    return img
  return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


class FaceSource:
  """Face crop of each frame: from a crops folder, or detected in the frame.

  Args:
    face_size: side of the crops handed to the model.
    crops: a ``cropped_aligned/<name>`` folder, or None to detect.
    detect_every: run the detector on every k-th frame and reuse its box in between (faces
      move little between frames; 1 = every frame).
  """

  def __init__(self, face_size: int, crops: str | os.PathLike | None = None,
               detect_every: int = 1):
    self.face_size = face_size
    self.crops = pathlib.Path(crops) if crops else None
    self.detect_every = max(1, int(detect_every))
    self._available = affwild2.list_crops(self.crops) if self.crops else set()
    self._box = None

  def __call__(self, frame_number: int, frame: np.ndarray | None) -> np.ndarray | None:
    if self.crops is not None:
      if frame_number not in self._available:
        return None
      data = (self.crops / f"{frame_number:05d}.jpg").read_bytes()
      return records.decode_face(data, self.face_size)
    if frame is None:
      return None
    if (frame_number - 1) % self.detect_every == 0:
      self._box = self._detect(frame)
    if self._box is None:
      return None
    return _resize(faces.crop_face(frame, self._box), self.face_size)

  @staticmethod
  def _detect(frame: np.ndarray) -> faces.Box | None:
    scale = min(1.0, _DETECT_MAX_SIDE / max(frame.shape[:2]))
    small = frame if scale == 1.0 else cv2.resize(
        frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    box = faces.largest_face(small)
    if box is None or scale == 1.0:
      return box
    return faces.Box(box.x0 / scale, box.y0 / scale, box.x1 / scale, box.y1 / scale, box.score)


def _decode_tolerantly(path: str, on_frame) -> tuple[fractions.Fraction, float, list[int]]:
  """Decodes every video packet, calling ``on_frame(number, rgb or None)`` per frame.

  A packet that fails to decode stands for one unreadable frame (``None``), so the frame
  count, and every later frame's time, stay right after a corrupt frame in the middle.

  Returns:
    (fps, start time of the first frame in seconds, unreadable 1-based frame numbers).
  """
  with decode.open_media(path) as container:
    stream = decode.video_stream(container, path)
    fps = decode.frame_rate(stream, path)
    number, start, unreadable = 0, None, []

    def emit(frames):
      nonlocal number, start
      for f in frames:
        number += 1
        if start is None and f.time is not None:
          start = float(f.time)
        on_frame(number, f.to_ndarray(format="rgb24"))

    for packet in container.demux(stream):
      try:
        emit(packet.decode())
      except av.error.FFmpegError:
        if packet.size:                      # the empty flush packet is not a frame
          number += 1
          unreadable.append(number)
          on_frame(number, None)
    try:
      emit(stream.decode(None))
    except av.error.FFmpegError:
      pass
  if number == 0:
    raise decode.MediaError(f"{path}: no video frame could be decoded")
  return fps, start or 0.0, unreadable


def read_video(path: str | os.PathLike, params: audio_features.FeatureParams, face_size: int,
               crops: str | os.PathLike | None = None, detect_every: int = 1) -> VideoInputs:
  """Decodes a video into per-frame model inputs.

  Args:
    path: any container/codec FFmpeg decodes (mp4, avi, mkv, flv, webm; H.264, MPEG-4,
      VP8/VP9; AAC, MP3, PCM).
    params: the training set's feature parameters (its metadata.json ``features``).
    face_size: the model's face size.
    crops: an Aff-Wild2 ``cropped_aligned/<name>`` folder to use instead of detection.
    detect_every: see `FaceSource`.

  Raises:
    decode.MediaError: if the file cannot be opened or has no decodable video frame.
  """
  path = str(path)
  source = FaceSource(face_size, crops, detect_every)
  crops_out: list[np.ndarray | None] = []
  fps, start, unreadable = _decode_tolerantly(
      path, lambda number, frame: crops_out.append(source(number, frame)))
  n = len(crops_out)
  face = np.zeros((n, face_size, face_size, 3), np.uint8)
  has_face = np.zeros(n, bool)
  for i, crop in enumerate(crops_out):
    if crop is not None:
      face[i], has_face[i] = crop, True
  notes = []
  if unreadable:
    notes.append(f"{path}: {len(unreadable)} unreadable frame(s) (first: frame "
                 f"{unreadable[0]}); they are predicted without a face")
  audio = np.zeros(0, np.float32)
  has_audio = True
  try:
    audio, rate = audio_features.load_audio(path, params, start)
    if rate == 0:
      has_audio = False
      notes.append(f"{path}: no audio track; the audio windows are silence")
  except decode.MediaError as e:
    has_audio = False
    notes.append(f"{e}; the audio windows are silence")
  windows = audio_features.frame_windows(audio_features.compute_log_mel(audio, params), fps,
                                         n, params)
  mel = np.stack([windows[i] for i in range(n)])
  if not has_face.any():
    notes.append(f"{path}: no face found in any of its {n} frames; every label comes from "
                 "the audio alone")
  return VideoInputs(path, fps, face, has_face, mel, unreadable, has_audio, notes)

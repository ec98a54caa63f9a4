"""Per-frame inputs of a video for prediction: face crops and audio windows, per person.

Faces come from Aff-Wild2's ``cropped_aligned/<name>/`` folder when one is given (exactly
what training saw). Otherwise `mfer_jax.media.faces` detects, tracks and aligns them, the
same path ``data_prep.build --detect`` makes training crops with, and ``person`` picks the
track(s): ``largest`` (the track in the most frames), ``left``, ``right``, or ``all`` (one
`VideoInputs` per track, named like Aff-Wild2: ``_left``/``_right`` for two people side by
side). Every crop is JPEG-encoded and decoded by `records.decode_face` on its way to the
model, as a training record's crop is.

The audio window of frame i is built by the same functions as in data preparation
(`mfer_jax.media.audio_features`): the whole track is resampled and turned into one log-mel,
and frame i's window is centred at t = (i - 1) / fps. It is computed once and shared by the
people of a video.
"""

from __future__ import annotations

import dataclasses
import fractions
import os
import pathlib

import numpy as np

from mfer_jax import constants
from mfer_jax.data import affwild2, records
from mfer_jax.media import audio_features, decode, faces, track


@dataclasses.dataclass
class VideoInputs:
  """Everything the model needs for every decoded frame of one video and one person.

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
    suffix: the person's name suffix: "" (the video's own name), "_left", "_right" or
      "_person<k>" (`track.select_tracks`).
    boxes: float [N, 4] face boxes (x0, y0, x1, y1) in frame pixels, NaN without a face;
      None when the crops came from a folder.
    landmarks: float [N, 5, 2] the five landmarks the crop was aligned with (same rules).
  """

  path: str
  fps: fractions.Fraction
  face: np.ndarray
  has_face: np.ndarray
  mel: np.ndarray
  unreadable: list[int]
  has_audio: bool
  notes: list[str]
  suffix: str = ""
  boxes: np.ndarray | None = None
  landmarks: np.ndarray | None = None

  @property
  def num_frames(self) -> int:
    return int(self.has_face.shape[0])


def _faces_from_folder(path: str, crops: pathlib.Path, face_size: int):
  """(face [N, S, S, 3], has_face [N], the finished `decode.TolerantFrames` for fps, start
  time and unreadable frames) from a cropped_aligned folder."""
  available = affwild2.list_crops(crops)
  frames = decode.TolerantFrames(path)
  kept = []
  for number, _ in frames:
    kept.append((crops / f"{number:05d}.jpg").read_bytes() if number in available else None)
  face = np.zeros((len(kept), face_size, face_size, 3), np.uint8)
  for i, data in enumerate(kept):
    if data is not None:
      face[i] = records.decode_face(data, face_size)
  has_face = np.array([d is not None for d in kept], bool)
  return face, has_face, frames


def _tracked_faces(path: str, face_size: int, detect_every: int, person: str):
  """([[suffix, face, has_face, boxes, landmarks]] for the chosen people (one entry without
  any face when there is no track), the video's `faces.VideoTracks`)."""
  tracked = faces.track_video(path, detect_every=detect_every)
  chosen = tracked.select(person)
  n = tracked.num_frames
  people = []
  for suffix, t in chosen:
    has_face, boxes, landmarks = t.arrays(n)
    people.append([suffix, np.zeros((n, face_size, face_size, 3), np.uint8), has_face, boxes,
                   landmarks])
  if chosen:
    for number, crops in faces.aligned_faces(path, [t for _, t in chosen],
                                             constants.FACE_SIZE):
      for entry, crop in zip(people, crops):
        if crop is not None and number <= n:
          # Through JPEG and the records' decoder: the compression and resize of training.
          entry[1][number - 1] = records.decode_face(faces.encode_crop(crop), face_size)
  else:
    nan = np.full((n, 4), np.nan), np.full((n, 5, 2), np.nan)
    people.append(["", np.zeros((n, face_size, face_size, 3), np.uint8), np.zeros(n, bool),
                   *nan])
  return people, tracked


def read_video(path: str | os.PathLike, params: audio_features.FeatureParams, face_size: int,
               crops: str | os.PathLike | None = None, detect_every: int = 1,
               person: str = "largest") -> list[VideoInputs]:
  """Decodes a video into per-frame model inputs, one `VideoInputs` per chosen person.

  Args:
    path: any container/codec FFmpeg decodes (mp4, avi, mkv, flv, webm; H.264, MPEG-4,
      VP8/VP9; AAC, MP3, PCM).
    params: the training set's feature parameters (its metadata.json ``features``).
    face_size: the model's face size.
    crops: an Aff-Wild2 ``cropped_aligned/<name>`` folder to use instead of detection.
    detect_every: run the face detector every k-th frame (`mfer_jax.media.track`).
    person: "largest", "left", "right" or "all" (`track.select_tracks`); ignored with
      ``crops``.

  Returns:
    One entry for "largest", "left" and "right", and for a video without any face; one per
    track for "all".

  Raises:
    decode.MediaError: if the file cannot be opened or has no decodable video frame.
    ValueError: for an unknown ``person``.
  """
  if person not in track.PERSON_CHOICES:
    raise ValueError(f"person {person!r}: choose one of {', '.join(track.PERSON_CHOICES)}")
  path = str(path)
  notes = []
  if crops:
    face, has_face, frames = _faces_from_folder(path, pathlib.Path(crops), face_size)
    people = [["", face, has_face, None, None]]
    fps, start, unreadable, n = frames.fps, frames.start_time, frames.unreadable, len(has_face)
  else:
    people, tracked = _tracked_faces(path, face_size, detect_every, person)
    fps, start, unreadable, n = (tracked.fps, tracked.start_time, tracked.unreadable,
                                 tracked.num_frames)
    if person in ("left", "right") and len(tracked.select("all")) == 1 and tracked.tracks:
      notes.append(f"{path}: one person found; --person={person} uses that face")
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
  out = []
  for suffix, face, has_face, boxes, landmarks in people:
    person_notes = list(notes)
    if not has_face.any():
      person_notes.append(f"{path}: no face found in any of its {n} frames; every label comes "
                          "from the audio alone")
    out.append(VideoInputs(path, fps, face, has_face, mel, unreadable, has_audio, person_notes,
                           suffix, boxes, landmarks))
  return out

"""Face tracks: the same person's face linked across the frames of a video.

`FaceTracker` is fed the frames in order and links each frame's faces to the tracks seen so
far. Rules:

- **Detection schedule.** The detector runs on frame 1 and every ``detect_every``-th frame
  after it. On the frames in between, each track seen on the previous frame is followed by
  `detector.FaceDetector.refine` (O-Net on its last box, a twentieth of a detection's cost);
  so is a track the detector misses on a detection frame. A followed face whose O-Net face
  probability is below ``min_refine_score`` is dropped, and a track is followed for at most
  ``max_gap`` frames (or ``detect_every - 1``, if larger) since the detector last found it:
  only the detector can keep a track alive. New faces appear on detection frames only.
- **Matching.** On a detection frame every (track, detection) pair gets the cost
  ``(1 - IoU) + d``, with IoU between the track's last box and the detection's box, and d the
  mean distance between their five landmarks divided by the track's face size (the square
  root of its box area). Pairs with IoU >= ``min_iou`` or d <= ``max_landmark_distance`` may
  match; the cheapest pairs are taken first, each track and detection at most once. A
  detection left over starts a new track.
- **Gaps.** A track missed on up to ``max_gap`` consecutive frames stays open and is matched
  against its last box: a face the detector loses for a moment (a hand, a blink of motion
  blur, a turn) keeps its track. Longer gaps end it; the frames of a gap have no face in that
  track (prediction then follows its ``--no_face`` policy).
- **Order.** Tracks are numbered in order of appearance; the output is deterministic.

`select_tracks` then picks the tracks a caller wants (``--person``) and names them:
``largest`` is the track present in the most frames (the subject of a one-person video, even
when another face is bigger for a while); ``left``/``right`` are the left and right of the two
longest tracks (by the median of their box centres); ``all`` is every track of at least
``min_frames`` frames, named like Aff-Wild2: one track keeps the video's name, two tracks seen
together get ``_left`` and ``_right``, anything else ``_person1``, ``_person2``... in order
of appearance.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mfer_jax.media import detector as detector_lib

PERSON_CHOICES = ("largest", "all", "left", "right")

# Defaults (documented above and in docs/faces.md).
DEFAULT_MIN_IOU = 0.2
DEFAULT_MAX_LANDMARK_DISTANCE = 0.5
DEFAULT_MAX_GAP = 25           # frames: one second at 25 fps
DEFAULT_MIN_REFINE_SCORE = 0.05
DEFAULT_MIN_FRAMES = 5


@dataclasses.dataclass
class Track:
  """One person's face over a video.

  Attributes:
    track_id: 1-based, in order of appearance.
    frames: 1-based frame numbers with a face, increasing.
    faces: the face on each of those frames.
    detected: per frame, True if the detector found it (False: followed by refinement).
  """

  track_id: int
  frames: list[int] = dataclasses.field(default_factory=list)
  faces: list[detector_lib.Face] = dataclasses.field(default_factory=list)
  detected: list[bool] = dataclasses.field(default_factory=list)

  def __len__(self) -> int:
    return len(self.frames)

  @property
  def last(self) -> detector_lib.Face:
    return self.faces[-1]

  @property
  def last_detected(self) -> int:
    """The last frame on which the detector (not refinement) found this face."""
    return next(n for n, d in zip(reversed(self.frames), reversed(self.detected)) if d)

  @property
  def median_x(self) -> float:
    """Median horizontal centre of the track's boxes (left/right order)."""
    return float(np.median([f.center[0] for f in self.faces]))

  @property
  def mean_area(self) -> float:
    return float(np.mean([f.area for f in self.faces]))

  def face_at(self, frame_number: int) -> detector_lib.Face | None:
    """The track's face on a 1-based frame, or None."""
    i = np.searchsorted(self.frames, frame_number)
    if i < len(self.frames) and self.frames[i] == frame_number:
      return self.faces[i]
    return None

  def arrays(self, num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame of a ``num_frames`` video: (has_face bool [N], boxes float [N, 4],
    landmarks float [N, 5, 2]); NaN where the track has no face."""
    has_face = np.zeros(num_frames, bool)
    boxes = np.full((num_frames, 4), np.nan)
    landmarks = np.full((num_frames, 5, 2), np.nan)
    for number, face in zip(self.frames, self.faces):
      if 1 <= number <= num_frames:
        has_face[number - 1] = True
        boxes[number - 1] = face.box
        landmarks[number - 1] = face.landmarks
    return has_face, boxes, landmarks


def _landmark_distance(a: detector_lib.Face, b: detector_lib.Face) -> float:
  """Mean landmark distance in units of ``a``'s face size."""
  size = max(np.sqrt(a.area), 1.0)
  return float(np.linalg.norm(a.landmarks - b.landmarks, axis=1).mean() / size)


class FaceTracker:
  """Links faces across frames into `Track`s (rules in the module docstring).

  Args:
    detector: the face detector (one per process is enough).
    detect_every: run the detector on every k-th frame (1: every frame).
    min_iou, max_landmark_distance: the matching gate.
    max_gap: frames a track may be missed and still continue.
    min_refine_score: O-Net face probability below which a followed face is dropped.
  """

  def __init__(self, detector: detector_lib.FaceDetector, detect_every: int = 1, *,
               min_iou: float = DEFAULT_MIN_IOU,
               max_landmark_distance: float = DEFAULT_MAX_LANDMARK_DISTANCE,
               max_gap: int = DEFAULT_MAX_GAP,
               min_refine_score: float = DEFAULT_MIN_REFINE_SCORE):
    if detect_every < 1:
      raise ValueError(f"detect_every must be at least 1, got {detect_every}")
    self.detector = detector
    self.detect_every = int(detect_every)
    self.min_iou = min_iou
    self.max_landmark_distance = max_landmark_distance
    self.max_gap = int(max_gap)
    self.min_refine_score = min_refine_score
    self._open: list[Track] = []
    self._closed: list[Track] = []
    self._next_id = 1
    self._count = 0

  def update(self, frame_number: int, frame: np.ndarray | None) -> None:
    """Feeds the next frame (1-based numbers, in order; None for an unreadable frame)."""
    self._count += 1
    self._close_stale(frame_number)
    if frame is None:
      return
    if (self._count - 1) % self.detect_every == 0:
      self._match(frame_number, self.detector.detect(frame))
    self._follow(frame_number, frame)

  def finish(self) -> list[Track]:
    """All tracks, in order of appearance (the tracker can then be discarded)."""
    tracks = sorted(self._closed + self._open, key=lambda t: t.track_id)
    self._open, self._closed = [], tracks
    return list(tracks)

  def _close_stale(self, frame_number: int) -> None:
    still = []
    for track in self._open:
      (still if frame_number - track.frames[-1] - 1 <= self.max_gap
       else self._closed).append(track)
    self._open = still

  def _follow(self, frame_number: int, frame: np.ndarray) -> None:
    """Refines every track that was seen on the previous frame and has no face on this one."""
    limit = max(self.max_gap, self.detect_every - 1)
    for track in self._open:
      if track.frames[-1] != frame_number - 1:
        continue           # matched on this frame already, or lost: waits for a detection
      if frame_number - track.last_detected > limit:
        continue
      face = self.detector.refine(frame, track.last)
      if face.score >= self.min_refine_score:
        track.frames.append(frame_number)
        track.faces.append(face)
        track.detected.append(False)

  def _match(self, frame_number: int, faces: list[detector_lib.Face]) -> None:
    pairs = []
    for ti, track in enumerate(self._open):
      for fi, face in enumerate(faces):
        overlap = detector_lib.iou(track.last.box, face.box)
        distance = _landmark_distance(track.last, face)
        if overlap >= self.min_iou or distance <= self.max_landmark_distance:
          pairs.append((1.0 - overlap + distance, ti, fi))
    used_tracks, used_faces = set(), set()
    for _, ti, fi in sorted(pairs):
      if ti in used_tracks or fi in used_faces:
        continue
      used_tracks.add(ti)
      used_faces.add(fi)
      self._append(self._open[ti], frame_number, faces[fi])
    for fi, face in enumerate(faces):
      if fi not in used_faces:
        track = Track(self._next_id)
        self._next_id += 1
        self._append(track, frame_number, face)
        self._open.append(track)

  @staticmethod
  def _append(track: Track, frame_number: int, face: detector_lib.Face) -> None:
    track.frames.append(frame_number)
    track.faces.append(face)
    track.detected.append(True)


def _overlap_in_time(a: Track, b: Track) -> bool:
  return bool(set(a.frames) & set(b.frames))


def select_tracks(tracks: list[Track], person: str,
                  min_frames: int = DEFAULT_MIN_FRAMES) -> list[tuple[str, Track]]:
  """The tracks ``person`` asks for, with their name suffixes (rules in the docstring).

  Args:
    tracks: every track of a video (`FaceTracker.finish`).
    person: one of `PERSON_CHOICES`.
    min_frames: tracks shorter than this are ignored by ``all``, ``left`` and ``right``
      (detector false alarms rarely last); ``largest`` takes the longest track regardless.

  Returns:
    [(suffix, track)]: suffix "" for the video's own name, else "_left", "_right" or
    "_person<k>". Empty when there is no track.

  Raises:
    ValueError: for an unknown ``person``.
  """
  if person not in PERSON_CHOICES:
    raise ValueError(f"person {person!r}: choose one of {', '.join(PERSON_CHOICES)}")
  if not tracks:
    return []
  by_length = sorted(tracks, key=lambda t: (-len(t), -t.mean_area, t.track_id))
  if person == "largest":
    return [("", by_length[0])]
  kept = [t for t in by_length if len(t) >= min_frames] or by_length[:1]
  if person in ("left", "right"):
    main = sorted(kept[:2], key=lambda t: t.median_x)
    return [("", main[0] if person == "left" else main[-1])]
  if len(kept) == 1:
    return [("", kept[0])]
  if len(kept) == 2 and _overlap_in_time(*kept):
    left, right = sorted(kept, key=lambda t: t.median_x)
    return [("_left", left), ("_right", right)]
  return [(f"_person{k}", t) for k, t in
          enumerate(sorted(kept, key=lambda t: t.frames[0]), start=1)]

"""Clips: T frames of one video at a stride, read from the per-frame records (no new format).

A clip of length T and stride s starting at frame f of video v holds frames
``f, f + s, ..., f + (T - 1) s`` of v: consecutive frames at the video's own frame rate (s = 1),
or every s-th one. Clips never cross a video boundary; a frame outside the video, or one with
no record (train and validation keep no record for a frame labelled -1), is a padded slot:
record index -1, no input, masked out of the loss and the metric. A clip longer than its video
is padded too, never an index error.

`ClipTable` holds the geometry of every clip of a split. Each video gets a row of slots for
frames ``1 - P .. L + P`` (P = (T - 1) s, L = the video's last frame with a record), and a clip
is named by the slot of its first frame, so a clip may start up to P frames before the video
(its first slots padded) and end up to P frames after it. Over all clips that start in
``1 - P .. L``, every frame of the video is in exactly T clips: both ends of a video are as
well covered as its middle, which keeps the resampling weights of `mfer_jax.data.sampling`
unbiased. In frame mode (T = 1) a clip is one record and its id is the record index.

`windows` lays out the evaluation and prediction windows: per video and per residue of the
frame number modulo s, windows of T slots whose starts are ``hop`` slots apart, the first one
starting T - hop slots before the video, so that (when hop divides T) every frame is covered
by exactly T / hop windows, each window position equally often.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mfer_jax import constants, errors


# Longest clip: per-clip class counts are stored as int16.
MAX_LENGTH = 4096


class ClipError(errors.UserError, ValueError):
  """A split index whose frames cannot be laid out as clips (duplicated frame numbers)."""


@dataclasses.dataclass(frozen=True)
class SequenceOptions:
  """The ``config.data.sequence`` keys (documented in `mfer_jax.data.config`).

  Attributes:
    length: frames per clip T; 1 is frame mode.
    stride: frame step inside a clip (1 = consecutive frames at the video's frame rate).
    hop: slots between the starts of evaluation/prediction windows, 1 <= hop <= length;
      0 means ``max(1, length // 2)``.
  """

  length: int = 1
  stride: int = 1
  hop: int = 0

  def __post_init__(self):
    if self.length < 1 or self.stride < 1 or self.hop < 0:
      raise errors.UsageError(
          f"data.sequence: length={self.length}, stride={self.stride}, hop={self.hop}: length "
          "and stride must be >= 1 and hop >= 0 (0 = length // 2)")
    if self.length > MAX_LENGTH:
      raise errors.UsageError(f"data.sequence.length={self.length}: at most {MAX_LENGTH} frames")
    if self.hop > self.length:
      raise errors.UsageError(
          f"data.sequence.hop={self.hop} is larger than data.sequence.length={self.length}: "
          "windows would skip frames; use a hop between 1 and the length (0 = length // 2)")

  @classmethod
  def from_config(cls, cfg) -> "SequenceOptions":
    return cls(length=int(cfg.length), stride=int(cfg.stride), hop=int(cfg.hop))

  @property
  def window_hop(self) -> int:
    """The hop in force (``hop``, or ``length // 2`` when it is 0)."""
    return self.hop or max(1, self.length // 2)

  @property
  def span(self) -> int:
    """Frames from a clip's first to its last frame, both included: (T - 1) s + 1."""
    return (self.length - 1) * self.stride + 1


class ClipTable:
  """Every clip of one split, and the records each of its frames reads.

  Args:
    label: int32 [N] per-record label (-1: no label).
    video_id: int32 [N] per-record video index.
    frame: int32 [N] per-record 1-based frame number.
    length: T.
    stride: s.

  Raises:
    ClipError: if two records of one video have the same frame number.
  """

  def __init__(self, label: np.ndarray, video_id: np.ndarray, frame: np.ndarray,
               length: int = 1, stride: int = 1):
    self.length, self.stride = int(length), int(stride)
    self._label = np.asarray(label, np.int32)
    n = self._label.shape[0]
    if self.length == 1:
      self.num_clips = n
      return
    video_id = np.asarray(video_id, np.int64)
    frame = np.asarray(frame, np.int64)
    pad = (self.length - 1) * self.stride
    num_videos = int(video_id.max(initial=-1)) + 1
    last = np.zeros(num_videos, np.int64)
    np.maximum.at(last, video_id, frame)
    last = np.maximum(last, 1)
    # Video v's slots cover frames 1 - pad .. last[v] + pad; slot(v, f) = base[v] + pad + f - 1.
    self._pad = pad
    self._base = np.concatenate([[0], np.cumsum(last + 2 * pad)])
    self._last = last
    self._slot_record = np.full(int(self._base[-1]), -1, np.int64)
    slots = self._base[video_id] + pad + frame - 1
    self._slot_record[slots] = np.arange(n)
    if np.unique(slots).size != n:
      raise ClipError("the split index has two records with the same (video, frame); rebuild "
                      "the dataset with `python -m data_prep.build`")
    # Clip ids: the slots a clip may start at, 1 - pad .. last[v] in each video.
    starts = [np.arange(b, b + pad + l) for b, l in zip(self._base[:-1], last)]
    self._starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    self.num_clips = int(self._starts.size)

  @property
  def offsets(self) -> np.ndarray:
    """Slot offsets of a clip's frames, 0, s, ..., (T - 1) s."""
    return np.arange(self.length, dtype=np.int64) * self.stride

  def records(self, ids: np.ndarray) -> np.ndarray:
    """int64 [n, T] record index of every frame of clips ``ids`` (-1: padded slot)."""
    ids = np.asarray(ids, np.int64)
    if self.length == 1:
      return ids[:, None]
    return self._slot_record[self._starts[ids][:, None] + self.offsets]

  def class_counts(self) -> np.ndarray:
    """int16 [num_clips, C]: labelled frames of each class in every clip."""
    c = constants.NUM_CLASSES
    if self.length == 1:
      lab = self._label
      counts = np.zeros((lab.size, c), np.int16)
      keep = np.flatnonzero(lab >= 0)
      counts[keep, lab[keep]] = 1
      return counts
    flat = np.zeros(self.num_clips * c, np.int64)
    rows = np.arange(self.num_clips, dtype=np.int64)
    for j in range(self.length):
      rec = self._slot_record[self._starts + j * self.stride]
      lab = np.where(rec >= 0, self._label[np.maximum(rec, 0)], -1)
      keep = lab >= 0
      flat += np.bincount(rows[keep] * c + lab[keep], minlength=flat.size)
    return flat.reshape(self.num_clips, c).astype(np.int16)

  def video_and_start(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(video index, first frame number) of clips ``ids``; the frame may be < 1 (padding)."""
    if self.length == 1:
      raise ValueError("frame mode: a clip id is a record index; use the split index")
    slots = self._starts[np.asarray(ids, np.int64)]
    video = np.searchsorted(self._base, slots, side="right") - 1
    return video, slots - self._base[video] - self._pad + 1


def windows(video_id: np.ndarray, frame: np.ndarray, target: np.ndarray,
            options: SequenceOptions) -> np.ndarray:
  """Evaluation/prediction windows over a split (or one video): int64 [W, T] record indices.

  Args:
    video_id: int [N] per-record video index.
    frame: int [N] per-record 1-based frame number.
    target: bool [N], the records to score (labelled ones for validation, every one for the
      test split and prediction). A window without a target frame is dropped.
    options: T, stride and hop.

  Returns:
    Window rows in (video, residue, start) order; -1 marks a padded slot (outside the video,
    or a frame without a record). Every target record is in at least one window; with hop
    dividing T, in exactly T / hop.
  """
  t, s, hop = options.length, options.stride, options.window_hop
  video_id = np.asarray(video_id, np.int64)
  frame = np.asarray(frame, np.int64)
  target = np.asarray(target, bool)
  rows = []
  for v in np.unique(video_id):
    mine = np.flatnonzero(video_id == v)
    last = int(frame[mine].max())
    for r in range(min(s, last)):
      # Chain of frames 1 + r, 1 + r + s, ...: position q holds frame 1 + r + q s.
      q_len = -(-(last - r) // s)
      chain = np.full(q_len, -1, np.int64)
      on_chain = (frame[mine] - 1 - r) % s == 0
      chain[(frame[mine][on_chain] - 1 - r) // s] = mine[on_chain]
      hit = np.zeros(q_len, bool)
      hit[(frame[mine][on_chain & target[mine]] - 1 - r) // s] = True
      if not hit.any():
        continue
      padded = np.concatenate([np.full(t, -1, np.int64), chain, np.full(t, -1, np.int64)])
      hit_padded = np.concatenate([np.zeros(t, bool), hit, np.zeros(t, bool)])
      # Window starts (chain positions) from -(t - hop) while the window reaches the chain.
      starts = np.arange(-(t - hop), q_len, hop)
      idx = starts[:, None] + t + np.arange(t)
      keep = hit_padded[idx].any(axis=1)
      rows.append(padded[idx[keep]])
  if not rows:
    return np.zeros((0, t), np.int64)
  return np.concatenate(rows)

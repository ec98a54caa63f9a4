"""Which train clips each epoch draws: class weights, their schedule, stratification, F1 feedback.

Epoch ``e`` is a list of ``epoch_size`` clip ids (`mfer_jax.data.clips.ClipTable`; in frame
mode, T = 1, a clip id is a record index), a pure function of the index arrays, the options,
the seed, ``e`` and the class-F1 schedule, drawn with
``Generator(PCG64(SeedSequence([seed, e])))``. Nothing depends on the number of hosts or
workers, so every process can compute the same list and read its own part of it.

Steps of one epoch in 'dynamic' mode:

1. candidates: clips with at least one labelled frame (label >= 0; in frame mode the labelled
   records, so -1 frames are never drawn); with ``stratify_chunk`` K > 0, one uniformly random
   candidate from every (video, K-frame chunk of the clip's first frame), where chunk j of a
   video holds frames jK+1 .. (j+1)K, so near-duplicate neighbouring frames do not dominate;
2. class weights: ``w_c = n_c^-alpha(e)``, with n_c the labelled frames of class c among the
   candidates, times ``max(1 - F1_c, 0.01)^beta`` when adaptive feedback is on;
3. ``epoch_size`` draws with replacement. In frame mode record i is chosen with probability
   proportional to ``w_{label(i)}``, so class c gets mass ``n_c^(1-alpha) / sum_k n_k^(1-alpha)``
   (the *target*): alpha 1 is balanced, alpha 0 is the natural distribution.

**Clips** (T > 1) hold frames of several classes, so a clip has no single label. Its weight
is the *mean* of per-class frame weights ``u_c`` over its labelled frames,
``w(k) = sum_c m_kc u_c / M_k`` (m_kc labelled frames of class c in clip k, M_k = sum_c m_kc),
and ``u`` is chosen so that the labelled frames of the epoch have the frame-mode target class
frequencies *in expectation*: the expected count of class c per draw is ``(H u)_c / Z`` with
``H = sum_k m_k m_k^T / M_k``, so ``u`` solves ``H u ∝ n * w`` (`clip_class_weights`). Why this
choice:

- a clip of one class gets exactly the frame weight of its class (``H`` is diagonal when every
  clip is pure, and then ``u = w``), so clips inside long segments, the common case, are
  weighted as frame mode weights their frames;
- alpha 0 gives exactly uniform clip draws (``u = 1``): 'dynamic' at alpha 0 is the natural
  distribution, as in frame mode;
- a clip's weight does not grow with how many of its frames are labelled, so no clip is
  favoured for being long or free of -1 runs, yet a clip is never drawn for nothing (clips
  without a labelled frame are not candidates);
- what the loss sees (labelled frames) has the class frequencies the schedule asks for, which
  neither weighting by the centre frame nor by the majority label guarantees: a rare class
  that mostly appears in short segments would be under-drawn by both.

When mixed clips make the exact target unreachable with non-negative ``u`` (never seen on
Aff-Wild2-like segment lengths), a multiplicative fixed point gets as close as it can.

'natural' mode instead shuffles the candidates without replacement (each once per epoch,
repeated if ``epoch_size`` is larger): the plain baseline without resampling.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, Sequence

import ml_collections
import numpy as np

from mfer_jax import constants
from mfer_jax.data import clips as clips_lib

MODES = constants.SAMPLING_MODES
ALPHA_SHAPES = ("linear", "cosine", "constant")
# Floor of (1 - F1_c) in adaptive mode: a class that is perfect on validation keeps a small
# weight instead of vanishing (and the weights can never all be zero).
MIN_ADAPTIVE_FACTOR = 0.01


def alpha_at(epoch: int, *, start: float, end: float, decay_epochs: int, shape: str) -> float:
  """The resampling exponent of ``epoch``: start -> end over ``decay_epochs`` epochs.

  'linear' and 'cosine' reach ``end`` at epoch ``decay_epochs`` and stay there (at once if
  ``decay_epochs <= 0``); 'constant' is ``start`` throughout.
  """
  if shape not in ALPHA_SHAPES:
    raise ValueError(f"alpha_shape must be one of {ALPHA_SHAPES}, got {shape!r}")
  if shape == "constant":
    return float(start)
  t = 1.0 if decay_epochs <= 0 else min(max(epoch, 0) / decay_epochs, 1.0)
  if t >= 1.0:
    return float(end)   # exactly, not end up to rounding
  if shape == "linear":
    return float(start + (end - start) * t)
  return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t)))


def chunk_groups(video_id: np.ndarray, frame: np.ndarray, chunk: int) -> np.ndarray:
  """int64 id of each record's (video, ``chunk``-frame chunk); frames are 1-based."""
  chunk_of = (frame.astype(np.int64) - 1) // chunk
  return video_id.astype(np.int64) * (int(chunk_of.max(initial=0)) + 1) + chunk_of


def stratify(groups: np.ndarray, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One uniformly random member of each group among ``candidates``, as sorted indices.

  Args:
    groups: group id of every record (see `chunk_groups`).
    candidates: record indices to choose from.
    rng: source of the choice.
  """
  keys = groups[candidates]
  # Sorting by (group, random key) puts a uniformly random member first in each group.
  order = np.lexsort((rng.random(candidates.shape[0]), keys))
  sorted_keys = keys[order]
  first = np.ones(sorted_keys.shape[0], bool)
  first[1:] = sorted_keys[1:] != sorted_keys[:-1]
  return np.sort(candidates[order[first]])


def class_weights(counts: np.ndarray, alpha: float, class_f1: np.ndarray | None = None,
                  beta: float = 0.0) -> np.ndarray:
  """Per-class weight of one record: ``n_c^-alpha * max(1 - F1_c, 0.01)^beta``; 0 if n_c = 0."""
  counts = np.asarray(counts, np.float64)
  w = np.zeros_like(counts)
  present = counts > 0
  w[present] = counts[present] ** -alpha
  if class_f1 is not None and beta > 0:
    w *= np.maximum(1.0 - np.asarray(class_f1, np.float64), MIN_ADAPTIVE_FACTOR) ** beta
  return w


def clip_class_weights(counts: np.ndarray, frame_weights: np.ndarray) -> np.ndarray:
  """Per-class frame weights ``u`` for clips, from their class counts (see the module doc).

  Args:
    counts: [n, C] labelled frames of each class in each candidate clip (every row > 0).
    frame_weights: [C] the frame-mode class weights ``w_c``.

  Returns:
    float64 [C] ``u >= 0`` such that drawing clip k with probability proportional to
    ``counts[k] @ u / counts[k].sum()`` gives labelled frames the class frequencies that frame
    mode gives, ``n_c w_c / sum(n w)`` with ``n = counts.sum(0)``; absent classes get 0.
  """
  m = np.asarray(counts, np.float64)
  n = m.sum(axis=0)
  target = n * np.asarray(frame_weights, np.float64)
  present = target > 0
  u = np.zeros(m.shape[1])
  if not present.any():
    return u
  h = (m / m.sum(axis=1, keepdims=True)).T @ m
  sub = h[np.ix_(present, present)]
  t = target[present]
  try:
    sol = np.linalg.solve(sub, t)
  except np.linalg.LinAlgError:
    sol = np.full(t.shape, -1.0)
  if not (sol > 0).all():
    # Multiplicative fixed point from the frame weights: stays positive, and its fixed points
    # are exactly the solutions of H u = t when one exists.
    sol = np.asarray(frame_weights, np.float64)[present].copy()
    for _ in range(2000):
      sol = sol * t / np.maximum(sub @ sol, 1e-300)
  u[present] = sol / sol.max()
  return u


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """The ``config.data.sampling`` keys (documented in `mfer_jax.data.config`)."""

  mode: str = "dynamic"
  alpha_start: float = 1.0
  alpha_end: float = 0.3
  alpha_decay_epochs: int = 10
  alpha_shape: str = "linear"
  epoch_size: int = 0
  stratify_chunk: int = 0
  adaptive_beta: float = 0.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"sampling.mode must be one of {MODES}, got {self.mode!r}")
    if self.alpha_shape not in ALPHA_SHAPES:
      raise ValueError(f"sampling.alpha_shape must be one of {ALPHA_SHAPES}, "
                       f"got {self.alpha_shape!r}")
    if self.epoch_size < 0 or self.stratify_chunk < 0 or self.adaptive_beta < 0:
      raise ValueError(f"sampling.epoch_size, stratify_chunk and adaptive_beta must be >= 0: "
                       f"{self}")

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "SamplingOptions":
    return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


# A class-F1 schedule: ((first epoch it applies to, per-class F1), ...), by first epoch.
F1Schedule = tuple[tuple[int, tuple[float, ...]], ...]


class EpochSampler:
  """The clip ids of every training epoch, from the train split's index arrays.

  Immutable apart from a cache of recent epochs, so it can be pickled into Grain workers and
  every copy draws the same epochs; `with_class_f1` returns a new sampler.

  Args:
    label, video_id, frame: the train split's index arrays.
    options: the sampling recipe.
    seed: the data seed.
    class_f1_schedule: adaptive F1 entries (see `with_class_f1_schedule`).
    sequence: clip length and stride (default: frame mode, T = 1).
  """

  def __init__(self, label: np.ndarray, video_id: np.ndarray, frame: np.ndarray,
               options: SamplingOptions, seed: int,
               class_f1_schedule: F1Schedule = (),
               sequence: clips_lib.SequenceOptions = clips_lib.SequenceOptions()):
    self.options = options
    self.seed = int(seed)
    self.class_f1_schedule = tuple(class_f1_schedule)
    self.sequence = sequence
    self.clips = clips_lib.ClipTable(label, video_id, frame, sequence.length, sequence.stride)
    self._label = np.asarray(label, np.int32)
    if sequence.length == 1:
      self._counts = None
      self._valid = np.flatnonzero(self._label >= 0)
      start_video, start_frame = np.asarray(video_id), np.asarray(frame)
    else:
      self._counts = self.clips.class_counts()
      self._valid = np.flatnonzero(self._counts.sum(axis=1) > 0)
      start_video, start_frame = self.clips.video_and_start(np.arange(self.clips.num_clips))
      # Chunks of the first frame, shifted so that clips starting before the video count too.
      start_frame = start_frame + (sequence.length - 1) * sequence.stride
    if self._valid.size == 0:
      raise ValueError("the train split has no labelled frame (label >= 0) to sample")
    self._groups = None
    num_candidates = self._valid.size
    if options.stratify_chunk:
      self._groups = chunk_groups(start_video, start_frame, options.stratify_chunk)
      num_candidates = np.unique(self._groups[self._valid]).size
    self.num_candidates = int(num_candidates)
    # Clips per epoch: as many frames as frame mode would draw (one per candidate).
    self.epoch_size = int(options.epoch_size or -(-num_candidates // sequence.length))
    self._lock = threading.Lock()
    self._cache: dict[int, np.ndarray] = {}

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    del state["_lock"], state["_cache"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()
    self._cache = {}

  def alpha(self, epoch: int) -> float:
    o = self.options
    return alpha_at(epoch, start=o.alpha_start, end=o.alpha_end,
                    decay_epochs=o.alpha_decay_epochs, shape=o.alpha_shape)

  def class_f1(self, epoch: int) -> np.ndarray | None:
    """The per-class F1 in force at ``epoch`` (the latest entry starting at or before it)."""
    current = None
    for first_epoch, f1 in self.class_f1_schedule:
      if first_epoch <= epoch:
        current = np.asarray(f1, np.float64)
    return current

  def with_class_f1_schedule(self, schedule: F1Schedule) -> "EpochSampler":
    """A copy of this sampler with the class-F1 schedule replaced by ``schedule``."""
    entries = []
    for first_epoch, class_f1 in schedule:
      f1 = tuple(float(v) for v in class_f1)
      if len(f1) != constants.NUM_CLASSES or not all(0.0 <= v <= 1.0 for v in f1):
        raise ValueError(f"class_f1 must hold {constants.NUM_CLASSES} values in [0, 1], got {f1}")
      entries.append((int(first_epoch), f1))
    new = EpochSampler.__new__(EpochSampler)
    new.__setstate__({**self.__getstate__(), "class_f1_schedule": tuple(sorted(entries))})
    return new

  def with_class_f1(self, class_f1: Sequence[float], first_epoch: int) -> "EpochSampler":
    """A copy whose epochs from ``first_epoch`` on use ``class_f1`` for adaptive weights."""
    kept = tuple(e for e in self.class_f1_schedule if e[0] < first_epoch)
    return self.with_class_f1_schedule(kept + ((first_epoch, class_f1),))

  def _rng(self, epoch: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))

  def _candidates(self, rng: np.random.Generator) -> np.ndarray:
    if self._groups is None:
      return self._valid
    return stratify(self._groups, self._valid, rng)

  def _distribution(self, epoch: int, rng: np.random.Generator):
    candidates = self._candidates(rng)
    if self._counts is None:
      counts = np.bincount(self._label[candidates], minlength=constants.NUM_CLASSES)
      weights = class_weights(counts, self.alpha(epoch), self.class_f1(epoch),
                              self.options.adaptive_beta)
      p = weights[self._label[candidates]]
      return candidates, p / p.sum()
    m = self._counts[candidates].astype(np.float64)
    frame_w = class_weights(m.sum(axis=0), self.alpha(epoch), self.class_f1(epoch),
                            self.options.adaptive_beta)
    u = clip_class_weights(m, frame_w)
    p = (m @ u) / m.sum(axis=1)
    return candidates, p / p.sum()

  def distribution(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(candidate clip ids, their draw probabilities) of a 'dynamic' epoch."""
    return self._distribution(epoch, self._rng(epoch))

  def _draw(self, epoch: int) -> np.ndarray:
    rng = self._rng(epoch)
    if self.options.mode == "natural":
      candidates = self._candidates(rng)
      reps = -(-self.epoch_size // candidates.size)
      return np.concatenate([rng.permutation(candidates) for _ in range(reps)])[:self.epoch_size]
    candidates, p = self._distribution(epoch, rng)
    return candidates[rng.choice(candidates.size, size=self.epoch_size, p=p)]

  def epoch_indices(self, epoch: int) -> np.ndarray:
    """The ``epoch_size`` clip ids of ``epoch``, in draw order (int64; records in frame mode)."""
    with self._lock:
      if epoch not in self._cache:
        # Readers move forward, so keeping the two most recent epochs is enough.
        for old in sorted(self._cache)[:-1]:
          del self._cache[old]
        self._cache[epoch] = self._draw(epoch)
      return self._cache[epoch]

  def epoch_clips(self, epoch: int) -> np.ndarray:
    """int64 [epoch_size, T]: the record of every frame of every clip of ``epoch`` (-1: pad)."""
    return self.clips.records(self.epoch_indices(epoch))

  def clip_class_counts(self, ids: np.ndarray) -> np.ndarray:
    """[n, C] labelled frames of each class in clips ``ids``."""
    if self._counts is None:
      lab = self._label[np.asarray(ids)]
      return (lab[:, None] == np.arange(constants.NUM_CLASSES)).astype(np.int16)
    return self._counts[np.asarray(ids)]

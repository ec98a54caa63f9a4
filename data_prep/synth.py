"""A synthetic dataset in the exact Aff-Wild2 Expression layout, learnable from face and audio.

    python -m data_prep.synth --out=data/synth --num_videos=16 --seed=0 --workers=2

Layout (the real one is described in data_prep/README.md, "The layout read")::

    DIR/batch1/<video>.mp4|.avi, DIR/batch2/...         media, split over two batch folders
    DIR/cropped_aligned/<name>/<NNNNN>.jpg              112x112 aligned face crops (the drawn
                                                        face's five landmarks on the ArcFace
                                                        template, `mfer_jax.media.align`),
                                                        NNNNN = 1-based frame = annotation
                                                        line; no file when the face is not in
                                                        the frame
    DIR/annotations/EXPR_Recognition_Challenge/{Train_Set,Validation_Set}/<name>.txt
    DIR/test_set/EXPR_Recognition_Challenge_test_set_release.txt    test names, one per line

``<name>`` is the video stem (``<index>-<W>x<H>``: 256x192 frames, 384x192 with two persons),
or ``<stem>_left`` / ``<stem>_right`` in two-person videos. Videos last 20-40 s by default
(``--min-seconds``/``--max-seconds``; the tests use 3-4 s).
Annotation files start with the header line, then one label per frame in -1..7.
``DIR/.synth/`` holds per-video completion markers (ignored by readers).

**Class scheme.** Each class has a face code f(c) and an audio code a(c), 4 values each, and
only the pair identifies the class (`FACE_CODE`, `AUDIO_CODE`)::

    class       face code (drawn)   audio code (voice)
    Neutral     0 calm              0 low pitch, slow syllables
    Anger       3 tense             3 high pitch, fast syllables
    Disgust     3 tense             2 high pitch, slow syllables
    Fear        2 sad               3 high pitch, fast syllables
    Happiness   1 smile             0 low pitch, slow syllables
    Sadness     2 sad               1 low pitch, fast syllables
    Surprise    1 smile             2 high pitch, slow syllables
    Other       0 calm              1 low pitch, fast syllables

So the face alone cannot split Neutral from Other (the two largest classes), nor Happiness
from Surprise; the audio alone cannot split Neutral from Happiness, nor Other from Sadness.
Fusion can split all eight. Faces: see `data_prep.synth_render` (mouth, brows, eyes).
Audio codes are the pitch band and the syllable rate of a vowel-like voice, which a 2 s
log-mel window (16 kHz, 64 mels to 8 kHz) shows.

**Noise**, so that each modality is well above chance but not perfect: in 15% of segments
the face shows a random code; 10% of segments are silent and 10% have a random voice code;
the voice sits in per-video background noise (SNR 10-30 dB) at a per-video loudness; head
motion, lighting and pixel noise vary per frame; faces leave the frame now and then (those
frames have a label but no crop). Labels come in segments of 1-6 s drawn with
Aff-Wild2's class frequencies (Anger, Disgust, Fear about 2% each), with runs of -1; every
class is given at least 3 segments in train and in validation (fewer only when a tiny
set has no room).

**Video dynamics** (`_plan_dynamics`, `face_dynamics`), so that there is something to learn
over time and single frames can mislead, as in real video. None of it changes a label or
what a class means; it comes from its own random stream (``SeedSequence([seed, video, 2])``),
so a seed's annotation files are byte for byte those of the generator without it.

- *Onset and offset.* Where the drawn expression changes between segments, it builds up from
  the calm face over 0.15-0.6 s (smoothstep) at the start of the new segment and fades over
  as long at the end of the old one, each capped at a quarter of the segment. The frames keep
  their segment's label, as annotators label an expression from its onset; 12% of the
  demo set's labelled frames are in a ramp, half of them below half intensity.
- *Blinks*: about 18 a minute, 0.1-0.3 s each; the lids close and reopen over the frames.
- *Talking*: while a person's voice is on, their mouth opens with the syllable envelope of
  that voice (`synth_render.syllable_envelope`), so lips and sound move together; silent
  segments keep the mouth shut.
- *Degraded frames*, at documented rates (measured over 45k planned frames and on generated
  crops by tests/test_synth.py):

  | Degradation | Rate | Form |
  |---|---|---|
  | motion blur | `BLUR_RATE` = 4% of frames, each frame independently | a 6-14 px line kernel at a random angle, whole frame |
  | heavy JPEG | `JPEG_RATE` = 3% of frames, each frame independently | the whole frame through JPEG quality 4-12 |
  | occlusion | `OCCLUSION_RATE` = 4% of each person's frames | runs of 0.3-1 s: a hand or an object over the mouth or one side of the face |

  About 10.6% of a person's frames are degraded in at least one way. Blur and compression
  hit the whole frame (both persons); occlusions one person. Crops are cut from the
  degraded frame, as a face tracker would.

**Two-person videos** show two faces side by side (``_left``, ``_right``), each with its own
labels and crops. The audio is the *sum* of both voices, so it is ambiguous there, as in the
real data. One two-person video in train has both sides annotated; one more (the last train
video, or the first validation video of a 3-video set) has only ``_right``.

**Media variety**: H.264+AAC .mp4 and MPEG-4+PCM .avi; 30, 30000/1001, 25 and 10 fps;
16000, 44100 and 48000 Hz, mono and stereo (`MEDIA_FORMATS`). One annotation file is 3
lines longer than its video, one is 2 lines shorter (the real data does this).

**Measured**: `python -m bench.probe` fits a linear probe (logistic regression on 24x24 grey
faces and mean mel bands) on the demo set and prints it with chance and the majority class
(numbers in docs/demo_experiments.md). The detector of `mfer_jax.media.faces` finds the face
in the frames that have a crop and are not degraded, and in none of those where the face is
out of view (tests/test_synth.py).

Generation is deterministic for a seed (annotations and crops byte for byte; media too for
the same PyAV version), parallel over videos, and resumable: each video's outputs are
written under temporary names, then a marker; finished videos are skipped on re-run.
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import multiprocessing
import os
import pathlib
import shutil
import time

import cv2
import numpy as np
import scipy.signal
from absl import flags

from data_prep import media_write
from data_prep import synth_render
from mfer_jax import cli, constants, errors, files
from mfer_jax.media import align, faces

CLASS_NAMES = constants.CLASS_NAMES
HEADER = constants.ANNOTATION_HEADER
FACE_CODE = (0, 3, 3, 2, 1, 2, 1, 0)
AUDIO_CODE = (0, 3, 2, 3, 0, 1, 2, 1)
CLASS_FREQ = np.asarray(constants.AFFWILD2_CLASS_PROBS)
ANNOTATION_DIR = pathlib.Path("annotations", "EXPR_Recognition_Challenge")
SPLIT_DIRS = {"train": "Train_Set", "validation": "Validation_Set"}
TEST_LIST = pathlib.Path("test_set", "EXPR_Recognition_Challenge_test_set_release.txt")
MARKER_DIR = ".synth"
DATASET_MARKER = "dataset.json"  # in MARKER_DIR: the settings the whole set was made with
CROP_SIZE = constants.FACE_SIZE
FRAME_HEIGHT = 192
FRAME_WIDTH = {1: 256, 2: 384}  # by number of persons: two faces need a wider frame

# (extension, fps, sample rate, channels); video i uses MEDIA_FORMATS[i % 8].
MEDIA_FORMATS = (
    (".mp4", fractions.Fraction(30), 48000, 2),
    (".avi", fractions.Fraction(25), 16000, 1),
    (".mp4", fractions.Fraction(30000, 1001), 44100, 1),
    (".avi", fractions.Fraction(30000, 1001), 48000, 2),
    (".mp4", fractions.Fraction(25), 16000, 2),
    (".mp4", fractions.Fraction(10), 44100, 2),
    (".avi", fractions.Fraction(30), 44100, 1),
    (".mp4", fractions.Fraction(30000, 1001), 16000, 1),
)
_SEGMENT_SECONDS = (1.0, 6.0)
_INVALID_SEGMENT_PROB = 0.12   # a segment of -1 labels
_FACE_NOISE_PROB = 0.15        # the face shows a random code
_SILENT_PROB = 0.10            # the person says nothing
_VOICE_NOISE_PROB = 0.10       # the voice has a random code
_MIN_SEGMENTS_PER_CLASS = 3    # per class, in train and in validation (when there is room)
_SNR_DB = (10.0, 30.0)         # voice to background noise, per video
_NOISE_POLE = (0.0, 0.5)       # one-pole low-pass of the noise, per video: white to pinkish
# Temporal dynamics and degradations (module docstring, "Video dynamics"). They come from their
# own random stream, so the labels of a seed are those of the generator without them.
_RAMP_SECONDS = (0.15, 0.6)    # expression onset / offset, capped at a quarter of the segment
_BLINKS_PER_SECOND = 0.3       # about 18 a minute, as in conversation
_BLINK_SECONDS = (0.1, 0.3)
BLUR_RATE = 0.04               # fraction of frames with motion blur (independent per frame)
JPEG_RATE = 0.03               # fraction of frames through a low-quality JPEG encoder (ditto)
OCCLUSION_RATE = 0.04          # fraction of each person's frames with a hand or object in front
_OCCLUSION_SECONDS = (0.3, 1.0)
_BLUR_PIXELS = (6.0, 14.0)     # motion-blur length at the 192-pixel frame height
_JPEG_QUALITY = (4, 12)
SYNTH_VERSION = 3              # in each video's marker: a set made by older code is redone


@dataclasses.dataclass
class Segment:
  """Frames [start, end) of one person with one label and the codes that are drawn/voiced."""

  start: int
  end: int
  label: int
  face_code: int
  audio_code: int   # -1: silent
  onset: int = 0    # frames over which the expression builds up from the calm face
  offset: int = 0   # frames over which it fades back at the end


@dataclasses.dataclass
class PersonPlan:
  """One person in a video: their label segments and when their face is out of view."""

  name: str                 # annotation / crops-folder name
  annotated: bool           # has an annotation file and crops (False: drawn only)
  segments: list[Segment]
  absent: list[tuple[int, int]]   # frame ranges [start, end) with the face out of the frame
  blinks: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (first, frames)
  # [start, end) frame ranges with something in front of the face.
  occlusions: list[tuple[int, int, synth_render.Occluder]] = dataclasses.field(
      default_factory=list)


@dataclasses.dataclass
class VideoPlan:
  """Everything about one media file that follows from the seed; workers render from it."""

  index: int
  stem: str
  split: str
  batch: str
  ext: str
  fps: fractions.Fraction
  sample_rate: int
  channels: int
  num_frames: int
  persons: list[PersonPlan]
  annotation_delta: int = 0       # annotation lines minus video frames
  blur: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)  # frame ->
  #                                                               (length px, angle degrees)
  jpeg: dict[int, int] = dataclasses.field(default_factory=dict)  # frame -> JPEG quality

  @property
  def media(self) -> pathlib.Path:
    return pathlib.Path(self.batch, self.stem + self.ext)

  def degraded(self, person: PersonPlan) -> np.ndarray:
    """bool [num_frames]: frames where ``person``'s face is blurred, compressed or occluded."""
    out = np.zeros(self.num_frames, bool)
    out[list(self.blur)] = True
    out[list(self.jpeg)] = True
    for a, b, _ in person.occlusions:
      out[a:b] = True
    return out


def split_sizes(num_videos: int) -> dict[str, int]:
  """Roughly 10 / 4 / 2 of 16 videos for train / validation / test, at least 1 each."""
  if num_videos < 3:
    raise ValueError(f"num_videos must be >= 3 (one per split), got {num_videos}")
  test = max(1, round(num_videos / 8))
  validation = max(1, round(num_videos / 4))
  return {"train": num_videos - test - validation, "validation": validation, "test": test}


def _segment(rng, start, end, label) -> Segment:
  """Codes for a segment: the label's codes, or noise (see the module docstring).

  Invalid (-1) segments show a random face and are silent half the time.
  """
  if label >= 0 and rng.random() >= _FACE_NOISE_PROB:
    face_code = FACE_CODE[label]
  else:
    face_code = int(rng.integers(4))
  u = rng.random()
  if u < _SILENT_PROB or (label < 0 and u < 0.5):
    audio_code = -1
  elif label < 0 or u < _SILENT_PROB + _VOICE_NOISE_PROB:
    audio_code = int(rng.integers(4))
  else:
    audio_code = AUDIO_CODE[label]
  return Segment(start, end, label, face_code, audio_code)


def _plan_person(rng, name, annotated, num_frames, fps) -> PersonPlan:
  segments, start = [], 0
  while start < num_frames:
    length = max(1, int(round(rng.uniform(*_SEGMENT_SECONDS) * fps)))
    end = min(num_frames, start + length)
    label = -1 if rng.random() < _INVALID_SEGMENT_PROB else int(rng.choice(8, p=CLASS_FREQ))
    segments.append(_segment(rng, start, end, label))
    start = end
  absent = []
  for _ in range(int(rng.integers(1, 3))):  # the face leaves the frame once or twice
    length = int(rng.uniform(0.3, 1.5) * fps) + 1
    first = int(rng.integers(0, max(1, num_frames - length)))
    absent.append((first, first + length))
  return PersonPlan(name, annotated, segments, absent)


def plan_dataset(num_videos: int, seed: int, seconds: tuple[float, float]) -> list[VideoPlan]:
  """Plans every video (names, split, media format, labels) from the seed alone.

  Each video's plan comes from its own random stream, ``SeedSequence([seed, index, 0])``.
  """
  sizes = split_sizes(num_videos)
  splits = ["train"] * sizes["train"] + ["validation"] * sizes["validation"] + ["test"] * sizes[
      "test"]
  # The right-only two-person video goes to train when there is room: summed voices make its
  # audio ambiguous, which would dominate a validation set of a few videos.
  right_only = sizes["train"] - 1 if sizes["train"] >= 2 else sizes["train"]
  longer = 1 if right_only != 1 else 2  # the video whose annotation runs 3 lines long
  plans = []
  for index, split in enumerate(splits):
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0]))
    ext, fps, sample_rate, channels = MEDIA_FORMATS[index % len(MEDIA_FORMATS)]
    num_persons = 2 if index in (0, right_only) else 1
    stem = f"{index:03d}-{FRAME_WIDTH[num_persons]}x{FRAME_HEIGHT}"
    num_frames = max(2, int(round(rng.uniform(*seconds) * fps)))
    if num_persons == 1:
      persons = [_plan_person(rng, stem, True, num_frames, fps)]
    else:
      persons = [_plan_person(rng, f"{stem}_left", index != right_only, num_frames, fps),
                 _plan_person(rng, f"{stem}_right", True, num_frames, fps)]
    delta = {longer: 3, right_only: -2}.get(index, 0)
    plans.append(VideoPlan(index, stem, split, f"batch{index % 2 + 1}", ext, fps, sample_rate,
                           channels, num_frames, persons, delta))
  _cover_all_classes(plans, np.random.default_rng(np.random.SeedSequence([seed, 1 << 20])))
  for plan in plans:
    _plan_dynamics(plan, np.random.default_rng(np.random.SeedSequence([seed, plan.index, 2])))
  return plans


def _plan_dynamics(plan: VideoPlan, rng: np.random.Generator) -> None:
  """Adds what changes frame to frame: expression ramps, blinks, occlusions, bad frames."""
  fps = float(plan.fps)
  n = plan.num_frames
  for person in plan.persons:
    segs = person.segments
    for k, s in enumerate(segs):
      cap = (s.end - s.start) // 4
      # Ramps only where the drawn expression changes; the video's first and last segments
      # run on past its ends, so they have none there.
      if k > 0 and segs[k - 1].face_code != s.face_code:
        s.onset = min(cap, int(round(rng.uniform(*_RAMP_SECONDS) * fps)))
      if k + 1 < len(segs) and segs[k + 1].face_code != s.face_code:
        s.offset = min(cap, int(round(rng.uniform(*_RAMP_SECONDS) * fps)))
    starts = np.flatnonzero(rng.random(n) < _BLINKS_PER_SECOND / fps)
    person.blinks = [(int(i), max(1, int(round(rng.uniform(*_BLINK_SECONDS) * fps))))
                     for i in starts]
    person.occlusions = [(a, b, synth_render.random_occluder(rng))
                         for a, b in _events(rng, n, OCCLUSION_RATE,
                                             [max(1, int(round(x * fps))) for x in
                                              _OCCLUSION_SECONDS])]
  plan.blur = {int(i): (float(rng.uniform(*_BLUR_PIXELS)), float(rng.uniform(0, 180)))
               for i in np.flatnonzero(rng.random(n) < BLUR_RATE)}
  plan.jpeg = {int(i): int(rng.integers(_JPEG_QUALITY[0], _JPEG_QUALITY[1] + 1))
               for i in np.flatnonzero(rng.random(n) < JPEG_RATE)}


def _events(rng: np.random.Generator, num_frames: int, rate: float,
            frames: tuple[int, int]) -> list[tuple[int, int]]:
  """Non-overlapping [start, end) runs of ``frames[0]..frames[1]`` frames covering ``rate``.

  A run starts at each free frame with probability q; with mean run length m, the expected
  covered fraction is q m / (1 - q + q m), so q = rate / (m (1 - rate) + rate).
  """
  m = 0.5 * (frames[0] + frames[1])
  q = rate / (m * (1 - rate) + rate)
  runs, i = [], 0
  while i < num_frames:
    if rng.random() < q:
      end = min(num_frames, i + int(rng.integers(frames[0], frames[1] + 1)))
      runs.append((i, end))
      i = end
    else:
      i += 1
  return runs


def face_dynamics(person: PersonPlan, num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per frame: the drawn face code, the expression intensity (0 calm .. 1 apex, smoothstep
  ramps at onset and offset) and the eye opening (1 open, 0 closed mid-blink)."""
  codes = np.empty(num_frames, np.int64)
  intensity = np.ones(num_frames)
  for s in person.segments:
    codes[s.start:s.end] = s.face_code
    if s.onset:
      x = np.arange(1, s.onset + 1) / (s.onset + 1)
      intensity[s.start:s.start + s.onset] = x * x * (3 - 2 * x)
    if s.offset:
      x = np.arange(s.offset, 0, -1) / (s.offset + 1)
      intensity[s.end - s.offset:s.end] = np.minimum(intensity[s.end - s.offset:s.end],
                                                     x * x * (3 - 2 * x))
  eye_open = np.ones(num_frames)
  for first, length in person.blinks:
    # Lids close and reopen linearly: a 1-frame blink is closed, longer ones pass half-open.
    profile = np.abs(2 * (np.arange(length) + 0.5) / length - 1)
    end = min(num_frames, first + length)
    eye_open[first:end] = np.minimum(eye_open[first:end], profile[:end - first])
  return codes, intensity, eye_open


def _cover_all_classes(plans: list[VideoPlan], rng: np.random.Generator) -> None:
  """Relabels segments so every class has a few segments in train and in validation.

  A rare class (2%) would otherwise often be missing, or be one short segment, in a small set.
  Donors are segments of the classes with the most frames, so the shape of the class
  frequencies is kept.
  """
  for split in ("train", "validation"):
    segments = [s for p in plans if p.split == split for person in p.persons if person.annotated
                for s in person.segments if s.label >= 0]
    if not segments:
      continue
    wanted = min(_MIN_SEGMENTS_PER_CLASS, max(1, len(segments) // 8))
    for _ in range(8 * wanted):
      per_class = np.bincount([s.label for s in segments], minlength=8)
      missing = int(np.argmin(per_class))
      if per_class[missing] >= wanted:
        break
      frames = np.bincount([s.label for s in segments], [s.end - s.start for s in segments],
                           minlength=8)
      donors = [s for s in segments if per_class[s.label] > wanted and s.label == frames.argmax()]
      if not donors:
        break
      seg = donors[int(rng.integers(len(donors)))]
      new = _segment(rng, seg.start, seg.end, missing)
      seg.label, seg.face_code, seg.audio_code = new.label, new.face_code, new.audio_code


def _labels(person: PersonPlan, num_frames: int) -> np.ndarray:
  labels = np.empty(num_frames, np.int64)
  for s in person.segments:
    labels[s.start:s.end] = s.label
  return labels


def code_oracle(plans: list[VideoPlan], split: str) -> tuple[np.ndarray, np.ndarray]:
  """Labels and the answers of a reader of each segment's drawn codes, over a split's frames.

  The ceiling a model can approach on this set: the class whose (face code, voice code) pair
  the segment shows, and where the pair is no class (a noise code) or the person is silent,
  the commonest class (by ``CLASS_FREQ``) that agrees with either code. It sees every
  labelled frame as its segment's codes at full intensity, so it ignores what a model cannot:
  onset ramps, absent faces, degraded frames and summed voices of two-person videos.

  Returns:
    (labels, answers), int64 [labelled frames of the split's annotated persons].
  """
  def answer(face_code: int, audio_code: int) -> int:
    pair = [c for c in range(8) if (FACE_CODE[c], AUDIO_CODE[c]) == (face_code, audio_code)]
    if pair:
      return pair[0]
    agree = [c for c in range(8) if FACE_CODE[c] == face_code or AUDIO_CODE[c] == audio_code]
    return max(agree, key=lambda c: CLASS_FREQ[c])

  labels, answers = [], []
  for plan in plans:
    if plan.split != split:
      continue
    for person in plan.persons:
      for seg in person.segments if person.annotated else ():
        if seg.label >= 0:
          labels.append(np.full(seg.end - seg.start, seg.label))
          answers.append(np.full(seg.end - seg.start, answer(seg.face_code, seg.audio_code)))
  if not labels:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  return np.concatenate(labels).astype(np.int64), np.concatenate(answers).astype(np.int64)


def _annotation_text(labels: np.ndarray, delta: int) -> str:
  if delta > 0:  # the annotation runs past the video: repeat the last label
    labels = np.concatenate([labels, np.full(delta, labels[-1])])
  elif delta < 0:
    labels = labels[:delta]
  return HEADER + "\n" + "".join(f"{int(v)}\n" for v in labels)


# ---------------------------------------------------------------------------------------------
# Rendering one video (runs in a worker process).


def _audio_track(plan: VideoPlan, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
  """Voices of all persons (summed), in coloured background noise.

  Returns:
    (audio float32 [n, channels], per person the mouth opening [num_frames] in 0..1: the
    syllable envelope of their own voice at each frame's time, 0 while they are silent).
  """
  sr = plan.sample_rate
  num_samples = int(round(plan.num_frames / plan.fps * sr))
  voice_sum = np.zeros(num_samples)
  frame_times = np.arange(plan.num_frames) / float(plan.fps)
  mouths = []
  for person in plan.persons:
    voice = synth_render.random_voice(rng)
    mouth = np.zeros(plan.num_frames)
    jaw = rng.uniform(0.6, 1.0)   # how wide this person opens their mouth
    for s in person.segments:
      if s.audio_code < 0:
        continue
      a, b = (int(round(f / plan.fps * sr)) for f in (s.start, s.end))
      b = min(b, num_samples)
      if b - a < 2:
        continue
      syllable_phase = rng.uniform(0, 2 * np.pi)
      sound = synth_render.voice_segment(rng, voice, s.audio_code, b - a, sr, syllable_phase)
      mouth[s.start:s.end] = jaw * synth_render.syllable_envelope(
          frame_times[s.start:s.end] - a / sr,
          synth_render.syllable_rate(voice, s.audio_code), syllable_phase)
      ramp = min(b - a, int(0.01 * sr))  # 10 ms fades: no clicks at segment boundaries
      sound[:ramp] *= np.linspace(0, 1, ramp)
      sound[b - a - ramp:] *= np.linspace(1, 0, ramp)
      voice_sum[a:b] += sound
    mouths.append(mouth)
  loudness = rng.uniform(0.1, 0.4)
  snr_db = rng.uniform(*_SNR_DB)
  noise = scipy.signal.lfilter([1.0], [1.0, -rng.uniform(*_NOISE_POLE)], rng.normal(size=num_samples))
  noise *= 0.25 * 10 ** (-snr_db / 20) / (noise.std() or 1.0)  # voice RMS is about 0.25
  mono = loudness * (voice_sum + noise)
  if plan.channels == 1:
    return mono.astype(np.float32)[:, None], mouths
  pan = rng.uniform(0.6, 1.0)
  return np.stack([mono, pan * mono], axis=1).astype(np.float32), mouths


def _frames(plan: VideoPlan, rng: np.random.Generator, crops: dict[str, pathlib.Path],
            mouths: list[np.ndarray]):
  """Yields the RGB frames; writes each annotated person's visible face crop on the way.

  The plan's dynamics and degradations use no random draws here, so a plan with its
  degradations removed renders the very same frames everywhere else (the tests rely on it).
  """
  width = FRAME_WIDTH[len(plan.persons)]
  background = synth_render.random_background(rng, FRAME_HEIGHT, width)
  slots = [width / 2] if len(plan.persons) == 1 else [width / 4, 3 * width / 4]
  people = []
  for person, slot_x, mouth in zip(plan.persons, slots, mouths):
    ident = synth_render.random_identity(rng, FRAME_HEIGHT)
    codes, intensity, eye_open = face_dynamics(person, plan.num_frames)
    visible = np.ones(plan.num_frames, bool)
    for a, b in person.absent:
      visible[a:b] = False
    occluder = {i: occ for a, b, occ in person.occlusions for i in range(a, b)}
    # Slow head motion (two sinusoids) plus a little per-frame jitter.
    t = np.arange(plan.num_frames) / float(plan.fps)
    amp, freq, phase = rng.uniform(4, 12, 2), rng.uniform(0.05, 0.3, 2), rng.uniform(0, 6, 2)
    cx = slot_x + rng.uniform(-10, 10) + amp[0] * np.sin(2 * np.pi * freq[0] * t + phase[0])
    cy = FRAME_HEIGHT / 2 + rng.uniform(-6, 6) + amp[1] * np.sin(2 * np.pi * freq[1] * t + phase[1])
    cx, cy = cx + rng.normal(0, 0.7, cx.shape), cy + rng.normal(0, 0.7, cy.shape)
    people.append((person, ident, codes, intensity, eye_open, mouth, occluder, visible, cx, cy))
  gain = rng.uniform(0.75, 1.2) * (1 + 0.03 * rng.standard_normal(plan.num_frames))
  offset = rng.uniform(-20, 20)
  # A few pre-drawn noise images, cycled: per-frame sensor noise at almost no cost.
  noise = [rng.integers(0, 12, (FRAME_HEIGHT, width, 3), dtype=np.uint8) for _ in range(4)]
  for i in range(plan.num_frames):
    frame = background.copy()
    for _, ident, codes, intensity, eye_open, mouth, occluder, visible, cx, cy in people:
      if visible[i]:
        synth_render.draw_face(frame, (cx[i], cy[i]), ident, int(codes[i]),
                               intensity=intensity[i], eye_open=eye_open[i], mouth_open=mouth[i])
        if i in occluder:
          synth_render.draw_occluder(frame, (cx[i], cy[i]), ident, occluder[i])
    if i in plan.blur:  # optics first, then the sensor (gain, noise), then the encoder
      frame = synth_render.motion_blur(frame, *plan.blur[i])
    frame = cv2.convertScaleAbs(frame, alpha=float(gain[i]), beta=offset)
    frame = cv2.subtract(cv2.add(frame, noise[i % 4]), noise[(i + 1) % 4])
    if i in plan.jpeg:
      frame = synth_render.jpeg_artifacts(frame, plan.jpeg[i])
    for person, ident, codes, intensity, *_, visible, cx, cy in people:
      if person.name in crops and visible[i]:
        # Aligned like Aff-Wild2's crops and like data_prep --detect and prediction make them,
        # from the drawn face's true landmarks (the mouth corners move with the expression).
        landmarks = synth_render.face_landmarks((cx[i], cy[i]), ident, int(codes[i]),
                                                intensity[i])
        crop = align.align_face(frame, landmarks, CROP_SIZE)
        (crops[person.name] / f"{i + 1:05d}.jpg").write_bytes(faces.encode_crop(crop))
    yield frame


def _annotation_path(out: pathlib.Path, split: str, name: str) -> pathlib.Path:
  return out / ANNOTATION_DIR / SPLIT_DIRS[split] / f"{name}.txt"


def _marker(out: pathlib.Path, plan: VideoPlan) -> pathlib.Path:
  return out / MARKER_DIR / f"{plan.stem}.json"


def _video_info(plan: VideoPlan) -> dict:
  return {"version": SYNTH_VERSION, "split": plan.split, "crops": faces.CROP_STYLE,
          "media": plan.media.as_posix(), "fps": str(plan.fps),
          "sample_rate": plan.sample_rate, "channels": plan.channels,
          "num_frames": plan.num_frames, "annotation_delta": plan.annotation_delta,
          "names": [p.name for p in plan.persons if p.annotated]}


def render(plan: VideoPlan, seed: int, crops: dict[str, pathlib.Path]):
  """A video's audio track and a generator of its RGB frames, which writes the face crops of
  the names in ``crops`` into those folders as it goes. Depends on the plan and seed only."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, plan.index, 1]))
  audio, mouths = _audio_track(plan, rng)
  return audio, _frames(plan, rng, crops, mouths)


def render_video(out_dir: str, plan: VideoPlan, seed: int) -> str:
  """Writes one video's media, crops and annotations, then its completion marker."""
  cv2.setNumThreads(1)  # parallelism is across videos
  out = pathlib.Path(out_dir)
  # Temporary media of an earlier, killed run (named by its pid) would otherwise stay forever.
  for stale in (out / plan.batch).glob(f".{plan.media.name}.*.tmp"):
    stale.unlink()
  crops = {}
  for person in plan.persons:
    if person.annotated:
      tmp = out / "cropped_aligned" / f".{person.name}.tmp"
      shutil.rmtree(tmp, ignore_errors=True)
      tmp.mkdir(parents=True)
      crops[person.name] = tmp
  audio, frames = render(plan, seed, crops)
  # ultrafast: x264 takes about half the CPU of veryfast, and size does not matter here.
  media_write.write_video(out / plan.media, frames, plan.fps, audio=audio,
                          sample_rate=plan.sample_rate, preset="ultrafast")
  for name, tmp in crops.items():
    final = out / "cropped_aligned" / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
  if plan.split in SPLIT_DIRS:
    for person in plan.persons:
      if person.annotated:
        text = _annotation_text(_labels(person, plan.num_frames), plan.annotation_delta)
        files.atomic_write_bytes(_annotation_path(out, plan.split, person.name), text.encode())
  files.atomic_write_json(_marker(out, plan), _video_info(plan), sort_keys=False)
  return plan.stem


class SynthDirError(errors.UserError, ValueError):
  """The output folder holds a synthetic set made with other settings."""


def _check_dataset_settings(out: pathlib.Path, settings: dict) -> None:
  """Records the set's settings in ``out``, or stops if ``out`` holds a set made with others.

  Per-video markers cannot catch this alone: a set of 32 videos completed as one of 64 would
  keep videos planned for other splits and lengths, and the build would silently mix them.
  A folder from before this record (markers only) adopts the settings of its first run here.
  """
  path = out / MARKER_DIR / DATASET_MARKER
  try:
    recorded = json.loads(path.read_text())
  except FileNotFoundError:
    files.atomic_write_json(path, settings, sort_keys=False)
    return
  except (OSError, ValueError) as e:
    raise SynthDirError(f"{path}: unreadable ({e}); delete {out} to regenerate the set") from e
  if recorded != settings:
    diff = ", ".join(f"{k} {recorded.get(k)} (asked: {v})" for k, v in settings.items()
                     if recorded.get(k) != v)
    raise SynthDirError(f"{out} holds a synthetic set made with other settings: {diff}; "
                        f"name another folder (config.synthetic.raw_dir or --out) or delete "
                        f"{out} to regenerate it")


def _is_done(out: pathlib.Path, plan: VideoPlan) -> bool:
  """True if the video's marker matches its plan and its outputs are still there."""
  try:
    if json.loads(_marker(out, plan).read_text()) != _video_info(plan):
      return False
  except (OSError, ValueError):
    return False
  names = [p.name for p in plan.persons if p.annotated]
  outputs = [out / plan.media] + [out / "cropped_aligned" / n for n in names]
  if plan.split in SPLIT_DIRS:
    outputs += [_annotation_path(out, plan.split, n) for n in names]
  return all(p.exists() for p in outputs)


def generate(out_dir: str | os.PathLike, num_videos: int = 16, seed: int = 0, workers: int = 2,
             seconds: tuple[float, float] = (20.0, 40.0)) -> dict:
  """Generates (or completes) the synthetic dataset in ``out_dir``.

  Args:
    out_dir: dataset root; created if missing. Videos already finished are skipped.
    num_videos: number of media files (>= 3); split roughly 10/4/2 of 16.
    seed: everything follows from it.
    workers: processes rendering videos in parallel (1 renders in this process).
    seconds: (min, max) video length in seconds.

  Returns:
    A summary: ``{"out_dir", "seed", "videos": {stem: info}, "splits": {split: {"names",
    "class_counts"}}, "generated": [stems], "skipped": [stems], "seconds": float}``.

  Raises:
    ValueError: on num_videos < 3, workers < 1 or a bad length range.
    SynthDirError: if ``out_dir`` holds a set made with another num_videos, seed or seconds.
  """
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  if not 0 < seconds[0] <= seconds[1]:
    raise ValueError(f"seconds must be 0 < min <= max, got {seconds}")
  start = time.monotonic()
  out = pathlib.Path(out_dir)
  plans = plan_dataset(num_videos, seed, seconds)
  _check_dataset_settings(out, {"version": SYNTH_VERSION, "num_videos": num_videos,
                                "seed": seed, "seconds": [float(x) for x in seconds]})
  todo = [p for p in plans if not _is_done(out, p)]
  jobs = [(str(out), p, seed) for p in todo]
  if workers == 1 or len(jobs) <= 1:
    for job in jobs:
      render_video(*job)
  else:
    # spawn, not fork: the caller may hold threads (JAX, pytest plugins).
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
      pool.starmap(render_video, jobs)
  test_names = [p.name for v in plans if v.split == "test" for p in v.persons if p.annotated]
  files.atomic_write_bytes(out / TEST_LIST, "".join(f"{n}\n" for n in test_names).encode())
  splits = {}
  for split in ("train", "validation", "test"):
    persons = [(v, p) for v in plans if v.split == split for p in v.persons if p.annotated]
    labels = [_labels(p, v.num_frames) for v, p in persons]
    counts = np.bincount(np.concatenate(labels).clip(0), weights=np.concatenate(labels) >= 0,
                         minlength=8).astype(int)
    splits[split] = {"names": [p.name for _, p in persons], "class_counts": counts.tolist()}
  return {"out_dir": str(out), "seed": seed, "videos": {p.stem: _video_info(p) for p in plans},
          "splits": splits, "generated": [p.stem for p in todo],
          "skipped": [p.stem for p in plans if p not in todo],
          "seconds": round(time.monotonic() - start, 2)}


def _define_flags() -> None:
  # Defined only when run as a command: main.py imports this module for the demo data.
  flags.DEFINE_string("out", None, "Output directory (dataset root).", required=True)
  flags.DEFINE_integer("num_videos", 16, "Media files, >= 3.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_integer("workers", 2, "Parallel processes.")
  flags.DEFINE_float("min_seconds", 20.0, "Shortest video (seconds).")
  flags.DEFINE_float("max_seconds", 40.0, "Longest video (seconds).")


def main() -> None:
  """``python -m data_prep.synth``: writes the synthetic set (see the module docstring)."""
  f = flags.FLAGS
  try:
    summary = generate(f.out, f.num_videos, f.seed, f.workers, (f.min_seconds, f.max_seconds))
  except SynthDirError:
    raise  # a data error (exit 1), not a usage one
  except ValueError as e:
    raise errors.UsageError(str(e)) from e
  print(f"{f.out}: {len(summary['generated'])} videos written, {len(summary['skipped'])} "
        f"already complete, in {summary['seconds']:.1f} s")
  for split, info in summary["splits"].items():
    print(f"  {split:10s} {len(info['names']):3d} annotation names, valid frames per class "
          f"{info['class_counts']}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

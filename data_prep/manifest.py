"""A manifest: any labelled video dataset as a CSV, for ``data_prep.build --manifest``.

One row per video (or per person of a video)::

    video,label,person,split,name
    crema/1001_DFA_ANG_XX.flv,Anger,,train,
    crema/1001_DFA_HAP_XX.flv,4,,validation,
    interviews/pair.mp4,labels/pair_left.txt,left,train,
    interviews/pair.mp4,labels/pair_right.txt,right,train,
    new/clip.mp4,,,test,

Columns (the header line is required; names are matched without case and spaces):

- ``video`` (required): the media file; a relative path is relative to the manifest's folder.
- ``label`` (required column): a **clip label**, which applies to every frame of the clip: a
  class name (``Neutral``, ``Anger``, ``Disgust``, ``Fear``, ``Happiness``, ``Sadness``,
  ``Surprise``, ``Other``; any case) or its index 0..7; or a **per-frame label file** in the
  Aff-Wild2 format (the class header, then one label in -1..7 per frame), recognised by a
  ``.txt``/``.csv`` ending or a path separator. Empty only in test rows.
- ``person`` (optional): whose face, when several are in view: ``largest`` (default, the
  person present in the most frames), ``left`` or ``right`` (`mfer_jax.media.track`).
- ``split`` (optional): ``train`` (default), ``validation`` or ``test``. Test rows get one
  record per decoded frame with label -1, like Aff-Wild2's test set; a label there is ignored.
- ``name`` (optional): the video's name in the records (default: the file's stem, plus
  ``_left``/``_right`` for those persons). Names must be unique.

Faces are always detected, tracked and aligned (`mfer_jax.media.faces`, the same path as
prediction); the records are the same format as Aff-Wild2's, so training, sampling,
evaluation and prediction work unchanged.

A bad row (missing file, unknown label name, a label outside the class list, bad split or
person, a name used twice) is reported with its line number and left out; the other rows are
built. A missing ``video`` or ``label`` column, an unknown column, or an empty manifest stops
the build before anything is written.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib

from mfer_jax import constants, errors

COLUMNS = ("video", "label", "person", "split", "name")
REQUIRED = ("video", "label")
PERSONS = ("largest", "left", "right")   # of mfer_jax.media.track.PERSON_CHOICES
_LABEL_FILE_ENDINGS = (".txt", ".csv")


class ManifestError(errors.UserError, ValueError):
  """The manifest as a whole cannot be read (no header, a missing or unknown column)."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One usable manifest row.

  Attributes:
    line: its line number in the manifest (the header is line 1).
    video: absolute media path.
    video_rel: the media path as written relative to the manifest's folder (metadata).
    split, name, person: as in the module docstring.
    label_file: absolute path of a per-frame label file, or None.
    clip_label: the class index of a clip label, or None.
  """

  line: int
  video: str
  video_rel: str
  split: str
  name: str
  person: str
  label_file: str | None = None
  clip_label: int | None = None


@dataclasses.dataclass
class Manifest:
  """A read manifest: usable entries, bad rows (line, reason) and warnings."""

  path: str
  entries: list[Entry]
  bad: list[tuple[int, str]]
  warnings: list[str]


def _class_index(text: str) -> int | None:
  """The class of a clip label (name or index), or None; raises ValueError when out of range."""
  try:
    value = int(text)
  except ValueError:
    lowered = [c.lower() for c in constants.CLASS_NAMES]
    return lowered.index(text.lower()) if text.lower() in lowered else None
  if not 0 <= value < constants.NUM_CLASSES:
    raise ValueError(f"label {value} is outside the classes 0..{constants.NUM_CLASSES - 1} "
                     f"({', '.join(constants.CLASS_NAMES)})")
  return value


def _is_label_file(text: str) -> bool:
  return text.lower().endswith(_LABEL_FILE_ENDINGS) or "/" in text or os.sep in text


def read_manifest(path: str | os.PathLike, splits=constants.SPLITS) -> Manifest:
  """Reads and checks a manifest (rules in the module docstring).

  Args:
    path: the CSV file.
    splits: splits to keep; rows of other splits are dropped without a word.

  Returns:
    The usable entries, in row order, and the bad rows with their reasons.

  Raises:
    ManifestError: no such file, no header, a missing required column, an unknown column.
  """
  path = pathlib.Path(path)
  try:
    text = path.read_text(encoding="utf-8-sig")
  except OSError as e:
    raise ManifestError(f"--manifest={path}: cannot read it ({e})") from e
  rows = list(csv.reader(text.splitlines()))
  while rows and not any(c.strip() for c in rows[-1]):
    rows.pop()
  if not rows:
    raise ManifestError(f"{path}: empty manifest; expected a header line "
                        f"{','.join(COLUMNS)} and one row per video")
  header = ["".join(c.split()).lower() for c in rows[0]]
  unknown = [c for c in header if c not in COLUMNS]
  missing = [c for c in REQUIRED if c not in header]
  if unknown or missing:
    problem = (f"unknown column(s) {', '.join(map(repr, unknown))}" if unknown else
               f"missing column(s) {', '.join(map(repr, missing))}")
    raise ManifestError(f"{path}:1: {problem}; the columns are {', '.join(COLUMNS)} "
                        f"(video and label required)")
  folder = path.resolve().parent
  entries, bad, warnings = [], [], []
  used: dict[str, int] = {}
  for line, row in enumerate(rows[1:], start=2):
    if not any(c.strip() for c in row):
      continue
    cells = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header)}
    try:
      entry = _entry(cells, line, folder, splits)
    except ValueError as e:
      bad.append((line, str(e)))
      continue
    if entry is None:
      continue
    if entry.name in used:
      bad.append((line, f"name {entry.name!r} is already used by line {used[entry.name]}; "
                        "give the rows distinct values in a 'name' column"))
      continue
    used[entry.name] = line
    if entry.split == "test" and cells.get("label"):
      warnings.append(f"{path}:{line}: a test row has no labels; its label is ignored")
    entries.append(entry)
  return Manifest(str(path), entries, bad, warnings)


def _entry(cells: dict[str, str], line: int, folder: pathlib.Path, splits) -> Entry | None:
  """The entry of one row, None for a split not wanted; ValueError says what is wrong."""
  split = cells.get("split", "").lower() or "train"
  if split not in constants.SPLITS:
    raise ValueError(f"split {cells['split']!r} is not one of {', '.join(constants.SPLITS)}")
  if split not in splits:
    return None
  person = cells.get("person", "").lower() or "largest"
  if person not in PERSONS:
    raise ValueError(f"person {cells['person']!r} is not one of {', '.join(PERSONS)}")
  video_text = cells.get("video", "")
  if not video_text:
    raise ValueError("no video path")
  video = (folder / video_text).resolve()
  if not video.is_file():
    raise ValueError(f"video file {video_text!r} not found (looked for {video})")
  label_text = cells.get("label", "")
  label_file, clip_label = None, None
  if split != "test":
    if not label_text:
      raise ValueError(f"no label: a {split} row needs a class name, an index 0..7 or a "
                       "label file")
    if _is_label_file(label_text):
      label_path = (folder / label_text).resolve()
      if not label_path.is_file():
        raise ValueError(f"label file {label_text!r} not found (looked for {label_path})")
      label_file = str(label_path)
    else:
      clip_label = _class_index(label_text)
      if clip_label is None:
        raise ValueError(f"unknown label name {label_text!r}; use one of "
                         f"{', '.join(constants.CLASS_NAMES)} or an index 0..7")
  suffix = f"_{person}" if person in ("left", "right") else ""
  name = cells.get("name", "") or video.stem + suffix
  return Entry(line=line, video=str(video), video_rel=video_text, split=split, name=name,
               person=person, label_file=label_file, clip_label=clip_label)

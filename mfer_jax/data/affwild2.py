"""The raw Aff-Wild2 Expression layout: finding and validating annotations, media and crops.

Layout read (the synthetic generator writes the same)::

    ROOT/batch1/<stem>.mp4|.avi, ROOT/batch2/...            media, in any batch*/ folder
    ROOT/cropped_aligned/<name>/<NNNNN>.jpg                 112x112 face crops, 1-based
    ROOT/annotations/EXPR_Recognition_Challenge/Train_Set/<name>.txt
    ROOT/annotations/EXPR_Recognition_Challenge/Validation_Set/<name>.txt
    ROOT/test_set/EXPR_Recognition_Challenge_test_set_release.txt   test names, one a line

Older releases name the challenge folder ``EXPR_Classification_Challenge``. ``<name>`` is a
media stem, or ``<stem>_left`` / ``<stem>_right`` for two-person videos, which share the media
file ``<stem>.<ext>`` but have their own labels and crop folders.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

import numpy as np

from mfer_jax import constants, errors
from mfer_jax.media import decode

CHALLENGE_DIRS = ("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge")
SPLIT_DIRS = {"train": "Train_Set", "validation": "Validation_Set"}
HEADER = constants.CLASS_NAMES   # the annotation files' first line, split at commas
CROPS_DIR = "cropped_aligned"
_SIDE_SUFFIX = re.compile(r"_(left|right)$")

LAYOUT_HELP = """\
Expected the Aff-Wild2 Expression layout under ROOT:
  ROOT/batch1/<video>.mp4|.avi (any batch*/ folder)
  ROOT/cropped_aligned/<name>/<NNNNN>.jpg
  ROOT/annotations/EXPR_Recognition_Challenge/{Train_Set,Validation_Set}/<name>.txt
    (or EXPR_Classification_Challenge in older releases)
  ROOT/test_set/*test*set*.txt (test video names, one a line; or pass --test_list=FILE)
A synthetic set in this layout: python -m data_prep.synth --out DIR"""


class LayoutError(errors.UserError, RuntimeError):
  """The root does not look like Aff-Wild2 (fatal); the message explains the layout."""


class AnnotationError(errors.UserError, ValueError):
  """An annotation file that cannot be used; the message names the file and line."""


def find_annotation_dir(root: str | os.PathLike, split: str) -> pathlib.Path | None:
  """The folder of ``split``'s annotation files (either challenge name), or None."""
  root = pathlib.Path(root)
  for parent in (root / "annotations", root):
    for challenge in CHALLENGE_DIRS:
      d = parent / challenge / SPLIT_DIRS[split]
      if d.is_dir():
        return d
  return None


def list_annotations(root: str | os.PathLike, split: str) -> list[pathlib.Path]:
  """Annotation files of a labelled split, sorted by name.

  Raises:
    LayoutError: if the split's folder is missing or holds no .txt file.
  """
  d = find_annotation_dir(root, split)
  if d is None:
    raise LayoutError(f"{root}: no annotation folder for split {split!r} "
                      f"(annotations/<challenge>/{SPLIT_DIRS[split]}/).\n{LAYOUT_HELP}")
  files = sorted(p for p in d.iterdir() if p.suffix == ".txt" and p.is_file())
  if not files:
    raise LayoutError(f"{d}: annotation folder is empty (no <name>.txt files).\n{LAYOUT_HELP}")
  return files


def parse_annotation(path: str | os.PathLike) -> np.ndarray:
  """Reads one annotation file: the class header, then one label in -1..7 per frame.

  Blank lines at the end are ignored; anything else that is not an integer in -1..7 is an
  error. The header is compared without spaces and case.

  Returns:
    int32 [num_lines - 1] labels; element i belongs to frame i + 1.

  Raises:
    AnnotationError: naming ``path:line`` for a wrong header, a non-integer or an
      out-of-range label, or an empty file.
  """
  try:
    lines = pathlib.Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
  except OSError as e:
    raise AnnotationError(f"{path}: cannot read ({e})") from e
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    raise AnnotationError(f"{path}:1: empty file, expected the header "
                          f"{','.join(HEADER)!r}")
  header = [h.strip().lower() for h in lines[0].replace("\ufeff", "").split(",")]
  if header != [h.lower() for h in HEADER]:
    raise AnnotationError(f"{path}:1: wrong header {lines[0][:80]!r}, expected "
                          f"{','.join(HEADER)!r}")
  labels = np.empty(len(lines) - 1, np.int32)
  for n, line in enumerate(lines[1:], start=2):
    text = line.strip()
    try:
      value = int(text)
    except ValueError:
      raise AnnotationError(f"{path}:{n}: label {text[:40]!r} is not an integer") from None
    if not -1 <= value <= len(HEADER) - 1:
      raise AnnotationError(f"{path}:{n}: label {value} is out of range -1..{len(HEADER) - 1}")
    labels[n - 2] = value
  return labels


def media_stem(name: str) -> str:
  """The media stem of an annotation name: ``x_left`` and ``x_right`` -> ``x``."""
  return _SIDE_SUFFIX.sub("", name)


@dataclasses.dataclass
class MediaIndex:
  """Media files under ROOT's batch*/ folders, by stem.

  Attributes:
    files: stem -> path (first in sorted folder order, preferred extension first).
    duplicates: stem -> other paths with the same stem (reported as warnings).
  """

  files: dict[str, pathlib.Path]
  duplicates: dict[str, list[pathlib.Path]]

  def find(self, name: str) -> pathlib.Path | None:
    """The media of an annotation name: its own stem first, then without _left/_right."""
    return self.files.get(name) or self.files.get(media_stem(name))


def index_media(root: str | os.PathLike) -> MediaIndex:
  """Lists media under every ``batch*`` folder of ``root`` (recursively)."""
  root = pathlib.Path(root)
  rank = {ext: i for i, ext in enumerate(decode.MEDIA_EXTENSIONS)}
  found: dict[str, list[pathlib.Path]] = {}
  for batch in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower()
                      .startswith("batch")):
    for p in sorted(batch.rglob("*")):
      if p.suffix.lower() in rank and p.is_file() and not p.name.startswith("."):
        found.setdefault(p.stem, []).append(p)
  files, duplicates = {}, {}
  for stem, paths in found.items():
    paths.sort(key=lambda p: rank[p.suffix.lower()])
    files[stem] = paths[0]
    if len(paths) > 1:
      duplicates[stem] = paths[1:]
  return MediaIndex(files, duplicates)


def find_test_list(root: str | os.PathLike) -> list[pathlib.Path]:
  """Candidate test lists: ``*test*set*.txt`` anywhere under root, outside the annotations."""
  root = pathlib.Path(root)
  pattern = re.compile(r"test.*set.*\.txt$", re.IGNORECASE)
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Crops and media folders are large and never hold the list.
    dirnames[:] = sorted(d for d in dirnames if d != CROPS_DIR and
                         not d.lower().startswith("batch") and d not in SPLIT_DIRS.values())
    out.extend(pathlib.Path(dirpath) / f for f in sorted(filenames) if pattern.search(f))
  return out


def read_test_list(path: str | os.PathLike) -> list[str]:
  """Video names of the test set, one a line (blank lines and duplicates dropped).

  A ``.mp4``/``.avi`` extension on a name is dropped; a header line such as ``name`` or
  ``video`` is not expected and would be reported as missing media.
  """
  names, seen = [], set()
  for line in pathlib.Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
    name = line.strip().replace("\ufeff", "")
    stem, ext = os.path.splitext(name)
    if ext.lower() in decode.MEDIA_EXTENSIONS:
      name = stem
    if name and name not in seen:
      seen.add(name)
      names.append(name)
  return names


def crops_dir(root: str | os.PathLike, name: str) -> pathlib.Path:
  return pathlib.Path(root) / CROPS_DIR / name


def crop_path(root: str | os.PathLike, name: str, frame: int) -> pathlib.Path:
  """The face crop of 1-based ``frame`` of annotation ``name`` (it may not exist)."""
  return crops_dir(root, name) / f"{frame:05d}.jpg"


def list_crops(crops: str | os.PathLike) -> set[int]:
  """1-based frame numbers that have a crop file in the folder ``crops`` (one listing)."""
  d = pathlib.Path(crops)
  if not d.is_dir():
    return set()
  out = set()
  for f in os.listdir(d):
    stem, ext = os.path.splitext(f)
    # Only names crop_path would produce (00017.jpg), so every listed frame can be opened.
    if ext == ".jpg" and stem.isdigit() and stem == f"{int(stem):05d}":
      out.add(int(stem))
  return out

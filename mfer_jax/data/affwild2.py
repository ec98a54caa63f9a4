"""The raw Aff-Wild2 Expression layout: finding and validating annotations, media and crops.

Releases unpack differently (data_prep/README.md lists the ones we recognise), so the parts
are found by name at any depth under ROOT, in one walk (`scan_release`)::

    .../EXPR_Recognition_Challenge/Train_Set/<name>.txt      the annotations (or the older
    .../EXPR_Recognition_Challenge/Validation_Set/<name>.txt  EXPR_Classification_Challenge);
                                                              exactly one such folder, or
                                                              --annotations=DIR
    .../batch*/**/<stem>.mp4|.avi, .../new_vids*/**/...      media, in any batch*/ or new_vids*/
    .../cropped_aligned*/<name>/<NNNNN>.jpg                   112x112 face crops, 1-based, from
                                                              every cropped_aligned* folder
    .../<known name>_test_set_release.txt                     test names, one a line
                                                              (`TEST_LIST_NAMES`), or --test_list

``<name>`` is a media stem, or ``<stem>_left`` / ``<stem>_right`` for two-person videos, which
share the media file ``<stem>.<ext>`` but have their own labels and crop folders. The synthetic
generator writes the canonical shape (ROOT/annotations/..., ROOT/cropped_aligned/...,
ROOT/test_set/...), which `crops_dir` and `crop_path` name.
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
CROPS_DIR = "cropped_aligned"    # the canonical crops folder; every cropped_aligned* is read
MEDIA_DIR_PREFIXES = ("batch", "new_vids")
# Expression test-list file names (lower case) of the releases we can document, and where each
# was seen (public ABAW code; data_prep/README.md). Other challenges' lists (VA, AU, MTL) and
# the submission-format samples (CVPR_6th_ABAW_Expr_test_set_sample.txt) sit beside them and
# must not be taken for the Expression list.
TEST_LIST_NAMES = {
    "expression_recognition_challenge_test_set_release.txt":
        "ABAW6 (CVPR 2024), names_of_videos_in_each_test_set/",
    "expression_classification_challenge_test_set_release.txt":
        "ABAW5 (CVPR 2023), names_of_videos_in_each_test_set/",
    "expr_test_set_release.txt": "testset/ folders of ABAW3-ABAW6 code bases",
    "expr_recognition_challenge_test_set_release.txt": "this project's synthetic set",
}
_SIDE_SUFFIX = re.compile(r"_(left|right)$")
_ANY_TEST_SET = re.compile(r"test.*set.*\.txt$", re.IGNORECASE)

LAYOUT_HELP = """\
Expected the Aff-Wild2 Expression layout under ROOT (folders found at any depth):
  .../batch1/<video>.mp4|.avi (any batch*/ or new_vids*/ folder)
  .../cropped_aligned/<name>/<NNNNN>.jpg (every cropped_aligned*/ folder, e.g. also
    cropped_aligned_new_50_vids/)
  .../EXPR_Recognition_Challenge/{Train_Set,Validation_Set}/<name>.txt
    (or EXPR_Classification_Challenge; e.g. under 6th_ABAW_Annotations/; pick one with
    --annotations=DIR)
  .../Expression_Recognition_Challenge_test_set_release.txt (test video names, one a line;
    known names in data_prep/README.md; or pass --test_list=FILE)
A synthetic set in this layout: python -m data_prep.synth --out DIR"""
# The one-line pointer that errors carry instead of LAYOUT_HELP (an error is one line).
LAYOUT_POINTER = ("expected, at any depth under ROOT, batch*/<video>.mp4|.avi, "
                  "cropped_aligned*/<name>/ and EXPR_Recognition_Challenge/{Train_Set,"
                  "Validation_Set}/ (the layout: data_prep/README.md, 'The layout read')")


class LayoutError(errors.UserError, RuntimeError):
  """The root does not look like Aff-Wild2 (fatal); the message explains the layout."""


class AnnotationError(errors.UserError, ValueError):
  """An annotation file that cannot be used; the message names the file and line."""


def shown_path(path: pathlib.Path, root: pathlib.Path) -> str:
  """``path`` relative to ``root`` when inside it (shorter in messages), else as given."""
  try:
    return path.relative_to(root).as_posix() or "."
  except ValueError:
    return str(path)


def _is_media_dir(name: str) -> bool:
  return name.lower().startswith(MEDIA_DIR_PREFIXES)


def _is_challenge_dir(path: pathlib.Path) -> bool:
  """An EXPR challenge folder (either name, any case) holding a Train_Set or Validation_Set."""
  return (path.name.lower() in {c.lower() for c in CHALLENGE_DIRS}
          and any((path / d).is_dir() for d in SPLIT_DIRS.values()))


def _has_split_dirs(path: pathlib.Path) -> bool:
  return any((path / d).is_dir() for d in SPLIT_DIRS.values())


@dataclasses.dataclass
class MediaIndex:
  """Media files under the release's batch*/ and new_vids*/ folders, by stem.

  Attributes:
    files: stem -> path (first in sorted path order, preferred extension first).
    duplicates: stem -> other paths with the same stem (reported as warnings).
  """

  files: dict[str, pathlib.Path]
  duplicates: dict[str, list[pathlib.Path]]

  def find(self, name: str) -> pathlib.Path | None:
    """The media of an annotation name: its own stem first, then without _left/_right."""
    return self.files.get(name) or self.files.get(media_stem(name))


def _media_index(paths: list[pathlib.Path]) -> MediaIndex:
  rank = {ext: i for i, ext in enumerate(decode.MEDIA_EXTENSIONS)}
  found: dict[str, list[pathlib.Path]] = {}
  for p in sorted(paths):
    found.setdefault(p.stem, []).append(p)
  files, duplicates = {}, {}
  for stem, same in found.items():
    same.sort(key=lambda p: rank[p.suffix.lower()])   # stable: path order within a rank
    files[stem] = same[0]
    if len(same) > 1:
      duplicates[stem] = same[1:]
  return MediaIndex(files, duplicates)


@dataclasses.dataclass
class CropIndex:
  """Face-crop folders of every ``cropped_aligned*`` folder of the release, by name.

  Releases ship crops in more than one folder (``cropped_aligned/`` and
  ``cropped_aligned_new_50_vids/``, sometimes nested as ``cropped_aligned/cropped_aligned/``).

  Attributes:
    roots: the ``cropped_aligned*`` folders that hold per-video folders, sorted.
    folders: name -> every crop folder of that name (two or more is an error on `find`).
  """

  roots: list[pathlib.Path]
  folders: dict[str, list[pathlib.Path]]

  def find(self, name: str) -> pathlib.Path | None:
    """The crop folder of annotation name ``name``, or None if no crops folder holds it.

    Raises:
      LayoutError: if two ``cropped_aligned*`` folders both hold ``name`` (naming both).
    """
    found = self.folders.get(name, [])
    if len(found) > 1:
      raise LayoutError(
          f"the crops of {name!r} are in {len(found)} folders: "
          f"{' and '.join(str(p) for p in found)}; keep one (move or delete the other copy)")
    return found[0] if found else None


def _crop_roots(path: pathlib.Path, roots: list, folders: dict) -> None:
  """Reads one ``cropped_aligned*`` folder: nested ``cropped_aligned*`` children are crop
  folders of their own, every other child folder holds one video's crops."""
  holds_videos = False
  for child in sorted(os.scandir(path), key=lambda e: e.name):
    if not child.is_dir() or child.name.startswith((".", "__")):
      continue
    if child.name.lower().startswith(CROPS_DIR):
      _crop_roots(pathlib.Path(child.path), roots, folders)
    else:
      holds_videos = True
      folders.setdefault(child.name, []).append(pathlib.Path(child.path))
  if holds_videos:
    roots.append(path)


@dataclasses.dataclass
class Release:
  """What one walk over an unpacked release found (see the module docstring).

  Attributes:
    root: the folder walked.
    challenge_dirs: EXPR challenge folders (with Train_Set/Validation_Set), sorted.
    media: media files by stem.
    crops: crop folders by name.
    test_lists: files with a known Expression test-list name (`TEST_LIST_NAMES`).
    test_set_files: every ``*test*set*.txt`` seen (named in errors when no known list is).
  """

  root: pathlib.Path
  challenge_dirs: list[pathlib.Path]
  media: MediaIndex
  crops: CropIndex
  test_lists: list[pathlib.Path]
  test_set_files: list[pathlib.Path]

  def challenge_dir(self, annotations: str | os.PathLike | None = None) -> pathlib.Path:
    """The one Expression annotation folder: ``annotations`` if given, else the one found.

    Args:
      annotations: a challenge folder (anything holding Train_Set/Validation_Set), or a
        folder with exactly one EXPR challenge folder somewhere below it.

    Raises:
      LayoutError: none found, or several (listing them and suggesting --annotations=DIR).
    """
    if annotations is not None:
      chosen = pathlib.Path(annotations)
      if not chosen.is_dir():
        raise LayoutError(f"--annotations={chosen}: no such folder")
      if _has_split_dirs(chosen):
        return chosen
      below = scan_release(chosen).challenge_dirs
      if len(below) == 1:
        return below[0]
      what = ("no " + "/".join(CHALLENGE_DIRS) + " folder with Train_Set/Validation_Set"
              if not below else f"several: {', '.join(shown_path(p, chosen) for p in below)}")
      raise LayoutError(f"--annotations={chosen} holds {what}; name the challenge folder "
                        "itself (the one holding Train_Set/Validation_Set)")
    if not self.challenge_dirs:
      raise LayoutError(f"{self.root}: no annotation folder ({' or '.join(CHALLENGE_DIRS)} "
                        f"with Train_Set/Validation_Set) at any depth; {LAYOUT_POINTER}")
    if len(self.challenge_dirs) > 1:
      listed = ", ".join(shown_path(p, self.root) for p in self.challenge_dirs)
      raise LayoutError(f"{self.root}: {len(self.challenge_dirs)} Expression annotation "
                        f"folders ({listed}); choose one with --annotations=DIR")
    return self.challenge_dirs[0]

  def test_list(self, test_list: str | os.PathLike | None = None) -> pathlib.Path:
    """The test names file: ``test_list`` if given, else the one with a known name.

    Raises:
      LayoutError: ``test_list`` missing; no known list (naming the ``*test*set*.txt``
        files seen, which are other challenges' lists or samples); or several.
    """
    if test_list is not None:
      if not os.path.isfile(test_list):
        raise LayoutError(f"--test_list={test_list}: no such file")
      return pathlib.Path(test_list)
    if len(self.test_lists) == 1:
      return self.test_lists[0]
    if self.test_lists:
      raise LayoutError(f"{self.root}: several Expression test lists "
                        f"({', '.join(shown_path(p, self.root) for p in self.test_lists)}); "
                        "choose one with --test_list=FILE")
    others = [shown_path(p, self.root) for p in self.test_set_files]
    seen = (f"; the *test*set*.txt files found ({', '.join(others[:6])}"
            f"{', ...' if len(others) > 6 else ''}) are not Expression name lists"
            if others else "")
    raise LayoutError(f"{self.root}: no Expression test list (known names: "
                      f"{', '.join(TEST_LIST_NAMES)}; case ignored){seen}; pass "
                      f"--test_list=FILE or leave test out of --splits")


def scan_release(root: str | os.PathLike) -> Release:
  """Walks ``root`` once (following symlinks) and indexes annotations, media, crops, lists.

  Crop folders are listed one level deep (their per-video folders are not opened), annotation
  split folders are not listed, and ``cropped*`` folders other than ``cropped_aligned*``
  (unaligned crops) are skipped, so the walk stays cheap on a full release.
  """
  root = pathlib.Path(root)
  challenge_dirs, media, test_lists, test_set_files = [], [], [], []
  crop_roots, crop_folders = [], {}
  seen = set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    here = pathlib.Path(dirpath)
    real = os.path.realpath(here)
    if real in seen:   # a symlink cycle, or two links to one folder
      dirnames[:] = []
      continue
    seen.add(real)
    in_media = any(_is_media_dir(part) for part in here.relative_to(root).parts)
    for f in sorted(filenames):
      if f.startswith("."):
        continue
      if in_media and os.path.splitext(f)[1].lower() in decode.MEDIA_EXTENSIONS:
        media.append(here / f)
      elif f.lower() in TEST_LIST_NAMES:
        test_lists.append(here / f)
      elif _ANY_TEST_SET.search(f):
        test_set_files.append(here / f)
    keep = []
    for d in sorted(dirnames):
      low = d.lower()
      if d.startswith((".", "__")) or d in SPLIT_DIRS.values():
        continue
      if low.startswith(CROPS_DIR):
        _crop_roots(here / d, crop_roots, crop_folders)
      elif low.startswith("cropped"):
        continue   # unaligned crops (cropped/, cropped_new_50_vids/): not read
      elif _is_challenge_dir(here / d):
        challenge_dirs.append(here / d)
      else:
        keep.append(d)
    dirnames[:] = keep
  return Release(root=root, challenge_dirs=sorted(challenge_dirs), media=_media_index(media),
                 crops=CropIndex(sorted(crop_roots), crop_folders),
                 test_lists=sorted(test_lists), test_set_files=sorted(test_set_files))


def find_annotation_dir(root: str | os.PathLike, split: str,
                        annotations: str | os.PathLike | None = None) -> pathlib.Path | None:
  """The folder of ``split``'s annotation files, or None if the challenge folder lacks it.

  Raises:
    LayoutError: no challenge folder, or several (see `Release.challenge_dir`).
  """
  d = scan_release(root).challenge_dir(annotations) / SPLIT_DIRS[split]
  return d if d.is_dir() else None


def list_split_annotations(challenge_dir: str | os.PathLike, split: str) -> list[pathlib.Path]:
  """Annotation files of a labelled split of one challenge folder, sorted by name.

  Raises:
    LayoutError: if the split's folder is missing or holds no .txt file.
  """
  d = pathlib.Path(challenge_dir) / SPLIT_DIRS[split]
  if not d.is_dir():
    raise LayoutError(f"{challenge_dir}: no annotation folder for split {split!r} "
                      f"({SPLIT_DIRS[split]}/); {LAYOUT_POINTER}")
  files = sorted(p for p in d.iterdir() if p.suffix == ".txt" and p.is_file())
  if not files:
    raise LayoutError(f"{d}: annotation folder is empty (no <name>.txt files); {LAYOUT_POINTER}")
  return files


def list_annotations(root: str | os.PathLike, split: str,
                     annotations: str | os.PathLike | None = None) -> list[pathlib.Path]:
  """`list_split_annotations` of the release's challenge folder (or ``annotations``)."""
  return list_split_annotations(scan_release(root).challenge_dir(annotations), split)


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


def side(name: str) -> str | None:
  """The person a two-person name stands for: ``x_left`` -> "left", ``x_right`` -> "right",
  anything else -> None."""
  match = _SIDE_SUFFIX.search(name)
  return match.group(1) if match else None


def media_stem(name: str) -> str:
  """The media stem of an annotation name: ``x_left`` and ``x_right`` -> ``x``."""
  return _SIDE_SUFFIX.sub("", name)


def index_media(root: str | os.PathLike) -> MediaIndex:
  """Media under every ``batch*`` / ``new_vids*`` folder of ``root``, at any depth."""
  return scan_release(root).media


def find_test_list(root: str | os.PathLike) -> list[pathlib.Path]:
  """Files under ``root`` with a known Expression test-list name (`TEST_LIST_NAMES`)."""
  return scan_release(root).test_lists


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
  """The canonical crop folder ``ROOT/cropped_aligned/<name>`` (what the synthetic set writes);
  readers of a release use ``scan_release(root).crops.find(name)``."""
  return pathlib.Path(root) / CROPS_DIR / name


def crop_path(root: str | os.PathLike, name: str, frame: int) -> pathlib.Path:
  """The face crop of 1-based ``frame`` of annotation ``name`` (it may not exist)."""
  return crops_dir(root, name) / f"{frame:05d}.jpg"


def list_crops(crops: str | os.PathLike | None) -> set[int]:
  """1-based frame numbers that have a crop file in the folder ``crops`` (one listing)."""
  if not crops or not os.path.isdir(crops):
    return set()
  d = pathlib.Path(crops)
  out = set()
  for f in os.listdir(d):
    stem, ext = os.path.splitext(f)
    # Only names crop_path would produce (00017.jpg), so every listed frame can be opened.
    if ext == ".jpg" and stem.isdigit() and stem == f"{int(stem):05d}":
      out.add(int(stem))
  return out

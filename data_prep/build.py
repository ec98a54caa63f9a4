"""Builds the prepared dataset (ArrayRecord shards + index + metadata) from raw Aff-Wild2.

    python -m data_prep.build --root=AFFWILD2_DIR --out=DATA_DIR \\
        [--splits=train,validation,test] [--workers=N] [--annotations=DIR] \\
        [--test_list=FILE] [--n_mels=64] ...
    python -m data_prep.build --root=AFFWILD2_DIR --out=DATA_DIR --detect   # no crops folder
    python -m data_prep.build --manifest=clips.csv --out=DATA_DIR           # any dataset

The release is found at any depth under --root (`mfer_jax.data.affwild2.scan_release`): the one
EXPR challenge folder, media in batch*/ and new_vids*/, crops in every cropped_aligned*/ folder,
the test list by its known names. With ``--detect``, names whose crops folder is missing or
incomplete get their crops from the face detector, tracker and aligner prediction uses
(`mfer_jax.media.faces`). ``--manifest`` reads any labelled video dataset from a CSV
(`data_prep.manifest`); its faces are always detected. Both write the same records.

One shard per annotation file (test: per listed video), one record per annotated valid frame
(train/validation) or per decoded frame (test, label -1); see data_prep/README.md for the
record schema, the alignment rule and the policy for each kind of bad input.

Resumable: a video is finished when its sidecar ``<split>/<name>.done.json`` exists (written
atomically after its shard), and a re-run skips it. ``metadata.json`` and the split indexes
are written last, atomically, and removed first whenever any video has to be (re)built, so a
dataset that has a metadata.json is complete.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from absl import flags

from data_prep import manifest as manifest_lib
from mfer_jax import cli, constants, errors, files
from mfer_jax.data import affwild2
from mfer_jax.media import audio_features
from mfer_jax.media import decode
from mfer_jax.media import faces
from mfer_jax.data import records
from mfer_jax.data import store

FACE_SIZE = constants.FACE_SIZE
# With --detect, a crops folder covering fewer than this fraction of the video's decoded
# frames counts as incomplete (a partial extraction) and the faces are detected instead.
# Aff-Wild2's own folders miss only the frames without a visible face, far fewer than half.
MIN_CROP_COVERAGE = 0.5


class BuildError(errors.UserError, RuntimeError):
  """A fatal problem (wrong root, nothing usable); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class VideoJob:
  """One shard to build: an annotation file (or a test name) and its media and crops.

  Attributes:
    split: "train", "validation" or "test".
    name: annotation name (``_left``/``_right`` kept).
    media: media file path.
    media_rel: media path relative to the root (written to the metadata).
    crops: this name's crop folder, or "" when no cropped_aligned* folder holds it (and for
      manifest jobs).
    crops_rel: the crop folder relative to the root ("" without one; in the metadata).
    annotation: annotation (per-frame label) file path; None for test videos and clip labels.
    clip_label: a class index for every frame (manifest clip labels), or None.
    detect: detect, track and align the faces when the crops folder is missing or incomplete
      (`MIN_CROP_COVERAGE`); manifest jobs always detect.
    person: the face track to crop when detecting ("largest", "left", "right").
    detect_every: the detector runs every k-th frame (`mfer_jax.media.track`).
    origin: where the job comes from, for messages (a manifest's ``file:line``), or "".
  """

  split: str
  name: str
  media: str
  media_rel: str
  crops: str
  crops_rel: str = ""
  annotation: str | None = None
  clip_label: int | None = None
  detect: bool = False
  person: str = "largest"
  detect_every: int = 1
  origin: str = ""

  def fingerprint(self) -> dict[str, Any]:
    """Sizes and mtimes of the inputs, the crop folder, and the face and label settings: a
    finished video is rebuilt when they change."""
    out: dict[str, Any] = {}
    # Only when not the canonical cropped_aligned/<name>, so sidecars of earlier builds stay
    # valid; a video whose crops move to another folder is rebuilt. Manifest jobs (with an
    # origin) have no crops folder.
    if self.crops_rel != f"{affwild2.CROPS_DIR}/{self.name}" and not self.origin:
      out["crops"] = self.crops_rel
    for key, path in (("media", self.media), ("annotation", self.annotation)):
      if path:
        st = os.stat(path)
        out[key] = [st.st_size, st.st_mtime_ns]
    # Only when set, so sidecars of builds from crops folders stay valid.
    if self.clip_label is not None:
      out["clip_label"] = self.clip_label
    if self.detect:
      out["faces"] = {"detect": True, "person": self.person, "detect_every": self.detect_every,
                      "crop_style": faces.CROP_STYLE}
    return out


@dataclasses.dataclass
class PreparedVideo:
  """Everything about one video except the record bytes, which `frame_records` yields lazily.

  Attributes:
    job: the job.
    entry: its ``metadata.json`` ``videos`` entry.
    frame, label, has_face: per-record index arrays, in record order.
    warnings: messages about repairs (each names the file).
  """

  job: VideoJob
  entry: dict[str, Any]
  frame: np.ndarray
  label: np.ndarray
  has_face: np.ndarray
  warnings: list[str]
  _windows: audio_features.FrameWindows
  _detected: dict[int, bytes] | None = None

  def frame_records(self) -> Iterator[records.FrameRecord]:
    """The video's records, in frame order (reads the crop files as it goes)."""
    for frame, label, has_face in zip(self.frame.tolist(), self.label.tolist(),
                                      self.has_face.tolist()):
      face = b""
      if has_face and self._detected is not None:
        face = self._detected[frame]
      elif has_face:
        # Passed through unchanged: no JPEG re-encode, no quality loss, no CPU.
        with open(os.path.join(self.job.crops, f"{frame:05d}.jpg"), "rb") as f:
          face = f.read()
      yield records.FrameRecord(split=self.job.split, video=self.job.name, frame=frame,
                                label=label, face_jpeg=face,
                                mel=np.array(self._windows[frame - 1]))


class SkipVideo(Exception):
  """This video is left out; the message (naming the file and line) says why."""


def _decode_media(path: str, params: audio_features.FeatureParams):
  """(MediaInfo, whole-track uint8 mel, flags, warnings) of a media file, or a SkipVideo."""
  try:
    info = decode.probe(path)
  except decode.MediaError as e:
    return SkipVideo(str(e))
  flags, warnings = [], []
  audio = np.zeros(0, np.float32)
  if not info.has_audio:
    flags.append("no_audio")
    warnings.append(f"{path}: no audio track")
  else:
    try:
      audio, _ = audio_features.load_audio(path, params, info.start_time)
    except decode.MediaError as e:
      flags.append("audio_error")
      warnings.append(str(e))
  return info, audio_features.compute_log_mel(audio, params), flags, warnings


def prepare_video(job: VideoJob, params: audio_features.FeatureParams,
                  media_cache: dict | None = None) -> PreparedVideo:
  """Reads one video's labels, frames count, audio and crops, applying the bad-input policies.

  Args:
    job: the annotation file (or test name) and its media.
    params: log-mel parameters.
    media_cache: a dict shared by consecutive calls: a ``_left``/``_right`` pair then decodes
      its media and computes its mel once.

  Raises:
    SkipVideo: bad annotation (wrong header, non-integer or out-of-range label) or corrupt /
      undecodable video.
  """
  warnings, flags = [], []
  labels = None
  if job.annotation is not None:
    try:
      labels = affwild2.parse_annotation(job.annotation)
    except affwild2.AnnotationError as e:
      raise SkipVideo(f"{e} (file skipped)") from None
  cache = media_cache if media_cache is not None else {}
  if job.media not in cache:
    cache.clear()   # keep one media: the jobs sharing it are adjacent
    cache[job.media] = _decode_media(job.media, params)
  decoded = cache[job.media]
  if isinstance(decoded, SkipVideo):
    raise SkipVideo(f"{decoded} (corrupt media, {job.name} skipped)")
  info, mel, media_flags, media_warnings = decoded
  flags += media_flags
  warnings += [f"{w}; {job.name} gets silent audio windows" for w in media_warnings]
  n = info.num_frames
  windows = audio_features.frame_windows(mel, info.fps, n, params)

  entry: dict[str, Any] = {}
  if job.clip_label is not None:   # one label for the whole clip
    label = np.full(n, job.clip_label, np.int32)
    entry["clip_label"] = job.clip_label
  elif labels is None:   # test: every decoded frame, unlabelled
    label = np.full(n, -1, np.int32)
  else:
    entry["annotation_frames"] = int(labels.size)
    if labels.size != n:
      flags.append("length_mismatch")
      action = ("truncated" if labels.size > n else "padded with -1")
      warnings.append(f"{job.annotation}: {labels.size} labels but {job.media} decodes to {n} "
                      f"frames; labels {action} to {n}")
    label = np.full(n, -1, np.int32)
    label[:min(n, labels.size)] = labels[:n]
  frame = np.arange(1, n + 1, dtype=np.int32)
  if labels is not None or job.clip_label is not None:
    keep = label >= 0
    frame, label = frame[keep], label[keep]

  crops = affwild2.list_crops(job.crops) if job.crops else set()
  detected = None
  if job.detect and len(crops) < MIN_CROP_COVERAGE * n:
    detected = _detected_crops(job, set(frame.tolist()), cache)
    crops = set(detected)
    flags.append("detected_faces")
    if not crops:
      warnings.append(f"{job.media}: no face found ({job.person}); every record of "
                      f"{job.name} has no face")
  elif not crops:
    flags.append("no_crops")
    where = (f"{job.crops}: no face crops" if job.crops else
             f"no cropped_aligned* folder holds {job.name!r}")
    warnings.append(f"{where}; every record of {job.name} has no face (build with --detect to "
                    "detect them)")
  has_face = np.fromiter((f in crops for f in frame.tolist()), bool, count=frame.size)

  entry.update({
      "split": job.split, "fps": float(info.fps),
      "fps_fraction": f"{info.fps.numerator}/{info.fps.denominator}",
      "num_frames": n, "duration": info.duration, "sample_rate": info.sample_rate,
      "audio_channels": info.channels, "media": job.media_rel,
      "crops": "" if detected is not None else job.crops_rel, "flags": flags,
      "num_records": int(frame.size), "num_faces": int(has_face.sum())})
  return PreparedVideo(job=job, entry=entry, frame=frame, label=label, has_face=has_face,
                       warnings=warnings, _windows=windows, _detected=detected)


def _detected_crops(job: VideoJob, wanted: set[int], cache: dict) -> dict[int, bytes]:
  """Frame -> JPEG crop of the job's person, detected, tracked and aligned like prediction's
  faces (`mfer_jax.media.faces`), for the frames in ``wanted``."""
  key = ("tracks", job.media, job.detect_every)
  if key not in cache:   # a _left/_right pair tracks its media once
    try:
      cache[key] = faces.track_video(job.media, detect_every=job.detect_every)
    except decode.MediaError as e:
      raise SkipVideo(f"{e} (corrupt media, {job.name} skipped)") from None
  chosen = cache[key].select(job.person)
  if not chosen:
    return {}
  out = {}
  for number, (crop,) in faces.aligned_faces(job.media, [chosen[0][1]], FACE_SIZE):
    if crop is not None and number in wanted:
      out[number] = faces.encode_crop(crop)
  return out


# ---------------------------------------------------------------------------------------------
# One video in a worker process: shard, then sidecar.


def sidecar_path(out: str | os.PathLike, split: str, name: str) -> pathlib.Path:
  return pathlib.Path(out) / split / f"{name}.done.json"


@dataclasses.dataclass
class VideoResult:
  """What a worker reports for one job (JSON-able, so it doubles as the sidecar).

  Attributes:
    split, name: the job.
    entry: the metadata entry, or None if skipped.
    index: {"frame", "label", "has_face"} lists, in record order.
    warnings: repairs made, each naming the file.
    skipped: why the video was left out, or None.
    resumed: True if a previous run had finished it.
    cpu_seconds: worker CPU time spent on it.
    shard_bytes: size of the shard file.
  """

  split: str
  name: str
  entry: dict[str, Any] | None = None
  index: dict[str, list] | None = None
  warnings: list[str] = dataclasses.field(default_factory=list)
  skipped: str | None = None
  resumed: bool = False
  cpu_seconds: float = 0.0
  shard_bytes: int = 0


def load_sidecar(out, job: VideoJob, params) -> VideoResult | None:
  """The finished result of ``job`` from a previous run, if its inputs and params still match."""
  path = sidecar_path(out, job.split, job.name)
  shard = store.shard_path(out, job.split, job.name)
  if not path.is_file():
    return None
  try:
    side = json.loads(path.read_text())
    if side["features"] != params.to_dict() or side["source"] != job.fingerprint():
      return None
    result = VideoResult(**side["result"])
  except (ValueError, KeyError, TypeError, OSError):
    return None   # a sidecar from another version: rebuild the video
  if result.entry is not None and not shard.is_file():
    return None
  if result.entry is not None:   # sidecars of builds before the crops key
    result.entry.setdefault("crops", job.crops_rel)
  result.resumed = True
  return result


def process_video(job: VideoJob, params: audio_features.FeatureParams, out: str,
                  media_cache: dict | None = None) -> VideoResult:
  """Builds one video's shard and sidecar."""
  start = time.process_time()
  result = VideoResult(split=job.split, name=job.name)
  origin = f"{job.origin}: " if job.origin else ""
  try:
    video = prepare_video(job, params, media_cache)
  except SkipVideo as e:
    result.skipped = origin + str(e)
  else:
    result.warnings = video.warnings
    if video.frame.size == 0:
      result.skipped = (f"{origin}{job.annotation or job.media}: no valid frame (every label "
                        f"is -1); {job.name} left out")
    else:
      shard = store.shard_path(out, job.split, job.name)
      store.write_shard(shard, (records.encode_record(r) for r in video.frame_records()))
      result.entry = video.entry
      result.index = {"frame": video.frame.tolist(), "label": video.label.tolist(),
                      "has_face": video.has_face.tolist()}
      result.shard_bytes = shard.stat().st_size
  result.cpu_seconds = time.process_time() - start
  # Skipped videos get a sidecar too: a re-run does not retry unchanged bad inputs.
  files.atomic_write_json(sidecar_path(out, job.split, job.name), {
      "features": params.to_dict(), "source": job.fingerprint(),
      "result": dataclasses.asdict(result)})
  return result


# ---------------------------------------------------------------------------------------------
# Planning: which annotation files / test names become which jobs.


@dataclasses.dataclass
class Plan:
  jobs: list[VideoJob]
  skipped: list[tuple[str, str, str]]   # (split, name, reason)
  warnings: list[str]
  annotations: str = ""                 # the challenge folder read, relative to the root
  test_list: str = ""                   # the test names file read


def plan_jobs(root: str | os.PathLike, splits: Sequence[str],
              test_list: str | os.PathLike | None = None,
              annotations: str | os.PathLike | None = None, detect: bool = False,
              detect_every: int = 1) -> Plan:
  """Lists the jobs of the requested splits, and the annotations that cannot become one.

  Args:
    root: the unpacked release (see `affwild2.scan_release`).
    splits: any of "train", "validation", "test".
    test_list: the test names file; default: the one with a known name under root.
    annotations: the EXPR challenge folder; default: the one found under root.
    detect: detect faces where a name's crops folder is missing or incomplete; the person is
      named by the annotation name (``x_left``: the left one, ``x_right``: the right one,
      otherwise the largest).
    detect_every: see `VideoJob`.

  Raises:
    BuildError: wrong root, no / several / empty annotation folders, no media, no or several
      test lists, or one video's crops in two cropped_aligned* folders.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise BuildError(f"--root={root} is not a directory; {affwild2.LAYOUT_POINTER}")
  release = affwild2.scan_release(root)
  index = release.media
  if not index.files:
    raise BuildError(f"{root}: no media files in batch*/ or new_vids*/ folders "
                     f"({', '.join(decode.MEDIA_EXTENSIONS)}); {affwild2.LAYOUT_POINTER}")
  plan = Plan([], [], [])
  for stem, others in sorted(index.duplicates.items()):
    plan.warnings.append(f"{others[0]}: another media file for {stem!r}; using "
                         f"{index.files[stem]}")
  seen: dict[str, str] = {}
  for split in splits:
    try:
      if split == "test":
        names, source = _test_names(release, test_list)
        plan.test_list = affwild2.shown_path(pathlib.Path(source), root)
        entries = [(n, None, f"{source}") for n in names]
      else:
        challenge = release.challenge_dir(annotations)
        plan.annotations = affwild2.shown_path(challenge, root)
        files = affwild2.list_split_annotations(challenge, split)
        entries = [(p.stem, str(p), str(p)) for p in files]
    except affwild2.LayoutError as e:
      raise BuildError(str(e)) from None
    for name, annotation, where in entries:
      if name in seen:
        plan.skipped.append((split, name, f"{where}: {name!r} is already in split "
                             f"{seen[name]!r}; this one is skipped"))
        continue
      path = index.find(name)
      if path is None:
        plan.skipped.append((split, name, f"{where}: no media file for {name!r} (looked for "
                             f"{affwild2.media_stem(name)}.<ext> in batch*/ and new_vids*/); "
                             "skipped"))
        continue
      try:
        crops = release.crops.find(name)
      except affwild2.LayoutError as e:
        raise BuildError(str(e)) from None
      seen[name] = split
      side = affwild2.side(name)
      plan.jobs.append(VideoJob(split=split, name=name, media=str(path),
                                media_rel=path.relative_to(root).as_posix(),
                                crops=str(crops) if crops else "",
                                crops_rel=crops.relative_to(root).as_posix() if crops else "",
                                annotation=annotation, detect=detect,
                                person=side or "largest", detect_every=detect_every))
  return plan


def plan_manifest(manifest: str | os.PathLike, splits: Sequence[str],
                  detect_every: int = 1) -> Plan:
  """The jobs of a manifest's rows (`data_prep.manifest`); bad rows are skipped with their
  line numbers.

  Raises:
    BuildError: the manifest cannot be read as a whole (see `manifest.read_manifest`).
  """
  try:
    read = manifest_lib.read_manifest(manifest, splits)
  except manifest_lib.ManifestError as e:
    raise BuildError(str(e)) from None
  plan = Plan([], [], list(read.warnings))
  for line, why in read.bad:
    plan.skipped.append(("?", f"line {line}", f"{read.path}:{line}: {why}; row skipped"))
  for e in read.entries:
    plan.jobs.append(VideoJob(split=e.split, name=e.name, media=e.video, media_rel=e.video_rel,
                              crops="", annotation=e.label_file, clip_label=e.clip_label,
                              detect=True, person=e.person, detect_every=detect_every,
                              origin=f"{read.path}:{e.line}"))
  # Rows keep their manifest order within a split; the pool groups the jobs of one media.
  plan.jobs.sort(key=lambda j: constants.SPLITS.index(j.split))
  return plan


def _test_names(release: affwild2.Release, test_list) -> tuple[list[str], str]:
  test_list = release.test_list(test_list)
  names = affwild2.read_test_list(test_list)
  if not names:
    raise BuildError(f"{test_list}: the test list is empty")
  return names, str(test_list)


# ---------------------------------------------------------------------------------------------
# The build.


@dataclasses.dataclass
class Summary:
  """What a build did; `text` is the report printed at the end.

  Attributes:
    out: the dataset directory.
    built, resumed: names of videos built now / finished by an earlier run.
    skipped: (split, name, reason) of videos left out.
    repaired: (name, warning) of repairs (no audio, length mismatch, no crops, ...).
    num_records: per split.
    class_counts: per split, 8 ints.
    shard_bytes: total size of all shards.
    decoded_frames: video frames decoded by this run (resumed videos excluded).
    cpu_seconds: worker CPU time of this run; wall_seconds: elapsed time.
    annotations, test_list: the challenge folder and the test list read ("" if not read).
    crops_from: name -> the cropped_aligned* folder its crops came from ("" for none, None
      for faces detected), for every video written.
  """

  out: str
  built: list[str] = dataclasses.field(default_factory=list)
  resumed: list[str] = dataclasses.field(default_factory=list)
  skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
  repaired: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  num_records: dict[str, int] = dataclasses.field(default_factory=dict)
  class_counts: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  shard_bytes: int = 0
  decoded_frames: int = 0
  cpu_seconds: float = 0.0
  wall_seconds: float = 0.0
  annotations: str = ""
  test_list: str = ""
  crops_from: dict[str, str | None] = dataclasses.field(default_factory=dict)

  @property
  def total_records(self) -> int:
    return sum(self.num_records.values())

  @property
  def bytes_per_record(self) -> float:
    return self.shard_bytes / max(1, self.total_records)

  @property
  def frames_per_cpu_second(self) -> float:
    return self.decoded_frames / self.cpu_seconds if self.cpu_seconds else 0.0

  def text(self) -> str:
    lines = [f"Built {self.out}: {len(self.built)} videos now, {len(self.resumed)} finished "
             f"earlier, {len(self.skipped)} skipped."]
    for split, n in self.num_records.items():
      lines.append(f"  {split}: {n} records, per class {self.class_counts[split]}")
    lines.append(f"  {self.shard_bytes / 1e6:.1f} MB of shards, "
                 f"{self.bytes_per_record:.0f} bytes/record")
    if self.decoded_frames:
      lines.append(f"  {self.decoded_frames} frames in {self.wall_seconds:.1f} s wall, "
                   f"{self.frames_per_cpu_second:.0f} frames/s per core")
    if self.annotations:
      lines.append(f"  annotations: {self.annotations}")
    if self.test_list:
      lines.append(f"  test list: {self.test_list}")
    lines += self._crops_text()
    if self.skipped:
      lines.append(f"Skipped ({len(self.skipped)}):")
      lines += [f"  {split}/{name}: {why}" for split, name, why in self.skipped]
    if self.repaired:
      lines.append(f"Repaired ({len(self.repaired)}):")
      lines += [f"  {name}: {why}" for name, why in self.repaired]
    return "\n".join(lines)

  def _crops_text(self) -> list[str]:
    """Which folder each video's crops came from: the largest folder by count, then every
    other folder (and 'detected', 'none') with the names of its videos."""
    by_folder: dict[str | None, list[str]] = {}
    for name, folder in sorted(self.crops_from.items()):
      by_folder.setdefault(folder, []).append(name)
    if not by_folder:
      return []
    lines = ["  crops:"]
    order = sorted(by_folder, key=lambda f: (not f, -len(by_folder[f]), f or ""))
    for i, folder in enumerate(order):
      names = by_folder[folder]
      where = (f"{folder}/" if folder else "no crops folder" if folder == "" else
               "faces detected")
      if i == 0 and folder and len(order) > 1:
        lines.append(f"    {where}: {len(names)} videos (every video not named below)")
      elif i == 0 and folder:
        lines.append(f"    {where}: all {len(names)} videos")
      else:
        lines.append(f"    {where}: {len(names)} videos: {', '.join(names)}")
    return lines


def process_media(jobs: Sequence[VideoJob], params: audio_features.FeatureParams,
                  out: str) -> list[VideoResult]:
  """Builds the videos of one media file (the unit of work of the pool): decoded once."""
  cache: dict = {}
  return [process_video(job, params, out, cache) for job in jobs]


def _run_jobs(jobs, params, out, workers, on_result):
  groups: dict[str, list[VideoJob]] = {}
  for job in jobs:
    groups.setdefault(job.media, []).append(job)
  if workers <= 1 or len(groups) <= 1:
    for group in groups.values():
      for result in process_media(group, params, str(out)):
        on_result(result)
    return
  # spawn: the caller may have started JAX or Grain threads, which fork would copy broken.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    futures = [pool.submit(process_media, group, params, str(out))
               for group in groups.values()]
    try:
      for future in concurrent.futures.as_completed(futures):
        for result in future.result():
          on_result(result)
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise


def _remove_stale_temporaries(out: pathlib.Path) -> None:
  """Deletes temporary files (``.<name>.<pid>.tmp``) a killed run left behind.

  One build per output directory at a time: a concurrent build's temporaries would go too.
  """
  for d in [out] + [out / s for s in constants.SPLITS]:
    if d.is_dir():
      for p in d.glob(".*.tmp"):
        p.unlink(missing_ok=True)


def build(root: str | os.PathLike | None, out: str | os.PathLike,
          splits: Sequence[str] = constants.SPLITS, workers: int = 1,
          params: audio_features.FeatureParams | None = None,
          test_list: str | os.PathLike | None = None,
          annotations: str | os.PathLike | None = None,
          log: Callable[[str], None] | None = print, *,
          manifest: str | os.PathLike | None = None, detect: bool = False,
          detect_every: int = 1) -> Summary:
  """Builds (or finishes) the prepared dataset in ``out`` from ``root`` or a ``manifest``.

  Args:
    root: the unpacked Aff-Wild2 release (batch*/, cropped_aligned*/, the annotations, the
      test list, at any depth; see `affwild2.scan_release`); None with a manifest.
    out: dataset directory to write.
    splits: splits to build, any of "train", "validation", "test".
    workers: worker processes (videos are the unit of work).
    params: log-mel parameters (defaults: `audio_features.FeatureParams()`).
    test_list: test names file; default: the one with a known name under root
      (`affwild2.TEST_LIST_NAMES`).
    annotations: the EXPR challenge folder; default: the one found under root.
    log: prints progress and warnings (None: silent).
    manifest: a CSV of labelled videos (`data_prep.manifest`) instead of ``root``; its faces
      are always detected.
    detect: with ``root``, detect, track and align the faces of names whose
      ``cropped_aligned`` folder is missing or incomplete (`MIN_CROP_COVERAGE`).
    detect_every: run the face detector every k-th frame (faster; see docs/faces.md).

  Returns:
    The `Summary` (also printed through ``log``).

  Raises:
    BuildError: wrong root or layout, an unreadable manifest, unknown split, or no usable
      video at all.
  """
  say = log or (lambda _: None)
  params = params or audio_features.FeatureParams()
  splits = list(dict.fromkeys(splits))
  unknown = [s for s in splits if s not in constants.SPLITS]
  if unknown or not splits:
    raise BuildError(f"unknown split(s) {unknown}; choose from {','.join(constants.SPLITS)}")
  if (root is None) == (manifest is None):
    raise BuildError("give exactly one of --root (an Aff-Wild2 layout) or --manifest (a CSV "
                     "of labelled videos)")
  if detect_every < 1:
    raise BuildError(f"--detect_every={detect_every}: must be at least 1")
  out = pathlib.Path(out)
  start = time.time()
  if manifest is not None:
    plan = plan_manifest(manifest, splits, detect_every)
    root = pathlib.Path(manifest).parent
  else:
    plan = plan_jobs(root, splits, test_list, annotations, detect, detect_every)
  for w in plan.warnings:
    say(f"warning: {w}")
  for _, _, why in plan.skipped:
    say(f"warning: {why}")
  summary = Summary(out=str(out), skipped=list(plan.skipped), annotations=plan.annotations,
                    test_list=plan.test_list)
  results: dict[tuple[str, str], VideoResult] = {}
  todo = []
  for job in plan.jobs:
    done = load_sidecar(out, job, params)
    if done is None:
      todo.append(job)
    else:
      results[(job.split, job.name)] = done
  _remove_stale_temporaries(out)
  if todo:
    # The dataset is about to change: it must stop looking complete until the end.
    for path in [out / store.METADATA] + [out / f"{s}.index.npz" for s in constants.SPLITS]:
      path.unlink(missing_ok=True)
  say(f"Preparing {len(plan.jobs)} videos from {root} into {out} "
      f"({len(plan.jobs) - len(todo)} already finished, {workers} worker(s))")

  decoded_media = set()

  def on_result(result: VideoResult) -> None:
    results[(result.split, result.name)] = result
    summary.cpu_seconds += result.cpu_seconds
    if result.entry is not None and result.entry["media"] not in decoded_media:
      decoded_media.add(result.entry["media"])   # a _left/_right pair decodes it once
      summary.decoded_frames += result.entry["num_frames"]
    status = ("skipped" if result.skipped else
              f"{result.entry['num_records']} records" +
              (f" ({', '.join(result.entry['flags'])})" if result.entry["flags"] else ""))
    say(f"[{len(results)}/{len(plan.jobs)}] {result.split}/{result.name}: {status}")
    for w in result.warnings:
      say(f"warning: {w}")
    if result.skipped:
      say(f"error: {result.skipped}")

  _run_jobs(todo, params, out, workers, on_result)

  meta = {"schema_version": records.SCHEMA_VERSION,
          "features": {**params.to_dict(), "face_size": FACE_SIZE},
          "splits": {}, "videos": {}}
  for split in splits:
    names, index = [], {"frame": [], "label": [], "has_face": [], "video_id": []}
    for job in (j for j in plan.jobs if j.split == split):
      result = results[(split, job.name)]
      (summary.resumed if result.resumed else summary.built).append(job.name)
      summary.repaired += [(job.name, w) for w in result.warnings]
      if result.skipped:
        summary.skipped.append((split, job.name, result.skipped))
        continue
      summary.shard_bytes += result.shard_bytes
      for key in ("frame", "label", "has_face"):
        index[key].append(np.asarray(result.index[key]))
      index["video_id"].append(np.full(len(result.index["frame"]), len(names), np.int32))
      names.append(job.name)
      meta["videos"][job.name] = result.entry
      crops = result.entry["crops"]
      summary.crops_from[job.name] = (
          None if "detected_faces" in result.entry["flags"] else
          str(pathlib.PurePosixPath(crops).parent) if crops else "")
    arrays = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in index.items()}
    label = arrays["label"].astype(np.int32)
    store.write_split_index(out, split, **arrays)
    counts = np.bincount(label[label >= 0], minlength=constants.NUM_CLASSES).tolist()
    meta["splits"][split] = {"videos": names, "num_records": int(label.size),
                             "class_counts": counts}
    summary.num_records[split] = int(label.size)
    summary.class_counts[split] = counts
  if not meta["videos"]:
    source = manifest if manifest is not None else root
    raise BuildError(f"no usable video in {source} for splits {','.join(splits)}; see the "
                     "errors above. Nothing was written.")
  files.atomic_write_json(out / store.METADATA, meta)
  summary.wall_seconds = time.time() - start
  say(summary.text())
  return summary


def _define_flags() -> None:
  # Defined only when run as a command: main.py and the TFDS builder import this module, and
  # their processes must not grow --root/--out flags.
  defaults = audio_features.FeatureParams()
  flags.DEFINE_string("root", None, "The unpacked Aff-Wild2 release: batch*/ and new_vids*/ "
                      "media, cropped_aligned*/ crops, the EXPR challenge folder and the test "
                      "list, found at any depth.")
  flags.DEFINE_string("manifest", None, "Instead of --root: a CSV of labelled videos (video, "
                      "label, person, split, name); see data_prep/README.md.")
  flags.DEFINE_bool("detect", False, "--root: detect, track and align the faces of names "
                    "whose cropped_aligned* folder is missing or incomplete (--manifest "
                    "always does).")
  flags.DEFINE_integer("detect_every", 1, "Run the face detector every k-th frame and follow "
                       "the faces in between (faster).", lower_bound=1)
  flags.DEFINE_string("out", None, "Dataset directory to write.", required=True)
  flags.DEFINE_list("splits", list(constants.SPLITS), "Splits to build.")
  flags.DEFINE_integer("workers", min(4, os.cpu_count() or 1), "Worker processes.")
  flags.DEFINE_string("test_list", None, "Test names file (default: the file under --root with "
                      "a known Expression test-list name, e.g. "
                      "Expression_Recognition_Challenge_test_set_release.txt).")
  flags.DEFINE_string("annotations", None, "The EXPR challenge folder (holding Train_Set/ and "
                      "Validation_Set/), when --root holds several (default: the one found).")
  flags.DEFINE_integer("sample_rate", defaults.sample_rate, "Audio sample rate (Hz).")
  flags.DEFINE_integer("n_fft", defaults.n_fft, "FFT size.")
  flags.DEFINE_integer("hop_length", defaults.hop_length, "Hop between mel columns (samples).")
  flags.DEFINE_integer("n_mels", defaults.n_mels, "Mel bins.")
  flags.DEFINE_float("fmin", defaults.fmin, "Lowest mel frequency (Hz).")
  flags.DEFINE_float("fmax", defaults.fmax, "Highest mel frequency (Hz).")
  flags.DEFINE_float("window_seconds", defaults.window_seconds,
                     "Audio window per frame (seconds, centred on the frame).")
  flags.DEFINE_float("top_db", defaults.top_db, "Dynamic range kept below the peak (dB).")
  flags.DEFINE_bool("quiet", False, "Print only warnings and the summary.")


def main() -> None:
  """``python -m data_prep.build``: see the module docstring and ``--help``."""
  f = flags.FLAGS
  try:
    params = audio_features.FeatureParams(
        sample_rate=f.sample_rate, n_fft=f.n_fft, hop_length=f.hop_length, n_mels=f.n_mels,
        fmin=f.fmin, fmax=f.fmax, window_seconds=f.window_seconds, top_db=f.top_db)
  except ValueError as e:
    raise errors.UsageError(str(e)) from e
  log = (lambda m: print(m) if not m.startswith("[") else None) if f.quiet else print  # noqa: E731
  if bool(f.root) == bool(f.manifest):
    raise errors.UsageError("give exactly one of --root (an Aff-Wild2 layout) or --manifest "
                            "(a CSV of labelled videos)")
  build(f.root, f.out, splits=[s.strip() for s in f.splits if s.strip()], workers=f.workers,
        params=params, test_list=f.test_list, annotations=f.annotations, log=log,
        manifest=f.manifest, detect=f.detect, detect_every=f.detect_every)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

"""A small prepared dataset, written through the real record/store contract, for fast tests.

`make_fake_dataset` writes real ArrayRecord shards (`records.encode_record` +
`store.write_shard`), the per-split index and ``metadata.json``, so everything downstream
(pipeline, trainer, tools) reads it exactly as it reads a built Aff-Wild2 set.

Content is learnable on purpose: each class has its own face colour and bright-block position
and its own bright mel band, plus noise, so a tiny model trained for a few steps beats chance.
Labels come in runs of consecutive frames, like real annotations.

Speed matters more than variety (training tests rebuild it often): every class has a small pool
of pre-encoded JPEG and mel variants, and frames pick from the pool, so ~2k records take well
under a second.
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping, Sequence

import cv2
import numpy as np

from mfer_jax import constants, files
from mfer_jax.data import records
from mfer_jax.data import store

AFFWILD2_CLASS_PROBS = constants.AFFWILD2_CLASS_PROBS   # the default imbalance

_VARIANTS = 6       # pre-encoded face / mel variants per class
_MEAN_RUN = 8       # mean length of a run of same-label frames
# Eight distinct cells of a 3x3 grid (the centre is left out): where each class's block sits.
_BLOCK_CELLS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))


def fake_features(n_mels: int = 64, window_frames: int = 100, face_size: int = 112) -> dict:
  """The ``features`` entry of metadata.json, with plausible values for a 16 kHz set."""
  return {"sample_rate": 16000, "n_fft": 1024, "hop_length": 320, "n_mels": n_mels,
          "window_seconds": 2.0, "window_frames": window_frames, "top_db": 80,
          "face_size": face_size}


def _face_pool(rng: np.random.Generator, face_size: int) -> list[list[bytes]]:
  """JPEG variants per class: a class colour, a class block position, and noise."""
  pool = []
  cell = face_size // 3
  for c in range(constants.NUM_CLASSES):
    hue = np.uint8(c * 180 // constants.NUM_CLASSES)
    base = cv2.cvtColor(np.full((1, 1, 3), (hue, 160, 150), np.uint8), cv2.COLOR_HSV2RGB)[0, 0]
    r, k = _BLOCK_CELLS[c]
    variants = []
    for _ in range(_VARIANTS):
      img = np.empty((face_size, face_size, 3), np.int16)
      img[:] = base
      img[r * cell:(r + 1) * cell, k * cell:(k + 1) * cell] = 240
      img += rng.integers(-25, 26, img.shape, dtype=np.int16)
      bgr = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
      ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
      assert ok
      variants.append(buf.tobytes())
    pool.append(variants)
  return pool


def _mel_pool(rng: np.random.Generator, mel_shape: tuple[int, int]) -> list[list[np.ndarray]]:
  """uint8 log-mel variants per class: a class band of loud bins over a quiet floor."""
  n_mels, t = mel_shape
  band = max(1, n_mels // constants.NUM_CLASSES)
  pool = []
  for c in range(constants.NUM_CLASSES):
    variants = []
    for _ in range(_VARIANTS):
      mel = rng.integers(20, 90, mel_shape).astype(np.uint8)
      lo = (c * band) % n_mels
      mel[lo:lo + band] = rng.integers(180, 255, (min(band, n_mels - lo), t))
      variants.append(mel)
    pool.append(variants)
  return pool


def _run_labels(rng: np.random.Generator, n: int, class_probs: np.ndarray) -> np.ndarray:
  """``n`` labels in runs of geometric length (mean `_MEAN_RUN`), run classes ~ class_probs."""
  lengths = rng.geometric(1.0 / _MEAN_RUN, size=n)   # n runs always cover n frames
  classes = rng.choice(len(class_probs), size=n, p=class_probs)
  return np.repeat(classes, lengths)[:n].astype(np.int32)


def make_fake_dataset(
    data_dir: str | os.PathLike,
    *,
    splits: Mapping[str, int] | Sequence[str] = ("train", "validation"),
    num_videos: int = 4,
    frames_per_video: int | tuple[int, int] = 100,
    class_probs: Sequence[float] = AFFWILD2_CLASS_PROBS,
    mel_shape: tuple[int, int] = (64, 100),
    face_size: int = 112,
    invalid_fraction: float = 0.0,
    no_face_fraction: float = 0.0,
    seed: int = 0,
) -> pathlib.Path:
  """Writes a prepared dataset that `store.load_split` reads like a built Aff-Wild2 set.

  Args:
    data_dir: output directory (created; existing files of the same names are replaced).
    splits: split names, or a mapping split -> number of videos. Splits named "test" are
      unlabeled (every label -1), like the real test set.
    num_videos: videos per split when ``splits`` is a sequence of names.
    frames_per_video: frames (= records) per video, or a (low, high) inclusive range to draw
      each video's length from.
    class_probs: probability of each of the 8 classes per label run (normalised here).
    mel_shape: (n_mels, T) of each record's uint8 log-mel window.
    face_size: side of the face crops.
    invalid_fraction: fraction of frames of labelled splits given label -1 (such frames are
      still written, as a builder that keeps unusable frames would).
    no_face_fraction: fraction of frames written without a face crop.
    seed: makes the whole dataset reproducible.

  Returns:
    ``data_dir`` as a path.
  """
  data_dir = pathlib.Path(data_dir)
  rng = np.random.default_rng(seed)
  probs = np.asarray(class_probs, np.float64)
  probs = probs / probs.sum()
  if isinstance(splits, Mapping):
    videos_per_split = dict(splits)
  else:
    videos_per_split = {s: num_videos for s in splits}
  faces = _face_pool(rng, face_size)
  mels = _mel_pool(rng, mel_shape)

  meta = {"schema_version": records.SCHEMA_VERSION,
          "features": fake_features(mel_shape[0], mel_shape[1], face_size),
          "splits": {}, "videos": {}}
  for split, n_videos in videos_per_split.items():
    labelled = split != "test"
    names, labels, frames, video_ids, has_faces = [], [], [], [], []
    for v in range(n_videos):
      # Every third video is a two-person side, as in Aff-Wild2's naming.
      name = f"fake-{split}-{v:03d}" + ("_left" if v % 3 == 2 else "")
      if isinstance(frames_per_video, int):
        n = frames_per_video
      else:
        n = int(rng.integers(frames_per_video[0], frames_per_video[1] + 1))
      content = _run_labels(rng, n, probs)   # what the face and audio show
      label = content.copy() if labelled else np.full(n, -1, np.int32)
      if labelled and invalid_fraction:
        label[rng.random(n) < invalid_fraction] = -1
      has_face = rng.random(n) >= no_face_fraction
      variant = rng.integers(0, _VARIANTS, size=(n, 2))
      encoded = [
          records.encode_record(records.FrameRecord(
              split=split, video=name, frame=i + 1, label=int(label[i]),
              face_jpeg=faces[content[i]][variant[i, 0]] if has_face[i] else b"",
              mel=mels[content[i]][variant[i, 1]]))
          for i in range(n)]
      store.write_shard(store.shard_path(data_dir, split, name), encoded)
      names.append(name)
      labels.append(label)
      frames.append(np.arange(1, n + 1, dtype=np.int32))
      video_ids.append(np.full(n, v, np.int32))
      has_faces.append(has_face)
      meta["videos"][name] = {
          "split": split, "fps": 30.0, "num_frames": n, "duration": n / 30.0,
          "sample_rate": 16000, "media": f"batch1/{name.removesuffix('_left')}.mp4",
          "flags": [], "num_records": n}
    label = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    store.write_split_index(
        data_dir, split, label=label,
        frame=np.concatenate(frames) if frames else np.zeros(0, np.int32),
        video_id=np.concatenate(video_ids) if video_ids else np.zeros(0, np.int32),
        has_face=np.concatenate(has_faces) if has_faces else np.zeros(0, bool))
    meta["splits"][split] = {
        "videos": names, "num_records": int(label.shape[0]),
        "class_counts": np.bincount(label[label >= 0], minlength=constants.NUM_CLASSES).tolist()}
  files.atomic_write_json(data_dir / store.METADATA, meta)
  return data_dir

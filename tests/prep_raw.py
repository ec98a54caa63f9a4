"""Small raw Aff-Wild2 trees written by hand, for the data_prep tests.

`make_raw_tree` writes real media (via `data_prep.media_write`), crops and annotation files in
the official layout, with knobs for each kind of bad input the builder must handle.
"""

from __future__ import annotations

import fractions
import pathlib
from typing import Sequence

import cv2
import numpy as np

from mfer_jax.data import affwild2
from data_prep import media_write

HEADER = ",".join(affwild2.HEADER)


def crop_jpeg(value: int, size: int = 112) -> bytes:
  img = np.full((size, size, 3), value % 256, np.uint8)
  ok, buf = cv2.imencode(".jpg", img)
  assert ok
  return buf.tobytes()


def write_media(path, num_frames: int, fps="30", sample_rate: int | None = 16000,
                audio: np.ndarray | None = None, size: int = 32, **kwargs) -> pathlib.Path:
  """A tiny video (grey frames) with optional audio (a quiet tone unless ``audio`` is given)."""
  rate = fractions.Fraction(fps)
  frames = np.full((num_frames, size, size, 3), 128, np.uint8)
  if sample_rate and audio is None:
    n = int(num_frames / rate * sample_rate)
    audio = 0.1 * np.sin(2 * np.pi * 440 * np.arange(n) / sample_rate).astype(np.float32)
  return media_write.write_video(path, frames, rate, audio if sample_rate else None,
                                 sample_rate or 16000, **kwargs)


def write_annotation(root, split: str, name: str, labels: Sequence[int | str],
                     header: str = HEADER,
                     challenge: str = "EXPR_Recognition_Challenge") -> pathlib.Path:
  path = (pathlib.Path(root) / "annotations" / challenge / affwild2.SPLIT_DIRS[split]
          / f"{name}.txt")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join([header] + [str(v) for v in labels]) + "\n")
  return path


def write_crops(root, name: str, frames: Sequence[int]) -> None:
  d = affwild2.crops_dir(root, name)
  d.mkdir(parents=True, exist_ok=True)
  for f in frames:
    (d / f"{f:05d}.jpg").write_bytes(crop_jpeg(f))


def write_test_list(root, names: Sequence[str]) -> pathlib.Path:
  path = pathlib.Path(root) / "test_set" / "EXPR_Recognition_Challenge_test_set_release.txt"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(f"{n}\n" for n in names))
  return path


def make_raw_tree(root, num_frames: int = 20) -> dict[str, np.ndarray]:
  """A clean tree: a train video, a two-person _left/_right pair, a validation and a test video.

  Returns:
    name -> labels written.
  """
  root = pathlib.Path(root)
  rng = np.random.default_rng(0)
  write_media(root / "batch1" / "solo.mp4", num_frames)
  write_media(root / "batch2" / "pair.avi", num_frames, fps="25", sample_rate=44100)
  write_media(root / "batch1" / "val.mp4", num_frames, fps="30000/1001", sample_rate=48000)
  write_media(root / "batch2" / "test1.mp4", num_frames, fps="10")
  labels = {}
  for split, name in (("train", "solo"), ("train", "pair_left"), ("train", "pair_right"),
                      ("validation", "val")):
    lab = rng.integers(-1, 8, num_frames)
    labels[name] = lab
    write_annotation(root, split, name, lab.tolist())
    write_crops(root, name, [f for f in range(1, num_frames + 1) if f % 4])
  write_crops(root, "test1", range(1, num_frames + 1, 2))
  write_test_list(root, ["test1"])
  return labels

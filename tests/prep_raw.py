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


# Where each part of a release unpacks, in the shapes seen in public ABAW code
# (data_prep/README.md, "Release layouts"). Paths are relative to the root; "decoys" are files
# and folders the builder must not take for the Expression ones.
RELEASE_SHAPES = {
    "abaw6": {
        "annotations": "6th_ABAW_Annotations/EXPR_Recognition_Challenge",
        "crops": ("cropped_aligned", "cropped_aligned_new_50_vids"),
        "media": ("batch1", "batch2", "new_vids"),
        "test_list": "test/names_of_videos_in_each_test_set/"
                     "Expression_Recognition_Challenge_test_set_release.txt",
        "decoys": ("test/names_of_videos_in_each_test_set/"
                   "Valence_Arousal_Estimation_Challenge_test_set_release.txt",
                   "test/names_of_videos_in_each_test_set/"
                   "Action_Unit_Detection_Challenge_test_set_release.txt",
                   "test/prediction_files_format/CVPR_6th_ABAW_Expr_test_set_sample.txt",
                   "6th_ABAW_Annotations/VA_Estimation_Challenge/Train_Set/a.txt"),
    },
    "abaw5": {
        "annotations": "5th_ABAW_Annotations/EXPR_Classification_Challenge",
        "crops": ("cropped_aligned_images/cropped_aligned",
                  "cropped_aligned_images/cropped_aligned_new_50_vids"),
        "media": ("videos/batch1", "videos/batch2", "videos/new_vids"),
        "test_list": "testset/EXPR_test_set_release.txt",
        "decoys": ("testset/AU_test_set_release.txt", "testset/VA_test_set_release.txt"),
    },
    "abaw3": {
        "annotations": "3rd ABAW Annotations/Third ABAW Annotations/"
                       "EXPR_Classification_Challenge",
        "crops": ("cropped_aligned/cropped_aligned",),   # the zip's folder inside its own name
        "media": ("batch1", "batch2"),
        "test_list": "CVPR_2022_3rd_ABAW_Competition _Test_Set_Release_&_Submission_"
                     "Instructions/Expression_Classification_Challenge_test_set_release.txt",
        "decoys": ("CVPR_2022_3rd_ABAW_Competition _Test_Set_Release_&_Submission_"
                   "Instructions/Multi_Task_Learning_Challenge_test_set_release.txt",
                   "3rd ABAW Annotations/Third ABAW Annotations/"
                   "Valence_Arousal_Estimation_Challenge_test_set_release.txt"),
    },
}


def make_release_tree(root, shape: str, num_frames: int = 6) -> dict[str, dict]:
  """A small release laid out as ``RELEASE_SHAPES[shape]``: a train video, a _left/_right pair,
  a validation and a test video, with crops spread over the shape's crop folders and media
  over its media folders.

  Returns:
    name -> {"split", "labels" (None for test), "crops" (crop folder relative to root)}.
  """
  root = pathlib.Path(root)
  spec = RELEASE_SHAPES[shape]
  crops, media = spec["crops"], spec["media"]
  rng = np.random.default_rng(len(shape))
  videos = {  # name -> (split, media stem, media folder, crops folder)
      "a": ("train", "a", media[0], crops[0]),
      "b_left": ("train", "b", media[1], crops[0]),
      "b_right": ("train", "b", media[1], crops[0]),
      "c": ("validation", "c", media[-1], crops[-1]),
      "d": ("test", "d", media[-1], crops[-1]),
  }
  out = {}
  for name, (split, stem, media_dir, crop_dir) in videos.items():
    path = root / media_dir / f"{stem}.mp4"
    if not path.exists():
      write_media(path, num_frames)
    labels = None
    if split != "test":
      labels = rng.integers(0, 8, num_frames)
      ann = root / spec["annotations"] / affwild2.SPLIT_DIRS[split] / f"{name}.txt"
      ann.parent.mkdir(parents=True, exist_ok=True)
      ann.write_text("\n".join([HEADER] + [str(v) for v in labels]) + "\n")
    folder = root / crop_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(1, num_frames + 1, 2):
      (folder / f"{f:05d}.jpg").write_bytes(crop_jpeg(f))
    out[name] = {"split": split, "labels": labels, "crops": f"{crop_dir}/{name}"}
  test_list = root / spec["test_list"]
  test_list.parent.mkdir(parents=True, exist_ok=True)
  test_list.write_text("d\n")
  for decoy in spec["decoys"]:
    path = root / decoy
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("valence,arousal\n0.1,0.2\n" if "VA_" in decoy else "a\nb_left\n")
  return out

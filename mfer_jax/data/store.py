"""The prepared-dataset directory: shards, per-split index and metadata.

Layout written by ``python -m data_prep.build`` and read by the pipeline and the tools::

    DATA_DIR/
      metadata.json                   schema version, feature parameters, counts, per-video info
      <split>/<video>.array_record    one shard per annotation file, one record per frame
      <split>.index.npz               per-record label, frame, video id, has_face

``metadata.json`` keys (all written by the builder)::

    schema_version   int, = records.SCHEMA_VERSION
    features         dict of audio/face parameters (sample_rate, n_fft, hop_length, n_mels,
                     window_seconds, window_frames, top_db, face_size, ...)
    splits           {split: {"videos": [name, ...], "num_records": int,
                              "class_counts": [8 ints]}}; the record order of a split is its
                     videos' shards concatenated in this order
    videos           {name: {"split", "fps", "num_frames", "duration", "sample_rate",
                             "media", "flags": [..], "num_records"}}

The index arrays let the sampler weight and stratify frames without reading any record.
Every file here is written under a temporary name and renamed when complete, so an interrupted
build never leaves a file that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterable

import numpy as np

from mfer_jax import errors, files
from mfer_jax.data import records

METADATA = "metadata.json"


class DatasetError(errors.UserError, FileNotFoundError):
  """The prepared dataset is missing or inconsistent; the message says how to fix it."""


def shard_path(data_dir: str | os.PathLike, split: str, video: str) -> pathlib.Path:
  return pathlib.Path(data_dir) / split / f"{video}.array_record"


def write_shard(path: str | os.PathLike, encoded_records: Iterable[bytes]) -> int:
  """Writes encoded records to an ArrayRecord shard atomically; returns the record count.

  ``group_size:1`` keeps random access (the sampler reads single frames) cheap.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = files.temporary_name(path)
  writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
  n = 0
  try:
    for rec in encoded_records:
      writer.write(rec)
      n += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  return n


@dataclasses.dataclass(frozen=True)
class SplitIndex:
  """What the pipeline needs to know about one split without reading records: the prepared
  implementation of `mfer_jax.data.sources.SplitSource`, read by `reader.SplitReader`.

  Attributes:
    split: the split name.
    paths: shard paths, in record order.
    videos: video (annotation) names, aligned with ``paths``.
    label: int32 [N] per-record label (-1 in unlabeled splits).
    frame: int32 [N] per-record 1-based frame number.
    video_id: int32 [N] index into ``videos``.
    has_face: bool [N].
    metadata: the whole metadata.json dict.
  """

  split: str
  paths: tuple[str, ...]
  videos: tuple[str, ...]
  label: np.ndarray
  frame: np.ndarray
  video_id: np.ndarray
  has_face: np.ndarray
  metadata: dict[str, Any]

  def __len__(self) -> int:
    return int(self.label.shape[0])

  @property
  def features(self) -> dict[str, Any]:
    return self.metadata["features"]

  def open_reader(self, face_size: int):
    """A `reader.SplitReader` of this split's shards (checks every shard's record count)."""
    # Imported here: the reader pulls in Grain, which data_prep's workers never need (and it
    # imports this module).
    from mfer_jax.data import reader  # pylint: disable=g-import-not-at-top
    return reader.SplitReader(self, face_size)


def write_split_index(data_dir: str | os.PathLike, split: str, *, label, frame, video_id,
                      has_face) -> None:
  """Writes ``<split>.index.npz`` atomically (plain arrays; read with allow_pickle=False)."""
  path = pathlib.Path(data_dir) / f"{split}.index.npz"
  tmp = files.temporary_name(path)
  with open(tmp, "wb") as f:
    np.savez(f, label=np.asarray(label, np.int32), frame=np.asarray(frame, np.int32),
             video_id=np.asarray(video_id, np.int32), has_face=np.asarray(has_face, bool))
  os.replace(tmp, path)


def load_metadata(data_dir: str | os.PathLike) -> dict[str, Any]:
  """Reads metadata.json, with an error that says how to create it."""
  path = pathlib.Path(data_dir) / METADATA
  if not path.is_file():
    raise DatasetError(
        f"{path} not found: {data_dir} is not a prepared dataset. Prepare Aff-Wild2 with "
        f"`python -m data_prep.build --root=AFFWILD2_DIR --out={data_dir}`, or run "
        "`python main.py --config=configs/demo.py`, which makes a synthetic set itself.")
  meta = json.loads(path.read_text())
  if meta.get("schema_version") != records.SCHEMA_VERSION:
    raise DatasetError(
        f"{path}: schema_version {meta.get('schema_version')} but this code reads "
        f"{records.SCHEMA_VERSION}; rebuild with `python -m data_prep.build`.")
  return meta


def load_split(data_dir: str | os.PathLike, split: str) -> SplitIndex:
  """Loads the index of one split and checks that its shards exist.

  Raises:
    DatasetError: if the dataset, the split or a shard is missing, or counts disagree.
  """
  meta = load_metadata(data_dir)
  if split not in meta["splits"]:
    raise DatasetError(f"{data_dir}/{METADATA} has no split {split!r} "
                       f"(it has {sorted(meta['splits'])}); build it with --splits {split}")
  videos = tuple(meta["splits"][split]["videos"])
  paths = tuple(str(shard_path(data_dir, split, v)) for v in videos)
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise DatasetError(f"{len(missing)} shard(s) of split {split!r} are missing, first: "
                       f"{missing[0]}; re-run `python -m data_prep.build` to finish the build")
  index_path = pathlib.Path(data_dir) / f"{split}.index.npz"
  if not index_path.is_file():
    raise DatasetError(f"{index_path} not found; re-run `python -m data_prep.build`")
  with np.load(index_path, allow_pickle=False) as z:
    arrays = {k: z[k] for k in ("label", "frame", "video_id", "has_face")}
  n = int(meta["splits"][split]["num_records"])
  if arrays["label"].shape[0] != n:
    raise DatasetError(f"{index_path} has {arrays['label'].shape[0]} entries but "
                       f"{METADATA} says {n}; the build was interrupted, re-run it")
  return SplitIndex(split=split, paths=paths, videos=videos, metadata=meta, **arrays)

"""Where a split's records come from: a prepared directory, or a TFDS-built dataset.

A split source gives what the sampler and the evaluator need without reading a record (the
index arrays), the dataset's metadata, and random access to decoded records::

    source = sources.load_split(config.data, "train")
    source.label, source.frame, source.video_id, source.has_face    # [N] arrays
    source.videos, source.metadata, source.features, len(source)
    reader = source.open_reader(face_size)     # reader[i] -> records.decode_record dict

Record order, the contract every source keeps (the sampler, eval and temporal code rely on it):
the videos of ``source.videos`` one after another, frames ascending within a video, and
``video_id[i]`` indexes ``source.videos``. ``config.data.source`` picks the implementation:

* ``prepared``: `store.SplitIndex` (``<split>.index.npz`` and ``metadata.json`` of
  ``data.data_dir``, written by ``python -m data_prep.build``), read by `reader.SplitReader`
  from the ArrayRecord shards.
* ``tfds``: `tfds_source.TfdsSplit` (``data.tfds_name`` in ``data.tfds_data_dir``, written by
  ``python -m data_prep.tfds_affwild2``): the index from the examples' TFDS features, the
  metadata from ``builder.info.metadata``, records through ``tfds.data_source``.

Both sources of one set of raw videos hold the same records in the same order, so a seed gives
the same epochs and batches from either.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import ml_collections
import numpy as np

from mfer_jax import constants, errors
from mfer_jax.data import store

SOURCES = constants.DATA_SOURCES


class RecordReader(Protocol):
  """Random access to a split's decoded records; picklable into Grain worker processes."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, i: int) -> dict[str, Any]:
    """`records.decode_record` of record ``i`` (in the source's record order)."""
    ...


class SplitSource(Protocol):
  """One split: index arrays, metadata and a reader of its records (see the module doc).

  Attributes:
    split: the split name.
    videos: video (annotation) names, in record order.
    label, frame, video_id: int32 [N]: per-record label (-1 in unlabeled splits), 1-based
      frame number, index into ``videos``.
    has_face: bool [N].
    metadata: the dataset's metadata (``metadata.json``'s keys: schema_version, features,
      splits, videos).
  """

  split: str
  videos: tuple[str, ...]
  label: np.ndarray
  frame: np.ndarray
  video_id: np.ndarray
  has_face: np.ndarray
  metadata: dict[str, Any]

  def __len__(self) -> int:
    ...

  @property
  def features(self) -> dict[str, Any]:
    """The audio/face feature parameters the records were built with."""
    ...

  def open_reader(self, face_size: int) -> RecordReader:
    """A reader of this split's records, decoding faces at ``face_size``."""
    ...


def _check(cfg: ml_collections.ConfigDict) -> str:
  if cfg.source not in SOURCES:
    raise errors.UsageError(f"data.source={cfg.source!r}: choose one of {', '.join(SOURCES)}")
  return cfg.source


def tfds_data_dir(cfg: ml_collections.ConfigDict) -> str | None:
  """``data.tfds_data_dir`` with ``~`` expanded; None for TFDS's default data dir."""
  return os.path.expanduser(cfg.tfds_data_dir) if cfg.tfds_data_dir else None


def load_split(cfg: ml_collections.ConfigDict, split: str) -> SplitSource:
  """The split ``split`` of the dataset ``config.data`` names.

  Args:
    cfg: ``config.data`` (keys ``source``, ``data_dir``, ``tfds_name``, ``tfds_data_dir``).
    split: "train", "validation" or "test".

  Raises:
    errors.UsageError: an unknown ``data.source``.
    store.DatasetError: the dataset or the split is missing or inconsistent.
  """
  if _check(cfg) == "prepared":
    return store.load_split(cfg.data_dir, split)
  # Imported here: TFDS's import is slow and the prepared route never needs it.
  from mfer_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  return tfds_source.load_split(cfg.tfds_name, tfds_data_dir(cfg), split)


def load_metadata(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The metadata of the dataset ``config.data`` names (``metadata.json``'s keys)."""
  if _check(cfg) == "prepared":
    return store.load_metadata(cfg.data_dir)
  from mfer_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  return tfds_source.load_metadata(cfg.tfds_name, tfds_data_dir(cfg))

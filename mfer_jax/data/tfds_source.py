"""A TFDS-built Aff-Wild2 dataset (``python -m data_prep.tfds_affwild2``) as a split source.

``tfds.builder(name, data_dir=...)`` opens the dataset from its files (TFDS's read-only
builder), so training needs neither the builder class nor data_prep. The pieces of a
`sources.SplitSource`:

* **index**: each example's ``video``, ``frame``, ``label`` and ``has_face`` TFDS features;
* **metadata**: ``builder.info.metadata`` (``metadata.json``'s keys; data_prep writes them);
* **records**: ``tfds.data_source(name, split=...)``, each example's ``record`` decoded by
  `records.decode_record`.

Both the index scan and the reader take the features they need straight from the serialized
``tf.Example`` (TFDS's own proto, what its TensorFlow-free parser reads) instead of TFDS's
generic decoding of every feature into numpy: the scan runs 3-4x faster
(``python -m bench.prep --route=tfds``), and the training pipeline reads TFDS as fast as the
prepared shards (``python -m bench.pipeline --source=tfds``; TFDS's decoding cost ~1.4x the
CPU per example).

TFDS stores examples in the order of a hash of their keys. The source presents them in the
prepared dataset's record order (videos in ``metadata.splits[split].videos`` order, frames
ascending) through a permutation, so both sources give the same epochs for a seed, and temporal
code finds a video's frames side by side.

Taking the index from the features means reading every example of the split once (each
carries its face JPEG and mel, about 10 kB). The result is cached beside the dataset as
``mfer_jax.<split>.index.npz``, checked against the split's shard files (names, sizes, mtimes)
on every load; a read-only dataset folder is scanned on every load instead (with a warning).
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from mfer_jax import console, constants, errors, files
from mfer_jax.data import records
from mfer_jax.data import store

_SCAN_CHUNK = 2048   # examples read per batch while scanning (about 20 MB)
_CACHE_VERSION = 1


def _rebuild(name: str) -> str:
  return (f"rebuild the TFDS dataset ({name}) with `python -m data_prep.tfds_affwild2 "
          "--manual_dir=AFFWILD2_DIR --data_dir=DIR`")


class TfdsReadError(errors.UserError, RuntimeError):
  """An example that cannot be read or disagrees with the index; names the dataset."""


def _builder(name: str, data_dir: str | None):
  try:
    return tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as e:
    where = data_dir or "TFDS's default data dir (~/tensorflow_datasets)"
    raise store.DatasetError(
        f"no TFDS dataset {name!r} in {where} ({type(e).__name__}); build it with `python -m "
        f"data_prep.tfds_affwild2 --manual_dir=AFFWILD2_DIR --data_dir={data_dir or 'DIR'}` "
        "and set data.tfds_data_dir, or use data.source=prepared") from None


def _metadata(builder) -> dict[str, Any]:
  meta = json.loads(json.dumps(dict(builder.info.metadata or {})))   # plain, JSON-able
  if meta.get("schema_version") != records.SCHEMA_VERSION or "features" not in meta:
    raise store.DatasetError(
        f"TFDS dataset {builder.info.full_name} in {builder.data_dir}: metadata schema_version "
        f"{meta.get('schema_version')} (this code reads {records.SCHEMA_VERSION}) or no "
        f"features; {_rebuild(builder.name)}")
  meta.setdefault("splits", {})
  meta.setdefault("videos", {})
  return meta


def load_metadata(name: str = constants.TFDS_NAME, data_dir: str | None = None) -> dict:
  """``builder.info.metadata`` of a TFDS dataset, checked like ``metadata.json``."""
  return _metadata(_builder(name, data_dir))


def _features(raw: bytes):
  """The feature map of one serialized TFDS example (a ``tf.Example``)."""
  return tf_example_pb2.Example.FromString(raw).features.feature


def _parse_index_features(raw: bytes) -> tuple[str, int, int, bool]:
  feature = _features(raw)
  return (feature["video"].bytes_list.value[0].decode("utf-8"),
          feature["frame"].int64_list.value[0], feature["label"].int64_list.value[0],
          bool(feature["has_face"].int64_list.value[0]))


def scan_features(source) -> dict[str, np.ndarray]:
  """The index features of every example of a TFDS ArrayRecord data source, in TFDS order.

  Returns:
    {"video": str array, "frame", "label": int32, "has_face": bool}, one entry per example.
  """
  raw_source = source.data_source   # the ArrayRecord reader under TFDS's decoding
  n = len(source)
  video, frame, label, has_face = [], np.empty(n, np.int32), np.empty(n, np.int32), \
      np.empty(n, bool)
  for start in range(0, n, _SCAN_CHUNK):
    keys = list(range(start, min(n, start + _SCAN_CHUNK)))
    for i, raw in zip(keys, raw_source.__getitems__(keys)):
      v, frame[i], label[i], has_face[i] = _parse_index_features(raw)
      video.append(v)
  return {"video": np.asarray(video, dtype=str), "frame": frame, "label": label,
          "has_face": has_face}


def _fingerprint(builder, split: str) -> str:
  """Names, sizes and mtimes of the split's shard files: a rebuilt split invalidates the cache."""
  shards = []
  for path in builder.info.splits[split].filepaths:
    st = os.stat(os.fspath(path))
    shards.append([pathlib.Path(os.fspath(path)).name, st.st_size, st.st_mtime_ns])
  return json.dumps({"version": _CACHE_VERSION, "split": split, "shards": shards})


def split_fingerprint(name: str, data_dir: str | None, split: str) -> str:
  """The shard files' names, sizes and mtimes of one split: changes when it is rebuilt."""
  return _fingerprint(_builder(name, data_dir), split)


def _cache_path(builder, split: str) -> pathlib.Path:
  return pathlib.Path(os.fspath(builder.data_dir)) / f"mfer_jax.{split}.index.npz"


def _load_cache(path: pathlib.Path, fingerprint: str) -> dict[str, np.ndarray] | None:
  try:
    with np.load(path, allow_pickle=False) as z:
      if str(z["fingerprint"]) != fingerprint:
        return None
      return {k: z[k] for k in ("videos", "label", "frame", "video_id", "has_face", "order")}
  except (OSError, KeyError, ValueError):
    return None   # missing, partial or from another version: scan again


def _save_cache(path: pathlib.Path, arrays: dict[str, np.ndarray], fingerprint: str) -> None:
  tmp = files.temporary_name(path)
  try:
    with open(tmp, "wb") as f:
      np.savez(f, fingerprint=np.asarray(fingerprint), **arrays)
    os.replace(tmp, path)
  except OSError as e:
    console.say(f"warning: cannot cache the TFDS index in {path} ({e}); the next run reads "
                "every example again")
  finally:
    tmp.unlink(missing_ok=True)


def _index(scanned: dict[str, np.ndarray], video_order: list[str] | None,
           where: str) -> dict[str, np.ndarray]:
  """Index arrays in record order (videos in ``video_order``, frames ascending) and ``order``,
  the TFDS example index of each record."""
  names = np.unique(scanned["video"])
  videos = list(video_order) if video_order is not None else sorted(names.tolist())
  rank = {v: i for i, v in enumerate(videos)}
  unknown = sorted(set(names.tolist()) - set(rank))
  if unknown:
    raise store.DatasetError(f"{where}: examples of {unknown[:3]} are not in the metadata's "
                             "video list; the dataset is inconsistent")
  video_id = np.fromiter((rank[v] for v in scanned["video"].tolist()), np.int32,
                         count=scanned["video"].size)
  order = np.lexsort((scanned["frame"], video_id))
  same = ((video_id[order][1:] == video_id[order][:-1])
          & (scanned["frame"][order][1:] == scanned["frame"][order][:-1]))
  if same.any():
    j = int(order[int(np.flatnonzero(same)[0])])
    raise store.DatasetError(f"{where}: two examples for frame {scanned['frame'][j]} of "
                             f"{scanned['video'][j]}; the dataset is inconsistent")
  return {"videos": np.asarray(videos, dtype=str), "label": scanned["label"][order],
          "frame": scanned["frame"][order], "video_id": video_id[order],
          "has_face": scanned["has_face"][order], "order": order.astype(np.int64)}


class TfdsReader:
  """Record ``i`` (record order) of a TFDS split: example ``order[i]``, decoded.

  Picklable into Grain worker processes (TFDS's data source reopens its files there).
  """

  def __init__(self, split_source: "TfdsSplit", face_size: int):
    self.split = split_source.split
    self.face_size = int(face_size)
    self._name = split_source.name
    # The serialized examples under TFDS's data source (see the module docstring).
    self._source = tfds.data_source(split_source.name, split=split_source.split,
                                    data_dir=split_source.data_dir).data_source
    self._order = split_source.order
    self._label = split_source.label
    self._frame = split_source.frame

  def __len__(self) -> int:
    return int(self._order.shape[0])

  def __getitem__(self, i: int) -> dict[str, Any]:
    """`records.decode_record` of record ``i``.

    Raises:
      TfdsReadError: the example cannot be read or decoded, or disagrees with the index.
    """
    i = int(i)
    j = int(self._order[i])
    try:
      raw = _features(self._source[j])["record"].bytes_list.value[0]
      example = records.decode_record(raw, self.face_size)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise TfdsReadError(f"cannot read example {j} of TFDS {self._name} split {self.split!r} "
                          f"(record {i}): {type(e).__name__}: {e}; {_rebuild(self._name)}") from e
    if example["frame"] != self._frame[i] or example["label"] != self._label[i]:
      raise TfdsReadError(
          f"example {j} of TFDS {self._name} split {self.split!r} is frame {example['frame']} "
          f"label {example['label']} but its index features say frame {self._frame[i]} label "
          f"{self._label[i]}; {_rebuild(self._name)}")
    return example


class TfdsSplit:
  """One split of a TFDS-built dataset: a `sources.SplitSource` (see the module docstring).

  Attributes:
    name: the TFDS dataset name (``data.tfds_name``); data_dir: its data dir (None: TFDS's).
    split, videos, label, frame, video_id, has_face, metadata: as `sources.SplitSource`.
    order: int64 [N], the TFDS example index of each record.
  """

  def __init__(self, name: str, data_dir: str | None, split: str, metadata: dict[str, Any],
               index: dict[str, np.ndarray]):
    self.name, self.data_dir, self.split, self.metadata = name, data_dir, split, metadata
    self.videos = tuple(index["videos"].tolist())
    self.label = index["label"].astype(np.int32)
    self.frame = index["frame"].astype(np.int32)
    self.video_id = index["video_id"].astype(np.int32)
    self.has_face = index["has_face"].astype(bool)
    self.order = index["order"].astype(np.int64)

  def __len__(self) -> int:
    return int(self.label.shape[0])

  @property
  def features(self) -> dict[str, Any]:
    return self.metadata["features"]

  def open_reader(self, face_size: int) -> TfdsReader:
    return TfdsReader(self, face_size)


def load_split(name: str = constants.TFDS_NAME, data_dir: str | None = None,
               split: str = "train") -> TfdsSplit:
  """Opens ``split`` of a TFDS dataset: metadata, index (cached, or scanned) and order.

  Raises:
    store.DatasetError: the dataset or split is missing, or its metadata or examples are
      inconsistent.
  """
  builder = _builder(name, data_dir)
  meta = _metadata(builder)
  where = f"TFDS {builder.info.full_name} split {split!r} in {builder.data_dir}"
  if split not in builder.info.splits:
    raise store.DatasetError(f"TFDS dataset {builder.info.full_name} in {builder.data_dir} has "
                             f"no split {split!r} (it has {sorted(builder.info.splits)}); "
                             f"{_rebuild(name)}")
  fingerprint = _fingerprint(builder, split)
  cache = _cache_path(builder, split)
  index = _load_cache(cache, fingerprint)
  if index is None:
    n = builder.info.splits[split].num_examples
    console.say(f"Reading the index features of the {n} examples of {where} (once: cached in "
                f"{cache.name})...")
    start = time.monotonic()
    scanned = scan_features(tfds.data_source(name, split=split, data_dir=data_dir))
    order = meta["splits"].get(split, {}).get("videos")
    index = _index(scanned, order, where)
    console.say(f"  {n} examples in {time.monotonic() - start:.0f} s")
    _save_cache(cache, index, fingerprint)
  labels = index["label"]
  entry = meta["splits"].setdefault(split, {})
  entry.setdefault("videos", index["videos"].tolist())
  entry.setdefault("num_records", int(labels.size))
  entry.setdefault("class_counts", np.bincount(labels[labels >= 0], minlength=
                                               constants.NUM_CLASSES).tolist())
  if entry["num_records"] != labels.size or list(entry["videos"]) != index["videos"].tolist():
    raise store.DatasetError(f"{where}: the metadata says {entry['num_records']} records of "
                             f"{len(entry['videos'])} videos, the examples hold {labels.size} of "
                             f"{len(index['videos'])}; {_rebuild(name)}")
  return TfdsSplit(name, data_dir, split, meta, index)

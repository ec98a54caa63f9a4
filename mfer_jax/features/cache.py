"""The feature cache on disk: layout, what made it, and random access for the pipeline.

Layout written by ``python -m mfer_jax.tools.extract`` (`mfer_jax.features.extract`)::

    FEATURES/
      metadata.json                written last: the cache is complete when it exists
      <split>/<video>.image.npy    [n, C_image] pooled image-encoder features, one row per
                                   record of the video in the prepared split (record order)
      <split>/<video>.audio.npy    [n, C_audio] audio-encoder features, same rows
      <split>/<video>.frame.npy    int32 [n]: the records' 1-based frame numbers
      <split>/<video>.done.json    sidecar: the video is finished (what made it, its inputs)

Arrays are float16, or bfloat16 stored as its uint16 bit pattern (``.npy`` has no bfloat16);
``metadata.json`` says which. They are opened memory-mapped, so a cache larger than memory
trains at the speed of its disk.

``metadata.json``::

    format, version     "mfer_jax.features", 1
    spec                what the features depend on: both encoders' architectures, the
                        feature parameters (config.features except batch_size), the face
                        size and log-mel parameters of the prepared data, the seed of
                        randomly initialised encoders
    spec_hash           SHA-256 of the canonical JSON of spec
    weights             {"image": sha256, "audio": sha256} of the init files ('' = random)
    init_files          {"image": path, "audio": path} as given at extraction
    dims, dtype         feature widths and storage dtype
    data_dir            the dataset the rows follow (a prepared dir, or tfds:NAME@DIR)
    splits              {split: {"videos": [...], "num_records": n}}
    warnings            media whose audio could not be decoded (silent features)

Training checks that the cache was made with the spec and weights its config names
(`check_config`) and that each video's rows are the records of the prepared split
(`FeatureReader`); either mismatch is refused with the two hashes, or the video, and the
command that rebuilds the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import ml_dtypes
import numpy as np
from ml_collections import ConfigDict

from mfer_jax import errors
from mfer_jax.data import sources
from mfer_jax.models import encoders
from mfer_jax.models import model as model_lib

FORMAT = "mfer_jax.features"
VERSION = 1
METADATA = "metadata.json"
DTYPES = ("float16", "bfloat16")
MODALITIES = ("image", "audio")
_REBUILD = ("re-run `python -m mfer_jax.tools.extract --config=... --data_dir=... "
            "--out=FEATURES` with this config")


class FeatureCacheError(errors.UserError, ValueError):
  """A feature cache that is missing, incomplete, or made with other encoders or data."""


# ----------------------------------------------------------------------------- paths


def array_path(root, split: str, video: str, kind: str) -> pathlib.Path:
  """``root/<split>/<video>.<kind>.npy`` (kind: image, audio or frame)."""
  return pathlib.Path(root) / split / f"{video}.{kind}.npy"


def sidecar_path(root, split: str, video: str) -> pathlib.Path:
  return pathlib.Path(root) / split / f"{video}.done.json"


# ----------------------------------------------------------------------------- spec


def spec(config: ConfigDict, data_features: dict[str, Any]) -> dict[str, Any]:
  """What cached features depend on, from a config and the prepared data's ``features``.

  Args:
    config: the whole config (model.image / model.audio encoders, features, seed).
    data_features: ``metadata.json["features"]`` of the prepared data (face size, mel
      parameters).
  """
  feat = {k: v for k, v in config.features.to_dict().items() if k != "batch_size"}
  if feat.get("dtype") not in DTYPES:
    raise FeatureCacheError(f"features.dtype={feat.get('dtype')!r}: choose one of "
                            f"{', '.join(DTYPES)}")
  image = model_lib.image_arch(config.model)
  audio = model_lib.audio_arch(config.model)
  # Stochastic depth is off in the frozen encoders: its rate does not change the features.
  arch = {k: {n: v for n, v in encoders.describe(a).items() if n != "drop_path_rate"}
          for k, a in (("image", image), ("audio", audio))}
  out = {"image": arch["image"], "audio": arch["audio"],
         "features": feat, "face_size": int(config.data.face_size),
         "compute_dtype": config.model.precision.compute_dtype}
  if not isinstance(audio, encoders.wav2vec2.Wav2Vec2Config):
    out["mel"] = {k: v for k, v in data_features.items() if k != "face_size"}
  if not config.model.image.init_file or not config.model.audio.init_file:
    out["seed"] = int(config.seed)
  return json.loads(json.dumps(out, sort_keys=True))


def spec_hash(s: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()


def weights(config: ConfigDict) -> dict[str, str]:
  """SHA-256 of the init files the config names, per modality ('' for none)."""
  out = {}
  for kind in MODALITIES:
    path = config.model[kind].init_file
    if path and not os.path.isfile(path):
      raise FeatureCacheError(f"model.{kind}.init_file={path}: no such file; the feature cache "
                              "is checked against the weights the config names")
    out[kind] = encoders.weights_hash(path)
  return out


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  """Dotted keys where two JSON trees differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [prefix.rstrip(".")]


# ----------------------------------------------------------------------------- reading


def load_metadata(root) -> dict[str, Any]:
  path = pathlib.Path(root) / METADATA
  if not path.is_file():
    raise FeatureCacheError(
        f"{path} not found: {root} is not a finished feature cache (an interrupted extraction "
        f"resumes when rerun); {_REBUILD}")
  meta = json.loads(path.read_text())
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise FeatureCacheError(f"{path}: not a version-{VERSION} mfer-jax feature cache; "
                            f"{_REBUILD}")
  return meta


def check_config(config: ConfigDict, splits: tuple[str, ...] = ()) -> dict[str, Any]:
  """Refuses a cache made with other encoders, weights or feature parameters than ``config``,
  or one that lacks a split the run reads.

  Args:
    config: the run's config (``data.features_dir`` names the cache).
    splits: the splits the run reads (train and its evaluators'), each of which the cache
      must hold.

  Returns:
    The cache's metadata.

  Raises:
    FeatureCacheError: naming both hashes (and the differing keys of the spec), or the
      missing split and the splits the cache holds.
  """
  root = config.data.features_dir
  meta = load_metadata(root)
  missing = [s for s in dict.fromkeys(splits) if s not in meta["splits"]]
  if missing:
    raise FeatureCacheError(
        f"{root} has no features of split {missing[0]!r} (it holds "
        f"{', '.join(sorted(meta['splits'])) or 'none'}), which this run reads; re-run `python "
        f"-m mfer_jax.tools.extract` with --splits={','.join(dict.fromkeys(splits))}")
  want = spec(config, sources.load_metadata(config.data)["features"])
  if meta["spec_hash"] != spec_hash(want):
    keys = ", ".join(_diff(meta["spec"], want)[:6])
    raise FeatureCacheError(
        f"{root} was made with other encoders or feature parameters than the config names "
        f"(cache spec {meta['spec_hash'][:12]}, config spec {spec_hash(want)[:12]}; differing "
        f"keys: {keys}); {_REBUILD}, or point data.features_dir at the matching cache")
  have = weights(config)
  for kind in MODALITIES:
    if meta["weights"][kind] != have[kind]:
      raise FeatureCacheError(
          f"{root} holds {kind} features of weights sha256 {meta['weights'][kind][:12] or '(random init)'} "
          f"but model.{kind}.init_file={config.model[kind].init_file or repr('')} has sha256 "
          f"{have[kind][:12] or '(random init)'}; {_REBUILD}")
  return meta


def _to_float32(a: np.ndarray, dtype: str) -> np.ndarray:
  if dtype == "bfloat16":
    return np.asarray(a).view(ml_dtypes.bfloat16).astype(np.float32)
  return np.asarray(a, np.float32)


def to_storage(a: np.ndarray, dtype: str) -> np.ndarray:
  """float32 features -> the cache's storage array (float16, or bfloat16 bits as uint16)."""
  if dtype == "bfloat16":
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
  return np.asarray(a, np.float32).astype(np.float16)


def read_video(root, split: str, video: str, dtype: str) -> dict[str, np.ndarray]:
  """One video's features as float32 (image, audio) and its frame numbers."""
  out = {k: _to_float32(np.load(array_path(root, split, video, k)), dtype) for k in MODALITIES}
  out["frame"] = np.load(array_path(root, split, video, "frame"))
  return out


class FeatureReader:
  """Record ``i`` of a split as the pipeline's example, from the cached features.

  Returns the same keys as `mfer_jax.data.reader.SplitReader`, with ``face`` and ``mel``
  holding the float32 image and audio features [C]: a `sources.RecordReader` in the split's
  record order, so the pipeline's frames, clips and windows (`pipeline.read_clip`) read it as
  they read the records. Construction checks that the cache holds every video of the split
  index with exactly its records (frame numbers); arrays are opened memory-mapped on first
  use in each process (Grain workers included).
  """

  def __init__(self, index: sources.SplitSource, root: str | os.PathLike):
    self.split = index.split
    self.root = str(root)
    meta = load_metadata(root)
    self._dtype = meta["dtype"]
    self._videos = tuple(index.videos)
    counts = np.bincount(index.video_id, minlength=len(self._videos))
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self._video_id = np.asarray(index.video_id)
    self._label = np.asarray(index.label)
    self._frame = np.asarray(index.frame)
    self._has_face = np.asarray(index.has_face)
    for v, name in enumerate(self._videos):
      path = array_path(root, self.split, name, "frame")
      if not path.is_file():
        raise FeatureCacheError(f"{path} not found: the cache has no features for "
                                f"{self.split}/{name}; {_REBUILD}")
      frames = np.load(path)
      want = self._frame[self._starts[v]:self._starts[v + 1]]
      if frames.shape != want.shape or not np.array_equal(frames, want):
        raise FeatureCacheError(
            f"{path}: the cached rows of {self.split}/{name} are not the records of the "
            f"prepared split ({frames.size} cached, {want.size} records): the cache was made "
            f"from another build of the data; {_REBUILD}")
    self._arrays: dict[tuple[int, str], np.ndarray] | None = None

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_arrays"] = None   # memory maps reopen in the worker process
    return state

  def _array(self, v: int, kind: str) -> np.ndarray:
    if self._arrays is None:
      self._arrays = {}
    key = (v, kind)
    if key not in self._arrays:
      self._arrays[key] = np.load(array_path(self.root, self.split, self._videos[v], kind),
                                  mmap_mode="r")
    return self._arrays[key]

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    v = int(self._video_id[i])
    row = i - int(self._starts[v])
    return {
        "face": _to_float32(self._array(v, "image")[row], self._dtype),
        "mel": _to_float32(self._array(v, "audio")[row], self._dtype),
        "has_face": np.bool_(self._has_face[i]),
        "label": np.int32(self._label[i]),
        "frame": np.int32(self._frame[i]),
        "video": self._videos[v],
        "split": self.split,
    }

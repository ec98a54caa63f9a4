"""Feature extraction over a prepared or TFDS-built dataset: resumable per video, atomic, sharded
over devices.

For every video of the requested splits, in record order:

* faces come from the records (the crops training reads), through the image encoder; a record
  without a face gets zeros (the model gives that modality no weight);
* audio comes from the log-mel windows in the records (Swin / ViT audio encoders), or, for
  wav2vec 2.0 / HuBERT, from the original media: ``metadata.json`` of the prepared data gives
  each video's media path relative to the Aff-Wild2 root, which ``media_root`` names. The
  track is decoded and resampled to 16 kHz by the same readers as data preparation
  (`mfer_jax.media`), with sample 0 at the first video frame. A video without a decodable
  audio track gets the features of silence and a warning, as data preparation gives it
  silent log-mel windows. A ``_left`` / ``_right`` pair decodes and encodes its media once.

The records come from ``data_dir`` (a prepared dataset) or, without it, from the split source
``config.data`` names (`mfer_jax.data.sources`: ``data.source=tfds`` reads a TFDS-built set);
both hold the same records in the same order, so they give the same cache.

Each video is written as `mfer_jax.features.cache` lays out (temporary names, renamed when
complete), then its sidecar; a rerun skips videos whose sidecar matches the spec, weights and
inputs, so a killed extraction resumes where it stopped and ends with the same arrays.
``metadata.json`` is removed before any video is (re)written and written last.
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import os
import pathlib
import time
from typing import Callable, Sequence

import numpy as np
from ml_collections import ConfigDict

from mfer_jax import errors, files
from mfer_jax.data import sources
from mfer_jax.data import store
from mfer_jax.features import cache
from mfer_jax.features import extractor as extractor_lib
from mfer_jax.media import audio_features
from mfer_jax.media import decode


class ExtractError(errors.UserError, RuntimeError):
  """Extraction cannot run as asked (e.g. wav2vec2 audio without a media root)."""


@dataclasses.dataclass
class Summary:
  out: str
  extracted: list[str] = dataclasses.field(default_factory=list)
  resumed: list[str] = dataclasses.field(default_factory=list)
  warnings: list[str] = dataclasses.field(default_factory=list)
  frames: int = 0
  seconds: float = 0.0

  def text(self) -> str:
    rate = self.frames / self.seconds if self.seconds else 0.0
    lines = [f"Features in {self.out}: {len(self.extracted)} videos extracted now "
             f"({self.frames} frames, {rate:.1f} frames/s), {len(self.resumed)} finished "
             "earlier."]
    lines += [f"warning: {w}" for w in self.warnings]
    return "\n".join(lines)


def _write_npy(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = files.temporary_name(path)
  try:
    with open(tmp, "wb") as f:
      np.save(f, array)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _fingerprint(data_cfg: ConfigDict, split: str, video: str, media: str | None,
                 tfds_split: dict[str, str]) -> dict:
  """Sizes and mtimes of a video's inputs: its shard (and media): changed inputs rebuild it.

  A TFDS split has no shard per video: its shard files' fingerprint (computed once per split
  into ``tfds_split``) stands for every video of the split, so a rebuilt split re-extracts
  all of them.
  """
  out = {}
  shard = None
  if data_cfg.source == "tfds":
    if split not in tfds_split:
      from mfer_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
      tfds_split[split] = tfds_source.split_fingerprint(
          data_cfg.tfds_name, sources.tfds_data_dir(data_cfg), split)
    out["tfds"] = tfds_split[split]
  else:
    shard = store.shard_path(data_cfg.data_dir, split, video)
  for key, path in (("shard", shard), ("media", media)):
    if path and os.path.exists(path):
      st = os.stat(path)
      out[key] = [st.st_size, st.st_mtime_ns]
  return out


def data_config(config: ConfigDict, data_dir: str | None) -> ConfigDict:
  """``config.data`` with ``data_dir`` (if given) as a prepared source, else as it is."""
  cfg = ConfigDict(config.data.to_dict())
  if data_dir:
    cfg.source, cfg.data_dir = "prepared", str(data_dir)
  elif cfg.source == "prepared" and not cfg.data_dir:
    raise ExtractError("no dataset to extract from: pass --data_dir=PREPARED (python -m "
                       "data_prep.build), or --config.data.source=tfds and "
                       "--config.data.tfds_data_dir=DIR for a TFDS-built set")
  return cfg


def _described(data_cfg: ConfigDict) -> str:
  if data_cfg.source == "tfds":
    return f"tfds:{data_cfg.tfds_name}@{sources.tfds_data_dir(data_cfg) or ''}"
  return str(data_cfg.data_dir)


def load_waveform(path: str) -> np.ndarray:
  """16 kHz mono with sample 0 at the first video frame (raises decode.MediaError)."""
  info = decode.probe(path)
  if not info.has_audio:
    raise decode.MediaError(f"{path}: no audio track")
  params = audio_features.FeatureParams(sample_rate=extractor_lib.SAMPLE_RATE)
  wave, _ = audio_features.load_audio(path, params, info.start_time)
  return wave


def extract(config: ConfigDict, data_dir: str | None, out: str,
            splits: Sequence[str] = ("train", "validation"), media_root: str = "",
            log: Callable[[str], None] | None = print,
            extractor: extractor_lib.FeatureExtractor | None = None) -> Summary:
  """Extracts (or finishes extracting) the feature cache ``out`` of a dataset.

  Args:
    config: the whole config: model.image / model.audio (families, variants, init files),
      features (dtype, batch size, audio settings), data.face_size, seed.
    data_dir: the prepared dataset (`mfer_jax.data.store`); empty or None: the source
      ``config.data`` names (``data.source=tfds`` with ``data.tfds_data_dir``).
    out: the cache directory to write.
    splits: splits to extract (each must be in the dataset).
    media_root: the Aff-Wild2 root the data was built from (wav2vec2 / hubert).
    log: progress and warnings (None: silent).
    extractor: an already built extractor for ``config`` (tests reuse one).

  Returns:
    What was done.

  Raises:
    ExtractError: a waveform audio encoder without ``media_root``; no dataset named.
    DatasetError, FeatureCacheError, CheckpointError: missing data, bad init files.
  """
  say = log or (lambda _: None)
  data_cfg = data_config(config, data_dir)
  meta = sources.load_metadata(data_cfg)
  for split in splits:
    if split not in meta["splits"]:
      raise ExtractError(f"split {split!r} is not in {_described(data_cfg)} (it has "
                         f"{', '.join(meta['splits'])}); choose --splits among those")
  the_spec = cache.spec(config, meta["features"])
  the_hash = cache.spec_hash(the_spec)
  weights = cache.weights(config)
  dtype = config.features.dtype
  out = pathlib.Path(out)
  ext = extractor or extractor_lib.FeatureExtractor(config)
  if ext.audio_from_waveform and not media_root:
    raise ExtractError(
        f"model.audio.family={config.model.audio.family} reads the original media: pass "
        "--media_root=AFFWILD2_ROOT (the --root the data was prepared from; metadata.json "
        "names each video's media relative to it)")
  summary = Summary(out=str(out))
  todo, tfds_split = [], {}
  for split in splits:
    for name in meta["splits"][split]["videos"]:
      entry = meta["videos"][name]
      media = str(pathlib.Path(media_root) / entry["media"]) if ext.audio_from_waveform else None
      side = cache.sidecar_path(out, split, name)
      want = {"spec_hash": the_hash, "weights": weights,
              "source": _fingerprint(data_cfg, split, name, media, tfds_split)}
      done = False
      if side.is_file():
        try:
          saved = json.loads(side.read_text())
          done = {k: saved.get(k) for k in want} == want
        except ValueError:
          done = False
      if done:
        summary.resumed.append(f"{split}/{name}")
        summary.warnings += saved.get("warnings", [])
      else:
        todo.append((split, name, media, want))
  # Splits an earlier run of the same spec finished stay listed (e.g. test added later).
  listed = {}
  try:
    old = cache.load_metadata(out)
    if old["spec_hash"] == the_hash and old["weights"] == weights:
      listed = old["splits"]
  except cache.FeatureCacheError:
    pass
  if todo:
    (out / cache.METADATA).unlink(missing_ok=True)
  say(f"Extracting features of {len(todo)} videos into {out} "
      f"({len(summary.resumed)} finished earlier, batch {ext.batch_size} over "
      f"{ext.mesh.size} devices)")
  readers: dict[str, sources.RecordReader] = {}
  indexes: dict[str, sources.SplitSource] = {}
  media_cache: dict[str, np.ndarray] = {}
  t0 = time.time()
  for n, (split, name, media, want) in enumerate(todo, 1):
    if split not in readers:
      indexes[split] = sources.load_split(data_cfg, split)
      readers[split] = indexes[split].open_reader(config.data.face_size)
    index, reader = indexes[split], readers[split]
    vid = index.videos.index(name)
    rows = np.flatnonzero(np.asarray(index.video_id) == vid)
    examples = [reader[int(i)] for i in rows]
    frames = np.asarray([ex["frame"] for ex in examples], np.int32)
    has_face = np.asarray([ex["has_face"] for ex in examples], bool)
    image = np.zeros((rows.size, ext.image_dim), np.float32)
    if has_face.any():
      image[has_face] = ext.image_features(
          np.stack([ex["face"] for ex in examples])[has_face])
    warnings = []
    if ext.audio_from_waveform:
      entry = meta["videos"][name]
      if media not in media_cache:
        try:
          wave = load_waveform(media)
        except decode.MediaError as e:
          warnings.append(f"{e}; {split}/{name} gets the features of silence")
          wave = np.zeros(0, np.float32)
        media_cache.clear()   # a _left/_right pair is adjacent: keep one track
        media_cache[media] = wave
      audio = ext.waveform_features(media_cache[media], _fps(entry), frames)
    else:
      audio = ext.mel_features(np.stack([ex["mel"] for ex in examples]))
    for kind, array in (("image", cache.to_storage(image, dtype)),
                        ("audio", cache.to_storage(audio, dtype)), ("frame", frames)):
      _write_npy(cache.array_path(out, split, name, kind), array)
    files.atomic_write_json(cache.sidecar_path(out, split, name), {**want, "warnings": warnings})
    summary.extracted.append(f"{split}/{name}")
    summary.frames += int(rows.size)
    summary.warnings += warnings
    for w in warnings:
      say(f"warning: {w}")
    say(f"[{n}/{len(todo)}] {split}/{name}: {rows.size} frames")
  summary.seconds = time.time() - t0
  files.atomic_write_json(out / cache.METADATA, {
      "format": cache.FORMAT, "version": cache.VERSION, "spec": the_spec,
      "spec_hash": the_hash, "weights": weights,
      "init_files": {k: config.model[k].init_file for k in cache.MODALITIES},
      "dims": {"image": ext.image_dim, "audio": ext.audio_dim}, "dtype": dtype,
      "data_dir": _described(data_cfg),
      "splits": {**listed, **{s: {"videos": meta["splits"][s]["videos"],
                                  "num_records": meta["splits"][s]["num_records"]}
                              for s in splits}},
      "warnings": summary.warnings,
  })
  say(summary.text())
  return summary


def _fps(entry: dict) -> fractions.Fraction:
  """A video's exact frame rate from its metadata entry (29.97 is 30000/1001)."""
  return fractions.Fraction(entry.get("fps_fraction") or entry["fps"])

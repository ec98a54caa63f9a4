"""The TFDS route to training: the same set built both ways gives the same index, records,
batches and losses, from `mfer_jax.data.sources`."""

import json
import os
import pathlib
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

import prep_raw
from conftest import tiny_config
from data_prep import build
from data_prep import tfds_affwild2
from mfer_jax import constants, errors, reporting
from mfer_jax.ablation import runs, sweep
from mfer_jax.data import config as data_config
from mfer_jax.data import pipeline, sources, store, tfds_source
from mfer_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """One raw tree, built by data_prep.build and by the TFDS builder."""
  raw = tmp_path_factory.mktemp("raw")
  prep_raw.make_raw_tree(raw, num_frames=40)
  prepared = tmp_path_factory.mktemp("prepared")
  build.build(raw, prepared, workers=1, log=None)
  tfds_dir = tmp_path_factory.mktemp("tfds")
  tfds_affwild2.AffWild2Expr(data_dir=str(tfds_dir)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  return prepared, tfds_dir


def _data_cfg(built, source, **overrides):
  cfg = data_config.default_data_config()
  cfg.source = source
  cfg.data_dir, cfg.tfds_data_dir = str(built[0]), str(built[1])
  cfg.face_size, cfg.batch_size, cfg.eval_batch_size = 32, 8, 8
  cfg.sampling.epoch_size = 40
  cfg.update_from_flattened_dict(overrides)
  return cfg


def test_the_builder_registers_the_default_name():
  assert tfds_affwild2.AffWild2Expr.name == constants.TFDS_NAME
  assert data_config.default_data_config().tfds_name == constants.TFDS_NAME


@pytest.mark.parametrize("split", constants.SPLITS)
def test_tfds_split_has_the_prepared_index_metadata_and_records(built, split):
  prepared = sources.load_split(_data_cfg(built, "prepared"), split)
  from_tfds = sources.load_split(_data_cfg(built, "tfds"), split)
  assert isinstance(from_tfds, tfds_source.TfdsSplit) and len(from_tfds) == len(prepared)
  assert from_tfds.videos == prepared.videos
  for key in ("label", "frame", "video_id", "has_face"):
    np.testing.assert_array_equal(getattr(from_tfds, key), getattr(prepared, key))
  assert from_tfds.features == prepared.features
  assert from_tfds.metadata["splits"][split] == prepared.metadata["splits"][split]
  for name in prepared.videos:
    assert from_tfds.metadata["videos"][name] == prepared.metadata["videos"][name]
  mine, theirs = from_tfds.open_reader(32), prepared.open_reader(32)
  mine = pickle.loads(pickle.dumps(mine))   # as Grain hands it to worker processes
  for i in range(len(prepared)):
    a, b = mine[i], theirs[i]
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_an_epoch_of_batches_is_the_same_from_either_source(built):
  batches = {}
  for source in sources.SOURCES:
    cfg = _data_cfg(built, source)   # augmentation on: seeded by (seed, epoch, position)
    it = pipeline.make_train_iterator(cfg, sources.load_split(cfg, "train"),
                                      process_index=0, process_count=1)
    batches[source] = [next(it) for _ in range(it.steps_per_epoch + 1)]   # into epoch 2
    it.close()
    ev = pipeline.make_eval_pipeline(cfg, sources.load_split(cfg, "validation"),
                                     process_index=0, process_count=1)
    batches[source] += list(ev)
  assert len(batches["tfds"]) == len(batches["prepared"]) > 6
  for a, b in zip(batches["tfds"], batches["prepared"]):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_clip_batches_and_window_evaluation_are_the_same_from_either_source(built):
  """Temporal mode reads a video's frames side by side: TFDS's permutation must give the
  prepared clips (train clips with augmentation, evaluation windows)."""
  batches = {}
  for source in sources.SOURCES:
    cfg = _data_cfg(built, source, **{"sequence.length": 5, "sequence.stride": 2,
                                      "sequence.hop": 2})
    it = pipeline.make_train_iterator(cfg, sources.load_split(cfg, "train"),
                                      process_index=0, process_count=1)
    batches[source] = [next(it) for _ in range(it.steps_per_epoch)]
    it.close()
    batches[source] += list(pipeline.make_eval_pipeline(cfg, sources.load_split(cfg,
                                                                                 "validation"),
                                                        process_index=0, process_count=1))
  assert batches["prepared"][0]["face"].shape[:2] == (8, 5)   # clips of 5 frames
  assert len(batches["tfds"]) == len(batches["prepared"]) > 5
  for a, b in zip(batches["tfds"], batches["prepared"]):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_index_is_cached_and_rescanned_when_the_split_changes(built, monkeypatch):
  cfg = _data_cfg(built, "tfds")
  reference = sources.load_split(cfg, "validation")
  cache = next(pathlib.Path(built[1]).rglob("mfer_jax.validation.index.npz"))
  scans = []
  real_scan = tfds_source.scan_features
  monkeypatch.setattr(tfds_source, "scan_features",
                      lambda source: scans.append(1) or real_scan(source))
  again = sources.load_split(cfg, "validation")
  assert not scans   # read from the cache
  np.testing.assert_array_equal(again.order, reference.order)
  shard = next(cache.parent.glob("*-validation.array_record-*"))
  stat = shard.stat()
  os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # a rebuilt split
  rescanned = sources.load_split(cfg, "validation")
  assert scans == [1]
  np.testing.assert_array_equal(rescanned.label, reference.label)
  cache.write_bytes(b"truncated")   # a damaged cache is rebuilt, never trusted
  sources.load_split(cfg, "validation")
  assert scans == [1, 1]


def test_unknown_source_and_missing_dataset_are_user_errors(built, tmp_path):
  with pytest.raises(errors.UsageError, match="data.source='tfrecord'.*prepared, tfds"):
    sources.load_split(_data_cfg(built, "tfrecord"), "train")
  cfg = _data_cfg(built, "tfds", tfds_data_dir=str(tmp_path))
  with pytest.raises(store.DatasetError, match="python -m data_prep.tfds_affwild2") as e:
    sources.load_split(cfg, "train")
  assert "\n" not in str(e.value)


def test_training_evaluation_and_report_match_between_sources(built, tmp_path):
  """A short run from each source: same losses and evals; eval mode and the report work on
  the TFDS run; an ablation sweep accepts the TFDS keys."""
  results = {}
  for source in sources.SOURCES:
    config = tiny_config(built[0])
    config.data.source, config.data.tfds_data_dir = source, str(built[1])
    config.data.sampling.epoch_size = 24           # 3 steps, then one evaluation
    config.train.num_epochs = 1
    workdir = tmp_path / source
    final = loop.train_and_evaluate(config, str(workdir))
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    results[source] = ([(r["step"], r["loss"]) for r in rows if "loss" in r], final)
  assert results["tfds"][0] == results["prepared"][0] and len(results["tfds"][0]) == 3
  assert results["tfds"][1] == results["prepared"][1]
  config = tiny_config(built[0])
  config.data.source, config.data.tfds_data_dir = "tfds", str(built[1])
  config.data.sampling.epoch_size, config.train.num_epochs = 24, 1
  evaluated = loop.evaluate_workdir(config, str(tmp_path / "tfds"), which="latest")
  assert evaluated["step"] == 3 and evaluated["macro_f1"] == results["tfds"][1]["macro_f1"]
  assert reporting.write_report(tmp_path / "tfds").is_file()
  sweep.check_config(ROOT / "tests" / "configs" / "tiny_sweep.py", "",
                     [runs.Variant("mfm", "dynamic", 0)],
                     ["data.source=tfds", f"data.tfds_data_dir={built[1]}"])

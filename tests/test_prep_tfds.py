"""The TFDS builder: ArrayRecord output without TensorFlow, read back by TFDS and by Grain."""

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

import prep_raw
from data_prep import build
from data_prep import tfds_affwild2
from mfer_jax.data import records
from mfer_jax.data import store


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  raw = tmp_path_factory.mktemp("raw")
  labels = prep_raw.make_raw_tree(raw, num_frames=12)
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = tfds_affwild2.AffWild2Expr(data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  return raw, data_dir, builder, labels


def test_reads_back_through_tfds_data_source(prepared):
  _, data_dir, builder, labels = prepared
  source = tfds.data_source("aff_wild2_expr", data_dir=str(data_dir))
  valid = {n: int((np.asarray(l) >= 0).sum()) for n, l in labels.items()}
  assert len(source["train"]) == valid["solo"] + valid["pair_left"] + valid["pair_right"]
  assert len(source["validation"]) == valid["val"] and len(source["test"]) == 12
  for i in range(len(source["train"])):
    ex = source["train"][i]
    rec = records.decode_record(ex)
    video = ex["video"].decode() if isinstance(ex["video"], bytes) else ex["video"]
    assert rec["video"] == video and rec["frame"] == ex["frame"]
    assert rec["label"] == labels[video][rec["frame"] - 1] >= 0
    assert rec["mel"].shape == (64, 100) and rec["has_face"] == ex["has_face"]
  assert builder.info.metadata["features"]["window_frames"] == 100
  assert builder.info.metadata["videos"]["pair_left"]["media"] == "batch2/pair.avi"


def test_reads_back_through_grain_and_matches_build(prepared, tmp_path):
  raw, _, builder, _ = prepared
  source = builder.as_data_source()
  ds = grain.MapDataset.source(source["test"]).map(records.decode_record)
  frames = sorted(int(ds[i]["frame"]) for i in range(len(ds)))
  assert frames == list(range(1, 13))
  # The same per-video code as data_prep.build: identical record bytes per frame.
  build.build(raw, tmp_path, splits=["test"], workers=1, log=None)
  reader = array_record_module.ArrayRecordReader(str(store.shard_path(tmp_path, "test",
                                                                       "test1")))
  built = {records.parse_record(r)[0]["frame"]: r for r in reader.read_all()}
  for i in range(len(source["test"])):
    ex = source["test"][i]
    assert ex["record"] == built[int(ex["frame"])]

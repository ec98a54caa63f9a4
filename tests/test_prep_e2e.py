"""The synthetic Aff-Wild2 set end to end through the builder, checked against its raw files."""

import pathlib

import numpy as np
import pytest
from array_record.python import array_record_module

from data_prep import build
from data_prep import synth
from mfer_jax.data import affwild2
from mfer_jax.data import config
from mfer_jax.data import pipeline
from mfer_jax.data import records
from mfer_jax.data import store
from mfer_jax.media import decode


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  raw = tmp_path_factory.mktemp("synth")
  out = tmp_path_factory.mktemp("data")
  synth.generate(raw, num_videos=5, seed=3, workers=1, seconds=(2.0, 3.0))
  summary = build.build(raw, out, workers=2, log=None)   # the process pool path
  return raw, out, summary


def _raw_labels(path: pathlib.Path) -> np.ndarray:
  """Annotation labels read independently of data_prep.affwild2."""
  lines = path.read_text().splitlines()
  assert lines[0] == "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
  return np.array([int(v) for v in lines[1:] if v.strip()], np.int32)


def test_counts_match_the_annotation_files_exactly(dataset):
  raw, out, summary = dataset
  meta = store.load_metadata(out)
  assert not summary.skipped
  for split in ("train", "validation"):
    ann_dir = affwild2.find_annotation_dir(raw, split)
    files = sorted(ann_dir.glob("*.txt"))
    assert meta["splits"][split]["videos"] == [p.stem for p in files]
    counts = np.zeros(8, np.int64)
    index = store.load_split(out, split)
    for vid, path in enumerate(files):
      entry = meta["videos"][path.stem]
      labels = _raw_labels(path)[:entry["num_frames"]]   # beyond the video: truncated
      counts += np.bincount(labels[labels >= 0], minlength=8)
      mine = index.video_id == vid
      np.testing.assert_array_equal(index.label[mine], labels[labels >= 0])
      np.testing.assert_array_equal(index.frame[mine], np.flatnonzero(labels >= 0) + 1)
      assert ("length_mismatch" in entry["flags"]) == (entry["annotation_frames"]
                                                       != entry["num_frames"])
    assert meta["splits"][split]["class_counts"] == counts.tolist()
    assert (index.label >= 0).all()   # -1 frames are never written to labelled splits


def test_test_records_are_every_decoded_frame(dataset):
  raw, out, _ = dataset
  meta = store.load_metadata(out)
  index = store.load_split(out, "test")
  names = affwild2.read_test_list(next((raw / "test_set").glob("*.txt")))
  assert meta["splits"]["test"]["videos"] == names
  for vid, name in enumerate(names):
    decoded = sum(1 for _ in decode.decode_frames(raw / meta["videos"][name]["media"]))
    assert decoded == meta["videos"][name]["num_frames"]
    assert index.frame[index.video_id == vid].tolist() == list(range(1, decoded + 1))
  assert (index.label == -1).all()


def test_left_right_share_media_but_keep_labels_and_crops(dataset):
  raw, out, _ = dataset
  meta = store.load_metadata(out)
  sides = [n for n in meta["videos"] if n.endswith(("_left", "_right"))]
  assert sides, "the synthetic set always has a two-person video"
  for name in sides:
    split = meta["videos"][name]["split"]
    assert pathlib.Path(meta["videos"][name]["media"]).stem == affwild2.media_stem(name)
    reader = array_record_module.ArrayRecordReader(str(store.shard_path(out, split, name)))
    n = meta["videos"][name]["num_records"]
    labels = _raw_labels(affwild2.find_annotation_dir(raw, split) / f"{name}.txt") \
        if split != "test" else None
    for i in range(0, n, max(1, n // 7)):
      header, face, mel = records.parse_record(reader.read([i])[0])
      assert header["video"] == name and header["split"] == split
      crop = affwild2.crop_path(raw, name, header["frame"])
      assert face == (crop.read_bytes() if crop.exists() else b"")   # bytes passed through
      if labels is not None:
        assert header["label"] == labels[header["frame"] - 1]
  pairs = {affwild2.media_stem(n) for n in sides}
  for stem in pairs:
    both = [n for n in sides if affwild2.media_stem(n) == stem]
    if len(both) == 2:   # same media, same audio windows; different faces and labels
      assert len({meta["videos"][n]["media"] for n in both}) == 1


def test_reads_back_through_the_eval_pipeline(dataset):
  _, out, summary = dataset
  cfg = config.default_data_config()
  cfg.data_dir, cfg.eval_batch_size, cfg.num_workers = str(out), 32, 0
  index = store.load_split(out, "validation")
  batches = list(pipeline.make_eval_pipeline(cfg, index, process_index=0, process_count=1))
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])[mask]
  np.testing.assert_array_equal(labels, index.label)
  assert batches[0]["mel"].shape[1:] == (64, 100) and batches[0]["face"].shape[1:] == (112, 112, 3)
  assert summary.bytes_per_record <= 16 * 1024


def test_ensure_demo_dataset_builds_once_then_reuses(dataset, tmp_path):
  from data_prep import api   # pylint: disable=g-import-not-at-top
  raw, out, _ = dataset
  logs = []
  api.ensure_demo_dataset(raw, out, num_videos=5, seed=3, workers=1, seconds=(2.0, 3.0),
                          log=logs.append)
  assert any("up to date" in m for m in logs)   # complete raw set + valid metadata: no work
  (out / store.METADATA).unlink()
  logs.clear()
  api.ensure_demo_dataset(raw, out, num_videos=5, seed=3, workers=1, seconds=(2.0, 3.0),
                          log=logs.append)
  assert any("records" in m for m in logs) and store.load_metadata(out)


def test_concurrent_ensure_demo_dataset_waits_for_the_one_at_work(dataset):
  """Two trainings started at once on the demo config must not write the same files: the
  second waits on the set's lock (held here as the first run would hold it)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  from data_prep import api, synth  # pylint: disable=g-import-not-at-top
  raw, out, _ = dataset
  logs = []
  second = threading.Thread(target=api.ensure_demo_dataset, args=(raw, out), kwargs=dict(
      num_videos=5, seed=3, workers=1, seconds=(2.0, 3.0), log=logs.append))
  with open(raw / synth.MARKER_DIR / "lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    second.start()
    time.sleep(1.0)
    assert second.is_alive() and logs == []   # blocked before its first step
    fcntl.flock(lock, fcntl.LOCK_UN)
  second.join(timeout=120)
  assert not second.is_alive() and any("up to date" in m for m in logs)

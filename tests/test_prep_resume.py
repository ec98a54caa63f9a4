"""Resumability: an interrupted build, re-run, equals an uninterrupted one byte for byte."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import prep_raw
from mfer_jax.media import audio_features
from data_prep import build
from mfer_jax.data import store

REPO = pathlib.Path(__file__).resolve().parents[1]


def _dataset_files(out: pathlib.Path) -> dict[str, bytes]:
  """Every file a reader uses (shards, indexes, metadata); sidecars are build bookkeeping."""
  return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
          if p.is_file() and not p.name.endswith(".done.json")}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("raw")
  prep_raw.make_raw_tree(root, num_frames=16)
  return root


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
  out = tmp_path_factory.mktemp("ref")
  build.build(raw, out, workers=1, log=None)
  return _dataset_files(out)


def test_interrupted_build_resumes_to_identical_files(raw, reference, tmp_path):
  out = tmp_path / "out"
  build.build(raw, out, workers=1, log=None)
  # Simulate a kill after two videos: later shards/sidecars and the final files are gone,
  # and a half-written temporary shard is left behind.
  for name in ("solo", "val", "test1"):
    split = {"solo": "train", "val": "validation", "test1": "test"}[name]
    store.shard_path(out, split, name).unlink()
    build.sidecar_path(out, split, name).unlink()
  for p in [out / store.METADATA] + list(out.glob("*.index.npz")):
    p.unlink()
  (out / "train" / ".solo.array_record.123.tmp").write_bytes(b"half")
  (out / "train" / ".solo.array_record.123.tmp").unlink()   # temp files never look finished
  summary = build.build(raw, out, workers=1, log=None)
  assert sorted(summary.resumed) == ["pair_left", "pair_right"]
  assert sorted(summary.built) == ["solo", "test1", "val"]
  assert _dataset_files(out) == reference


def test_rerun_of_finished_build_does_nothing_and_changed_params_rebuild(raw, reference,
                                                                         tmp_path):
  out = tmp_path / "out"
  build.build(raw, out, workers=1, log=None)
  summary = build.build(raw, out, workers=1, log=None)
  assert summary.built == [] and len(summary.resumed) == 5
  assert _dataset_files(out) == reference
  summary = build.build(raw, out, workers=1, log=None,
                        params=audio_features.FeatureParams(n_mels=32))
  assert len(summary.built) == 5
  assert store.load_metadata(out)["features"]["n_mels"] == 32


def test_killed_subprocess_then_rerun_matches(raw, reference, tmp_path):
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "data_prep.build", "--root", str(raw), "--out", str(out),
         "--workers", "1"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  deadline = time.time() + 120
  while not list(out.glob("*/*.done.json")) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  finished = len(list(out.glob("*/*.done.json")))
  if finished < 5:   # killed mid-build: nothing may look complete
    assert not (out / store.METADATA).exists()
  assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
  assert _dataset_files(out) == reference


def test_pair_shares_one_decode_and_gets_identical_windows(raw, reference, tmp_path,
                                                           monkeypatch):
  probed = []
  real_probe = build.decode.probe
  monkeypatch.setattr(build.decode, "probe", lambda p: probed.append(p) or real_probe(p))
  build.build(raw, tmp_path, splits=["train"], workers=1, log=None)
  assert sorted(pathlib.Path(p).name for p in probed) == ["pair.avi", "solo.mp4"]
  files = _dataset_files(tmp_path)
  assert files["train/pair_left.array_record"] == reference["train/pair_left.array_record"]

"""Each bad input of data_prep/README.md gets its documented outcome."""

import numpy as np
import pytest

import commands
import prep_raw
from data_prep import build
from mfer_jax.data import reader as reader_lib
from mfer_jax.data import store


def _good_video(root, name="good", n=12, split="train"):
  prep_raw.write_media(root / "batch1" / f"{name}.mp4", n)
  prep_raw.write_annotation(root, split, name, [1] * n)
  prep_raw.write_crops(root, name, range(1, n + 1))


def _run(root, out, splits=("train",), **kw):
  logs = []
  summary = build.build(root, out, splits=splits, workers=1, log=logs.append, **kw)
  return summary, "\n".join(logs)


def test_missing_media_is_skipped_and_named(tmp_path):
  root = tmp_path / "raw"
  _good_video(root)
  ann = prep_raw.write_annotation(root, "train", "ghost_left", [0] * 5)
  summary, log = _run(root, tmp_path / "out")
  assert [s[1] for s in summary.skipped] == ["ghost_left"]
  assert str(ann) in summary.skipped[0][2] and "no media" in summary.skipped[0][2]
  assert "ghost_left" in summary.text() and str(ann) in log
  assert store.load_metadata(tmp_path / "out")["splits"]["train"]["videos"] == ["good"]


def test_no_audio_track_gives_silence_and_flag(tmp_path):
  root = tmp_path / "raw"
  prep_raw.write_media(root / "batch1" / "mute.avi", 10, sample_rate=None)
  prep_raw.write_annotation(root, "train", "mute", [2] * 10)
  summary, log = _run(root, tmp_path / "out")
  entry = store.load_metadata(tmp_path / "out")["videos"]["mute"]
  assert entry["flags"] == ["no_audio", "no_crops"] and entry["sample_rate"] == 0
  assert "no audio track" in log and "mute.avi" in log
  rec = reader_lib.SplitReader(store.load_split(tmp_path / "out", "train"), 112)[3]
  assert not np.asarray(rec["mel"]).any() and not rec["has_face"]
  assert [name for name, _ in summary.repaired] == ["mute", "mute"]


@pytest.mark.parametrize("num_labels,expected_records", [(15, 10), (7, 7)])
def test_length_mismatch_truncates_or_pads(tmp_path, num_labels, expected_records):
  root = tmp_path / "raw"
  prep_raw.write_media(root / "batch1" / "odd.mp4", 10)
  prep_raw.write_annotation(root, "train", "odd", [3] * num_labels)
  summary, log = _run(root, tmp_path / "out")
  entry = store.load_metadata(tmp_path / "out")["videos"]["odd"]
  assert "length_mismatch" in entry["flags"]
  assert (entry["annotation_frames"], entry["num_frames"]) == (num_labels, 10)
  assert entry["num_records"] == expected_records
  assert f"{num_labels} labels" in log and "10 frames" in log
  index = store.load_split(tmp_path / "out", "train")
  assert index.frame.tolist() == list(range(1, expected_records + 1))


def test_corrupt_media_is_skipped_and_only_corrupt_is_fatal(tmp_path):
  root = tmp_path / "raw"
  _good_video(root)
  (root / "batch2").mkdir()
  (root / "batch2" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(500))
  prep_raw.write_annotation(root, "train", "broken", [0] * 5)
  summary, log = _run(root, tmp_path / "out")
  assert [s[1] for s in summary.skipped] == ["broken"] and "broken.mp4" in log
  assert summary.num_records["train"] == 12
  (root / "batch1" / "good.mp4").unlink()
  (root / "batch1" / "good.mp4").write_bytes(b"not a video")
  proc = commands.run("data_prep.build", f"--root={root}", f"--out={tmp_path / 'out2'}",
                      "--splits=train", "--workers=1")
  commands.assert_user_error(proc, 1, "no usable video")


@pytest.mark.parametrize("lines,where,what", [
    (["1", "2", "x", "3"], ":4:", "not an integer"),
    (["1", "8"], ":3:", "out of range"),
    (["1", "-2"], ":3:", "out of range"),
    (["1", "", "2"], ":3:", "not an integer"),
])
def test_bad_labels_skip_the_file_naming_file_and_line(tmp_path, lines, where, what):
  root = tmp_path / "raw"
  _good_video(root)
  prep_raw.write_media(root / "batch1" / "bad.mp4", 4)
  ann = prep_raw.write_annotation(root, "train", "bad", lines)
  summary, log = _run(root, tmp_path / "out")
  assert [s[1] for s in summary.skipped] == ["bad"]
  assert f"{ann}{where}" in summary.skipped[0][2] and what in summary.skipped[0][2]
  assert "bad" not in store.load_metadata(tmp_path / "out")["videos"]


def test_wrong_header_skips_the_file(tmp_path):
  root = tmp_path / "raw"
  _good_video(root)
  prep_raw.write_media(root / "batch1" / "nohead.mp4", 4)
  ann = prep_raw.write_annotation(root, "train", "nohead", [1, 2, 3, 4], header="1")
  summary, _ = _run(root, tmp_path / "out")
  assert summary.skipped[0][1] == "nohead" and f"{ann}:1: wrong header" in summary.skipped[0][2]


def test_all_minus_one_video_is_left_out(tmp_path):
  root = tmp_path / "raw"
  _good_video(root)
  prep_raw.write_media(root / "batch1" / "void.mp4", 4)
  prep_raw.write_annotation(root, "train", "void", [-1] * 4)
  summary, _ = _run(root, tmp_path / "out")
  assert summary.skipped[0][1] == "void" and "every label is -1" in summary.skipped[0][2]


def test_older_challenge_folder_name_is_read(tmp_path):
  root = tmp_path / "raw"
  prep_raw.write_media(root / "batch1" / "old.mp4", 6)
  prep_raw.write_annotation(root, "validation", "old", [5] * 6,
                            challenge="EXPR_Classification_Challenge")
  summary, _ = _run(root, tmp_path / "out", splits=("validation",))
  assert summary.class_counts["validation"][5] == 6


@pytest.mark.parametrize("make,message", [
    (lambda root: None, "is not a directory"),
    (lambda root: (root / "batch1").mkdir(parents=True), "no media files"),
    (lambda root: (prep_raw.write_media(root / "batch1" / "a.mp4", 4),
                   (root / "annotations" / "EXPR_Recognition_Challenge" / "Train_Set")
                   .mkdir(parents=True)), "annotation folder is empty"),
    (lambda root: prep_raw.write_media(root / "batch1" / "a.mp4", 4), "no annotation folder"),
])
def test_wrong_root_or_empty_folder_is_fatal_with_layout_help(tmp_path, make, message):
  root = tmp_path / "raw"
  make(root)
  proc = commands.run("data_prep.build", f"--root={root}", f"--out={tmp_path / 'out'}",
                      "--splits=train", "--workers=1")
  line = commands.assert_user_error(proc, 1, message)
  if message != "is not a directory":
    assert "data_prep/README.md" in line and "cropped_aligned*/<name>/" in line  # layout pointer
  assert not (tmp_path / "out" / store.METADATA).exists()


def test_missing_test_list_is_fatal_unless_given(tmp_path):
  root = tmp_path / "raw"
  _good_video(root)
  prep_raw.write_media(root / "batch1" / "t1.mp4", 5)
  proc = commands.run("data_prep.build", f"--root={root}", f"--out={tmp_path / 'out'}",
                      "--workers=1", "--splits=train,test")
  commands.assert_user_error(proc, 1, "--test_list")
  listing = tmp_path / "names.txt"
  listing.write_text("t1.mp4\n\nt1\n")
  summary, _ = _run(root, tmp_path / "out", splits=("train", "test"), test_list=listing)
  assert summary.num_records["test"] == 5   # every decoded frame, once


def test_help_exits_cleanly():
  proc = commands.run("data_prep.build", "--help")
  assert proc.returncode == 0 and "--root" in proc.stdout, proc.stderr


def test_bad_option_value_is_a_usage_error(tmp_path):
  proc = commands.run("data_prep.build", f"--root={tmp_path}", f"--out={tmp_path / 'o'}",
                      "--hop_length=0")
  commands.assert_user_error(proc, 2, "hop_length must be positive")

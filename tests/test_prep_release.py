"""Real releases as unpacked: the builder finds each part at any depth, in every known shape."""

import os

import numpy as np
import pytest

import commands
import prep_raw
from data_prep import build
from mfer_jax.data import affwild2
from mfer_jax.data import store


@pytest.mark.parametrize("shape", sorted(prep_raw.RELEASE_SHAPES))
def test_each_release_shape_builds_every_video_from_its_folders(tmp_path, shape):
  root = tmp_path / "release"
  videos = prep_raw.make_release_tree(root, shape)
  spec = prep_raw.RELEASE_SHAPES[shape]
  logs = []
  summary = build.build(root, tmp_path / "out", workers=1, log=logs.append)
  meta = store.load_metadata(tmp_path / "out")
  assert not summary.skipped, summary.skipped
  assert summary.annotations == spec["annotations"]
  assert summary.test_list == spec["test_list"]
  for split in ("train", "validation", "test"):
    expected = sorted(n for n, v in videos.items() if v["split"] == split)
    assert sorted(meta["splits"][split]["videos"]) == expected
  for name, video in videos.items():
    entry = meta["videos"][name]
    assert entry["crops"] == video["crops"]
    assert summary.crops_from[name] == os.path.dirname(video["crops"])
    assert entry["num_faces"] == 3   # frames 1, 3, 5 of 6 have a crop file
    if video["labels"] is not None:
      assert entry["num_records"] == len(video["labels"])
  # The annotations read are the EXPR ones: the VA decoy's values never become labels.
  train = store.load_split(tmp_path / "out", "train")
  expected_labels = np.concatenate([videos[n]["labels"] for n in train.videos])
  np.testing.assert_array_equal(train.label, expected_labels)
  # The summary names the folder each video's crops came from.
  text = summary.text()
  for folder in spec["crops"]:
    assert f"{folder}/:" in text
  if len(spec["crops"]) > 1:
    assert f"{spec['crops'][0]}/: 3 videos (every video not named below)" in text
    assert f"{spec['crops'][-1]}/: 2 videos: c, d" in text
  else:
    assert f"{spec['crops'][0]}/: all 5 videos" in text


def test_several_annotation_folders_are_listed_and_one_is_chosen(tmp_path):
  root = tmp_path / "release"
  prep_raw.make_release_tree(root, "abaw6")
  copy = root / "old" / "EXPR_Classification_Challenge" / "Train_Set"
  copy.mkdir(parents=True)
  (copy / "a.txt").write_text(prep_raw.HEADER + "\n0\n")
  proc = commands.run("data_prep.build", f"--root={root}", f"--out={tmp_path / 'out'}",
                      "--splits=train", "--workers=1")
  commands.assert_user_error(proc, 1, "6th_ABAW_Annotations/EXPR_Recognition_Challenge",
                             "old/EXPR_Classification_Challenge", "--annotations=DIR")
  assert not (tmp_path / "out" / store.METADATA).exists()
  # Either the challenge folder itself, or a folder holding exactly one, resolves it.
  for chosen in (root / "6th_ABAW_Annotations" / "EXPR_Recognition_Challenge",
                 root / "6th_ABAW_Annotations"):
    plan = build.plan_jobs(root, ["train"], annotations=chosen)
    assert sorted(j.name for j in plan.jobs) == ["a", "b_left", "b_right"]
  plan = build.plan_jobs(root, ["train"], annotations=root / "old")
  assert [j.name for j in plan.jobs] == ["a"]


def test_a_video_in_two_crop_folders_names_both(tmp_path):
  root = tmp_path / "release"
  prep_raw.make_release_tree(root, "abaw6")
  (root / "cropped_aligned_new_50_vids" / "a").mkdir()
  with pytest.raises(build.BuildError) as e:
    build.plan_jobs(root, ["train"])
  message = str(e.value)
  assert "'a'" in message and "\n" not in message
  assert str(root / "cropped_aligned" / "a") in message
  assert str(root / "cropped_aligned_new_50_vids" / "a") in message


def test_other_challenges_lists_are_never_taken_for_the_expression_one(tmp_path):
  root = tmp_path / "release"
  prep_raw.make_release_tree(root, "abaw6")
  (root / prep_raw.RELEASE_SHAPES["abaw6"]["test_list"]).unlink()
  proc = commands.run("data_prep.build", f"--root={root}", f"--out={tmp_path / 'out'}",
                      "--splits=test", "--workers=1")
  line = commands.assert_user_error(proc, 1, "no Expression test list",
                                    "Valence_Arousal_Estimation_Challenge_test_set_release.txt",
                                    "CVPR_6th_ABAW_Expr_test_set_sample.txt", "--test_list=FILE")
  assert "expression_recognition_challenge_test_set_release.txt" in line   # the known names
  mine = tmp_path / "names.txt"
  mine.write_text("d\n")
  plan = build.plan_jobs(root, ["test"], test_list=mine)
  assert [j.name for j in plan.jobs] == ["d"] and plan.test_list == str(mine)


def test_two_known_test_lists_are_ambiguous(tmp_path):
  root = tmp_path / "release"
  prep_raw.make_release_tree(root, "abaw5")
  (root / "copy").mkdir()
  (root / "copy" / "Expression_Recognition_Challenge_test_set_release.txt").write_text("d\n")
  with pytest.raises(build.BuildError, match="several Expression test lists.*--test_list"):
    build.plan_jobs(root, ["test"])


def test_symlinked_parts_are_followed_once(tmp_path):
  root = tmp_path / "release"
  videos = prep_raw.make_release_tree(tmp_path / "unpacked", "abaw6")
  root.mkdir()
  for part in os.listdir(tmp_path / "unpacked"):
    os.symlink(tmp_path / "unpacked" / part, root / part)
  os.symlink(root, root / "loop")   # a cycle must not be walked forever, nor count twice
  release = affwild2.scan_release(root)
  assert release.challenge_dirs == [root / "6th_ABAW_Annotations" / "EXPR_Recognition_Challenge"]
  assert sorted(release.crops.folders) == sorted(videos)
  assert all(len(f) == 1 for f in release.crops.folders.values())
  assert sorted(release.media.files) == ["a", "b", "c", "d"]

"""data_prep.build from raw video without crops (--detect) and from a manifest CSV."""

import numpy as np
import pytest

import commands
import face_scenes
import prep_raw
from data_prep import build, media_write, synth_render
from mfer_jax.data import config, pipeline, records, store
from mfer_jax.media import faces

NUM_FRAMES = face_scenes.NUM_FRAMES


@pytest.fixture(scope="module")
def raw_tree(tmp_path_factory):
  """An Aff-Wild2 root: a two-person video with _left/_right labels and no crops at all, and
  a one-person video whose crops folder is complete."""
  root = tmp_path_factory.mktemp("raw")
  frames, truth = face_scenes.draw_crossing_video()
  media_write.write_video(root / "batch1" / "pair.mp4", np.stack(frames), 25)
  labels = {"pair_left": [i % 8 for i in range(NUM_FRAMES)],
            "pair_right": [-1] * 4 + [(i * 3) % 8 for i in range(NUM_FRAMES - 4)]}
  for name, lab in labels.items():
    prep_raw.write_annotation(root, "train", name, lab)
  prep_raw.write_media(root / "batch1" / "solo.mp4", 12)
  prep_raw.write_annotation(root, "train", "solo", [1] * 12)
  prep_raw.write_crops(root, "solo", range(1, 13))
  return root, truth, labels


@pytest.fixture(scope="module")
def detected(raw_tree, tmp_path_factory):
  root, _, _ = raw_tree
  out = tmp_path_factory.mktemp("detected")
  logs = []
  summary = build.build(root, out, splits=["train"], log=logs.append, detect=True)
  return out, summary, "\n".join(logs)


def _records(out, split, name):
  index = store.load_split(out, split)
  meta = store.load_metadata(out)
  vid = meta["splits"][split]["videos"].index(name)
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(str(store.shard_path(out, split, name)))
  rows = [records.parse_record(r) for r in reader.read_all()]
  reader.close()
  return index.frame[index.video_id == vid], rows


def test_detect_makes_each_sides_crops_with_the_prediction_path(raw_tree, detected):
  root, truth, labels = raw_tree
  out, summary, _ = detected
  meta = store.load_metadata(out)
  media = str(root / "batch1" / "pair.mp4")
  tracked = faces.track_video(media)
  for name, side, person in (("pair_left", "left", 0), ("pair_right", "right", 1)):
    entry = meta["videos"][name]
    assert "detected_faces" in entry["flags"] and "no_crops" not in entry["flags"]
    frames, rows = _records(out, "train", name)
    expected_frames = [i + 1 for i, l in enumerate(labels[name]) if l >= 0]
    assert frames.tolist() == expected_frames
    (_, track), = tracked.select(side)
    crops = {n: c for n, (c,) in faces.aligned_faces(media, [track]) if c is not None}
    for (header, face, _), frame in zip(rows, expected_frames):
      assert header["label"] == labels[name][frame - 1]
      visible = truth[person][frame - 1] is not None
      assert header["has_face"] == visible, (name, frame)
      # Byte for byte the crop prediction makes of that person on that frame.
      assert face == (faces.encode_crop(crops[frame]) if visible else b"")
    # And it is that person: the left one has the lighter skin.
    light = np.mean([records.decode_face(f, 112)[40:80, 30:80].mean() for _, f, _ in rows if f])
    assert (light > 140) == (person == 0), (name, light)


def test_detect_keeps_a_complete_crops_folder(raw_tree, detected):
  root, _, _ = raw_tree
  out, _, _ = detected
  assert store.load_metadata(out)["videos"]["solo"]["flags"] == []
  _, rows = _records(out, "train", "solo")
  for header, face, _ in rows:
    assert face == (root / "cropped_aligned" / "solo" / f"{header['frame']:05d}.jpg").read_bytes()


def test_turning_detect_on_rebuilds_only_the_videos_without_crops(raw_tree, tmp_path):
  root, _, _ = raw_tree
  out = tmp_path / "out"
  first = build.build(root, out, splits=["train"], log=None)
  assert "no_crops" in store.load_metadata(out)["videos"]["pair_left"]["flags"]
  assert sorted(first.built) == ["pair_left", "pair_right", "solo"]
  second = build.build(root, out, splits=["train"], log=None, detect=True)
  # All three jobs' settings changed (detect is on), so all are rebuilt; solo keeps its crops.
  assert sorted(second.built) == ["pair_left", "pair_right", "solo"]
  third = build.build(root, out, splits=["train"], log=None, detect=True)
  assert sorted(third.resumed) == ["pair_left", "pair_right", "solo"] and not third.built


def _one_face_clip(path, seed, num_frames=10):
  rng = np.random.default_rng(seed)
  background = synth_render.random_background(rng, 180, 240)
  ident = synth_render.FaceIdentity((224, 172, 138), (40, 32, 24), 110.0, 0.77, 0.39)
  frames = []
  for i in range(num_frames):
    frame = background.copy()
    synth_render.draw_posed_face(frame, (120 + i, 92.0), ident, i % 4, yaw=3 * i)
    frames.append(frame)
  t = np.arange(int(num_frames / 25 * 16000)) / 16000
  return media_write.write_video(path, np.stack(frames), 25,
                                 (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)


@pytest.fixture(scope="module")
def manifest_set(tmp_path_factory):
  base = tmp_path_factory.mktemp("manifest")
  for name, seed in (("a", 1), ("b", 2), ("c", 3)):
    _one_face_clip(base / "clips" / f"{name}.mp4", seed)
  (base / "labels").mkdir()
  b_labels = [5, 5, -1, -1, 6, 6, 6, 0, 0, 7]
  (base / "labels" / "b.txt").write_text(
      "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n"
      + "".join(f"{v}\n" for v in b_labels))
  manifest = base / "manifest.csv"
  manifest.write_text("\n".join([
      "video,label,person,split,name",          # line 1
      "clips/a.mp4,Happiness,,train,",          # 2: clip label by name
      "clips/a.mp4,2,,validation,a_val",        # 3: clip label by index
      "clips/b.mp4,labels/b.txt,,train,",       # 4: per-frame label file
      "clips/missing.mp4,Anger,,train,",        # 5: bad: no such video
      "clips/a.mp4,happy,,train,a2",            # 6: bad: unknown label name
      "clips/a.mp4,9,,train,a3",                # 7: bad: outside the class list
      "clips/a.mp4,Anger,,dev,a4",              # 8: bad: unknown split
      "clips/c.mp4,,,test,",                    # 9: test row, no label
      "clips/a.mp4,Fear,,train,",               # 10: bad: name 'a' used by line 2
      "clips/b.mp4,labels/nope.txt,,train,b2",  # 11: bad: no such label file
      "clips/b.mp4,Anger,sideways,train,b3",    # 12: bad: unknown person
  ]) + "\n")
  out = base / "out"
  logs = []
  summary = build.build(None, out, manifest=manifest, log=logs.append)
  return base, out, summary, "\n".join(logs), b_labels


def test_manifest_bad_rows_are_reported_by_line_and_the_rest_is_built(manifest_set):
  base, out, summary, log, _ = manifest_set
  reasons = {why.split(": ", 1)[0]: why for _, _, why in summary.skipped}
  manifest = str(base / "manifest.csv")
  assert sorted(reasons) == [f"{manifest}:{n}" for n in (10, 11, 12, 5, 6, 7, 8)]
  for line, words in ((5, "missing.mp4"), (6, "unknown label name 'happy'"),
                      (7, "label 9 is outside"), (8, "split 'dev'"), (10, "line 2"),
                      (11, "nope.txt"), (12, "person 'sideways'")):
    assert words in reasons[f"{manifest}:{line}"], reasons[f"{manifest}:{line}"]
    assert f"manifest.csv:{line}" in log
  meta = store.load_metadata(out)
  assert {s: v["videos"] for s, v in meta["splits"].items()} == {
      "train": ["a", "b"], "validation": ["a_val"], "test": ["c"]}


def test_manifest_labels_clip_and_per_frame(manifest_set):
  _, out, _, _, b_labels = manifest_set
  meta = store.load_metadata(out)
  for split, name, expected in (("train", "a", [4] * 10), ("validation", "a_val", [2] * 10),
                                ("train", "b", b_labels), ("test", "c", [-1] * 10)):
    frames, rows = _records(out, split, name)
    keep = [i + 1 for i, v in enumerate(expected) if v >= 0 or split == "test"]
    assert frames.tolist() == keep, name
    assert [h["label"] for h, _, _ in rows] == [expected[f - 1] for f in keep], name
    assert all(h["has_face"] for h, _, _ in rows), name          # one clear face per frame
    assert "detected_faces" in meta["videos"][name]["flags"]
  assert meta["videos"]["a"]["clip_label"] == 4 and "clip_label" not in meta["videos"]["b"]


def test_manifest_records_go_through_the_training_pipeline(manifest_set):
  _, out, _, _, _ = manifest_set
  cfg = config.default_data_config()
  cfg.data_dir, cfg.eval_batch_size, cfg.num_workers = str(out), 8, 0
  index = store.load_split(out, "validation")
  batches = list(pipeline.make_eval_pipeline(cfg, index, process_index=0, process_count=1))
  mask = np.concatenate([b["mask"] for b in batches])
  assert np.concatenate([b["label"] for b in batches])[mask].tolist() == [2] * 10
  face = np.concatenate([b["face"] for b in batches])[mask]
  assert face.shape[1:] == (112, 112, 3) and face.std() > 10


def test_manifest_command_line_errors(manifest_set, tmp_path):
  """--manifest reaches the reader (a whole-file problem is one error line, exit 1), and it
  excludes --root (usage, exit 2)."""
  base, _, _, _, _ = manifest_set
  both = commands.run("data_prep.build", f"--manifest={base / 'manifest.csv'}",
                      f"--root={base}", f"--out={tmp_path / 'x'}")
  commands.assert_user_error(both, 2, "--root", "--manifest")
  bad = base / "bad.csv"
  bad.write_text("video,lable\nclips/a.mp4,Anger\n")
  proc = commands.run("data_prep.build", f"--manifest={bad}", f"--out={tmp_path / 'y'}")
  commands.assert_user_error(proc, 1, "bad.csv:1", "'lable'")


def test_a_run_trains_on_manifest_records_and_predicts_their_clips(manifest_set, tmp_path):
  """Issue 15's last bar: records built from a manifest train (tests/configs/tiny.py, two
  steps and the final validation) and the run predicts one of the manifest's clips, one label
  per decoded frame."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from mfer_jax.prediction import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from mfer_jax.prediction import videos  # pylint: disable=g-import-not-at-top
  from mfer_jax.training import loop  # pylint: disable=g-import-not-at-top
  base, out, _, _, _ = manifest_set
  config = tiny_config(out)
  config.train.max_steps = 2
  run = tmp_path / "run"
  result = loop.train_and_evaluate(config, str(run))
  assert 0.0 <= result["macro_f1"] <= 1.0 and (run / "FINISHED.json").is_file()
  predictor = predictor_lib.Predictor(run, batch_size=16)
  result, = videos.predict_video(predictor, videos.feature_params(run), base / "clips" / "c.mp4",
                                 tmp_path / "c.txt")
  lines = (tmp_path / "c.txt").read_text().splitlines()
  assert len(lines) - 1 == result.num_frames == 10 and result.frames_with_face == 10

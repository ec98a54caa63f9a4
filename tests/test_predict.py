"""Prediction: one label per decoded frame, ABAW format, submission files, bad media."""

import fractions
import pathlib
import subprocess
import sys

import av
import numpy as np
import pytest

import face_scenes
from data_prep import media_write, synth_render
from mfer_jax import constants
from mfer_jax.media import decode
from mfer_jax.prediction import frames as frames_lib, labels
from mfer_jax.prediction import predictor as predictor_lib
from mfer_jax.prediction import videos as predict

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 192, 256
HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"


@pytest.fixture(scope="module")
def predictor(tiny_run):
  return predictor_lib.Predictor(tiny_run, batch_size=16)


@pytest.fixture(scope="module")
def params(tiny_run):
  return predict.feature_params(tiny_run)


def _clip(num_frames, face_frames, seed=0, sample_rate=44100, with_audio=True, fps=25):
  """Frames with a drawn face where ``face_frames(i)`` (0-based), an empty scene elsewhere,
  and a tone."""
  rng = np.random.default_rng(seed)
  background = synth_render.random_background(rng, HEIGHT, WIDTH)
  ident = synth_render.random_identity(rng, HEIGHT)
  out = []
  for i in range(num_frames):
    frame = background.copy()
    if face_frames(i):
      synth_render.draw_face(frame, (WIDTH / 2, HEIGHT / 2), ident, i % 4)
    out.append(frame)
  seconds = float(num_frames / fractions.Fraction(fps))
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  audio = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32) if with_audio else None
  return np.stack(out), audio


def _lines(path):
  return pathlib.Path(path).read_text().splitlines()


def _probs_rows(label_file):
  rows = _lines(labels.probabilities_path(label_file))
  return [r.split(",") for r in rows[1:]]


def test_one_label_per_decoded_frame_at_2997_fps(predictor, params, tmp_path):
  fps = fractions.Fraction(30000, 1001)
  video, audio = _clip(45, lambda i: i < 20 or i >= 30, fps=fps)
  path = media_write.write_video(tmp_path / "clip.mp4", video, fps, audio, 44100)
  decoded = decode.probe(path).num_frames
  result, = predict.predict_video(predictor, params, path, tmp_path / "out" / "clip.txt")
  lines = _lines(result.label_file)
  assert lines[0] == HEADER
  assert len(lines) - 1 == decoded == result.num_frames
  assert all(0 <= int(l) < 8 for l in lines[1:])
  rows = _probs_rows(result.label_file)
  assert len(rows) == decoded
  has_face = np.array([int(r[2]) for r in rows], bool)
  # The detector finds the drawn face; the empty frames 21..30 have none.
  assert has_face[:20].mean() >= 0.9 and has_face[30:].mean() >= 0.9
  assert not has_face[20:30].any()
  probs = np.array([[float(x) for x in r[3:11]] for r in rows])
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
  assert [int(r[1]) for r in rows] == [int(l) for l in lines[1:]]


def test_two_people_crossing_sizes_get_a_file_each_with_every_frame(predictor, params,
                                                                    tmp_path):
  """The issue's two-person video: sizes cross, one person hides for 6 frames. --person=all
  writes clip_left and clip_right, each with one label per decoded frame; each CSV row's box
  and landmarks are that person's, and the smaller face never takes over "largest"."""
  frames, truth = face_scenes.draw_crossing_video()
  path = media_write.write_video(tmp_path / "pair.mp4", np.stack(frames), 25)
  results = predict.predict_video(predictor, params, path, tmp_path / "out" / "pair.txt",
                                  person="all")
  assert sorted(pathlib.Path(r.label_file).name for r in results) == ["pair_left.txt",
                                                                      "pair_right.txt"]
  for result, person in zip(sorted(results, key=lambda r: r.label_file), (0, 1)):
    lines = _lines(result.label_file)
    assert lines[0] == HEADER and len(lines) - 1 == face_scenes.NUM_FRAMES
    header = _lines(labels.probabilities_path(result.label_file))[0].split(",")
    assert header[-14:] == list(labels.FACE_COLUMNS)
    for i, row in enumerate(_probs_rows(result.label_file)):
      if truth[person][i] is None:       # hidden: no face, empty face columns
        assert row[2] == "0" and row[-14:] == [""] * 14
        continue
      assert row[2] == "1", (person, i)
      points = np.array([float(v) for v in row[-10:]]).reshape(5, 2)
      eye_distance = np.linalg.norm(truth[person][i][1] - truth[person][i][0])
      # The landmarks are this person's (compression blurs the drawn face a little).
      assert np.linalg.norm(points - truth[person][i], axis=1).mean() < 0.35 * eye_distance
  # "largest" is the person present in the most frames: the left one, though smaller at first.
  largest, = predict.predict_video(predictor, params, path, tmp_path / "largest.txt")
  left = min(results, key=lambda r: r.label_file)
  assert largest.frames_with_face == left.frames_with_face == face_scenes.NUM_FRAMES
  assert _lines(largest.label_file) == _lines(left.label_file)


def test_audio_windows_match_data_preparation(params, tmp_path):
  """The windows prediction builds equal data_prep's for the same file and frame times."""
  from mfer_jax.media import audio_features  # pylint: disable=g-import-not-at-top
  video, audio = _clip(30, lambda i: True, fps=10, sample_rate=48000)
  path = media_write.write_video(tmp_path / "clip.avi", video, 10, audio, 48000)
  inputs, = frames_lib.read_video(path, params, 32)
  info = decode.probe(path)
  wav, _ = audio_features.load_audio(path, params, info.start_time)
  windows = audio_features.frame_windows(audio_features.compute_log_mel(wav, params),
                                         info.fps, info.num_frames, params)
  assert inputs.num_frames == info.num_frames == 30
  for i in (0, 7, 29):
    np.testing.assert_array_equal(inputs.mel[i], windows[i])


def test_nearest_policy_copies_the_nearest_face_frame():
  probs = np.eye(8, dtype=np.float32)[[0, 1, 2, 3, 4, 5]]
  has_face = np.array([False, True, False, False, True, False])
  filled = labels.fill_no_face(probs, has_face, "nearest")
  assert filled.argmax(1).tolist() == [1, 1, 1, 4, 4, 4]
  assert labels.fill_no_face(probs, has_face, "audio") is probs
  assert labels.fill_no_face(probs, np.zeros(6, bool), "nearest") is probs


def test_smoothing_is_a_centred_moving_average():
  rng = np.random.default_rng(0)
  probs = rng.random((11, 8)).astype(np.float32)
  got = labels.smooth(probs, 5)
  for i in range(11):
    np.testing.assert_allclose(got[i], probs[max(0, i - 2):i + 3].mean(0), rtol=1e-5)
  assert labels.smooth(probs, 1) is probs


def test_no_face_no_audio_still_writes_a_complete_file(predictor, params, tmp_path):
  video, _ = _clip(12, lambda i: False)
  path = media_write.write_video(tmp_path / "empty.mp4", video, 25)
  result, = predict.predict_video(predictor, params, path, tmp_path / "empty.txt",
                                 no_face="nearest")
  assert len(_lines(result.label_file)) == 13 and result.frames_with_face == 0
  notes = " ".join(result.notes)
  assert "no face found" in notes and "no audio track" in notes


def _mjpeg_with_a_zeroed_frame(path, video, bad_index):
  """An intra-only (MJPEG) AVI whose frame ``bad_index`` (0-based) is zeroed on disk, so
  that one frame cannot be decoded and its neighbours can."""
  with av.open(str(path), "w") as c:
    stream = c.add_stream("mjpeg", rate=25)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuvj420p"
    for frame in video:
      c.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    c.mux(stream.encode())
  with av.open(str(path)) as c:
    packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
  pos, size = packets[bad_index]
  data = bytearray(path.read_bytes())
  data[pos:pos + size] = bytes(size)
  path.write_bytes(bytes(data))


def test_unreadable_frame_in_the_middle_keeps_every_frame(predictor, params, tmp_path):
  video, _ = _clip(12, lambda i: True)
  path = tmp_path / "bad.avi"
  _mjpeg_with_a_zeroed_frame(path, video, 5)
  result, = predict.predict_video(predictor, params, path, tmp_path / "bad.txt")
  assert len(_lines(result.label_file)) - 1 == result.num_frames == 12
  assert any("unreadable frame(s) (first: frame 6)" in n for n in result.notes), result.notes
  rows = _probs_rows(result.label_file)
  assert rows[5][2] == "0" and sum(r[2] == "1" for r in rows) >= 10


def test_submission_writes_one_file_per_test_video(tiny_run, tmp_path):
  root = tmp_path / "affwild2"
  counts = {}
  for name, n, fps in (("10-60-1280x720", 16, 10), ("video7", 20, 25)):
    video, audio = _clip(n, lambda i: True, fps=fps)
    media_write.write_video(root / "batch1" / f"{name}.mp4", video, fps, audio, 44100)
    counts[name] = n
  # A two-person video: both sides share the media, each has its own crops.
  video, audio = _clip(14, lambda i: True, seed=3)
  media_write.write_video(root / "batch2" / "pair.avi", video, 25, audio, 44100)
  crops = root / "cropped_aligned" / "pair_left"
  crops.mkdir(parents=True)
  import cv2  # pylint: disable=g-import-not-at-top
  for i in (1, 2, 5):
    cv2.imwrite(str(crops / f"{i:05d}.jpg"), np.full((112, 112, 3), 128, np.uint8))
  counts["pair_left"] = counts["pair_right"] = 14
  (root / "test_set").mkdir()
  (root / "test_set" / "EXPR_Recognition_Challenge_test_set_release.txt").write_text(
      "\n".join(counts) + "\n")
  out = tmp_path / "submission"
  proc = subprocess.run([sys.executable, "-m", "mfer_jax.tools.predict", f"--workdir={tiny_run}",
                         f"--root={root}", "--split=test", f"--out={out}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(p.name for p in out.glob("*.txt")) == sorted(f"{n}.txt" for n in counts)
  for name, n in counts.items():
    lines = _lines(out / f"{name}.txt")
    assert lines[0] == HEADER and len(lines) == n + 1, name
  # With crops, exactly the frames that have a crop file have a face.
  rows = _probs_rows(out / "pair_left.txt")
  assert [i + 1 for i, r in enumerate(rows) if r[2] == "1"] == [1, 2, 5]


def test_cli_errors_are_clear(tiny_run, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "mfer_jax.tools.predict", f"--workdir={tiny_run}",
                         f"--video={tmp_path / 'missing.mp4'}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "missing.mp4" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = subprocess.run([sys.executable, "-m", "mfer_jax.tools.predict", f"--workdir={tmp_path}",
                         f"--video={tmp_path / 'x.mp4'}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "config.json" in proc.stderr


def test_labels_header_matches_the_class_order():
  assert labels.HEADER == HEADER == constants.ANNOTATION_HEADER

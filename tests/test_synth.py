"""Tests for the synthetic Aff-Wild2 generator (data_prep.synth) and the media writer."""

import dataclasses
import fractions
import pathlib
import re

import av
import cv2
import numpy as np
import pytest

import commands
from data_prep import media_write
from data_prep import synth
from data_prep import synth_render
from mfer_jax.media import align, detector

SECONDS = (3.0, 4.0)  # short videos keep the module's generations around a second each
ANNOTATIONS = pathlib.Path("annotations", "EXPR_Recognition_Challenge")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth") / "data"
  summary = synth.generate(out, num_videos=4, seed=0, workers=2, seconds=SECONDS)
  return out, summary


def _annotation_files(out):
  return sorted((out / ANNOTATIONS).glob("*_Set/*.txt"))


def _crop_bytes(out):
  return {p.relative_to(out).as_posix(): p.read_bytes()
          for p in sorted((out / "cropped_aligned").rglob("*.jpg"))}


def test_layout_and_splits(dataset):
  out, summary = dataset
  assert {p.name for p in out.iterdir()} >= {"batch1", "batch2", "cropped_aligned", "annotations",
                                             "test_set"}
  assert sorted(p.name for p in (out / ANNOTATIONS).iterdir()) == ["Train_Set", "Validation_Set"]
  test_names = (out / synth.TEST_LIST).read_text().split()
  assert test_names == summary["splits"]["test"]["names"] and test_names
  for name in test_names:  # test videos: crops but no labels
    assert (out / "cropped_aligned" / name).is_dir()
    assert not list((out / ANNOTATIONS).glob(f"*/{name}.txt"))
  names = [p.stem for p in _annotation_files(out)]
  assert {"000-384x192_left", "000-384x192_right"} <= set(names)  # two persons, both annotated
  right_only = [n[:-6] for n in names if n.endswith("_right") and n[:-6] + "_left" not in names]
  assert right_only, names
  media = sorted(p.suffix for p in out.glob("batch*/*"))
  assert ".mp4" in media and ".avi" in media and len(media) == 4


def test_annotations_have_header_values_and_a_length_mismatch(dataset):
  out, summary = dataset
  deltas = []
  for path in _annotation_files(out):
    lines = path.read_text().splitlines()
    assert lines[0] == "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
    values = np.array([int(v) for v in lines[1:]])
    assert values.min() >= -1 and values.max() <= 7
    stem = path.stem.removesuffix("_left").removesuffix("_right")
    deltas.append(len(values) - summary["videos"][stem]["num_frames"])
  assert any(d != 0 for d in deltas) and all(abs(d) <= 3 for d in deltas)


def test_crops_are_112_jpegs_named_by_frame_and_some_are_missing(dataset):
  out, summary = dataset
  some_missing = False
  for info in summary["videos"].values():
    for name in info["names"]:
      files = sorted((out / "cropped_aligned" / name).iterdir())
      assert all(re.fullmatch(r"\d{5}\.jpg", f.name) for f in files)
      frames = [int(f.stem) for f in files]
      assert min(frames) >= 1 and max(frames) <= info["num_frames"]
      some_missing |= len(frames) < info["num_frames"] + min(0, info["annotation_delta"])
      crop = cv2.imdecode(np.frombuffer(files[0].read_bytes(), np.uint8), cv2.IMREAD_COLOR)
      assert crop.shape == (112, 112, 3)
  assert some_missing


def test_media_decode_to_stated_rates(dataset):
  out, summary = dataset
  for info in summary["videos"].values():
    with av.open(str(out / info["media"])) as container:
      video, audio = container.streams.video[0], container.streams.audio[0]
      assert video.average_rate == fractions.Fraction(info["fps"])
      assert audio.sample_rate == info["sample_rate"]
      assert audio.channels == info["channels"]
      assert sum(1 for _ in container.decode(video=0)) == info["num_frames"]


def test_detector_finds_the_faces_in_decoded_video_frames(dataset):
  """The detector finds the drawn face whenever a crop exists and the frame is not degraded,
  and nothing when the face is out (every other frame: the detector's cost, not the claim,
  sets the sample)."""
  out, summary = dataset
  plans = {p.stem: p for p in synth.plan_dataset(4, 0, SECONDS)}
  face_detector = detector.FaceDetector()
  found_when_visible, found_when_absent = [], []
  for stem, info in summary["videos"].items():
    if len(info["names"]) != 1 or info["names"][0].endswith(("_left", "_right")):
      continue
    crops = out / "cropped_aligned" / info["names"][0]
    degraded = plans[stem].degraded(plans[stem].persons[0])
    with av.open(str(out / info["media"])) as container:
      for number, frame in enumerate(container.decode(video=0), start=1):
        if number % 2 or degraded[number - 1]:
          continue
        found = bool(face_detector.detect(frame.to_ndarray(format="rgb24")))
        if (crops / f"{number:05d}.jpg").exists():
          found_when_visible.append(found)
        else:
          found_when_absent.append(found)
  assert len(found_when_visible) > 50 and found_when_absent
  assert np.mean(found_when_visible) > 0.9 and np.mean(found_when_absent) < 0.1


def test_same_seed_same_bytes_and_other_seed_differs(dataset, tmp_path):
  out, _ = dataset
  again = tmp_path / "again"
  synth.generate(again, num_videos=4, seed=0, workers=1, seconds=SECONDS)
  for path in _annotation_files(out):
    assert (again / path.relative_to(out)).read_bytes() == path.read_bytes()
  assert _crop_bytes(again) == _crop_bytes(out)
  for media in out.glob("batch*/*"):  # same PyAV version here, so the media match too
    assert (again / media.relative_to(out)).read_bytes() == media.read_bytes(), media.name
  other = tmp_path / "other"
  synth.generate(other, num_videos=4, seed=1, workers=1, seconds=SECONDS)
  assert [p.read_bytes() for p in _annotation_files(other)] != [
      p.read_bytes() for p in _annotation_files(out)]


def test_resume_regenerates_only_the_missing_video(tmp_path):
  out = tmp_path / "data"
  first = synth.generate(out, num_videos=3, seed=5, workers=1, seconds=SECONDS)
  assert sorted(first["generated"]) == sorted(first["videos"])
  stem, info = sorted(first["videos"].items())[1]
  kept = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and stem not in p.name
          and stem not in p.parent.name and p.parent.name != "test_set"}
  (out / info["media"]).unlink()
  for name in info["names"]:
    for f in (out / "cropped_aligned" / name).iterdir():
      f.unlink()
  (out / synth.MARKER_DIR / f"{stem}.json").unlink()
  stale = out / info["media"]
  stale = stale.with_name(f".{stale.name}.99999.tmp")  # as left by a killed run
  stale.write_bytes(b"partial")
  second = synth.generate(out, num_videos=3, seed=5, workers=1, seconds=SECONDS)
  assert second["generated"] == [stem]
  assert (out / info["media"]).exists() and list((out / "cropped_aligned" / info["names"][0]).iterdir())
  assert {p: p.stat().st_mtime_ns for p in kept} == kept
  assert not stale.exists()


def test_bad_arguments_give_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="num_videos must be >= 3"):
    synth.generate(tmp_path, num_videos=2)
  proc = commands.run("data_prep.synth", f"--out={tmp_path}", "--num_videos=1")
  commands.assert_user_error(proc, 2, "num_videos must be >= 3")


def test_media_write_round_trip_exact_ntsc_rate_and_audio_from_zero(tmp_path):
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (45, 64, 96, 3), dtype=np.uint8)
  sample_rate = 44100
  audio = np.zeros((int(45 * 1001 / 30000 * sample_rate), 2), np.float32)
  click = sample_rate  # a click at t = 1 s, i.e. at frame 31 (t = 30 * 1001 / 30000 s ≈ 1.001)
  audio[click:click + 32] = 0.9
  for name in ("v.mp4", "v.avi"):
    path = media_write.write_video(tmp_path / name, frames, 29.97, audio=audio,
                                   sample_rate=sample_rate)
    assert not list(tmp_path.glob(".*.tmp"))
    with av.open(str(path)) as container:
      video = container.streams.video[0]
      assert video.average_rate == fractions.Fraction(30000, 1001)
      assert sum(1 for _ in container.decode(video=0)) == 45
    with av.open(str(path)) as container:
      decoded = list(container.decode(audio=0))
      assert decoded[0].pts == 0
      samples = np.concatenate([f.to_ndarray().reshape(f.samples, -1)[:, 0] if not f.format.is_planar
                                else f.to_ndarray()[0] for f in decoded])
      assert abs(int(np.argmax(np.abs(samples))) - click) < 64  # within 1.5 ms


def test_media_write_rejects_bad_frames(tmp_path):
  with pytest.raises(ValueError, match="even"):
    media_write.write_video(tmp_path / "x.mp4", np.zeros((2, 63, 64, 3), np.uint8), 25)
  with pytest.raises(ValueError, match="extension"):
    media_write.write_video(tmp_path / "x.gif", np.zeros((2, 64, 64, 3), np.uint8), 25)


def _nearest_centroid_accuracy(features, codes, train):
  centroids = np.stack([features[train & (codes == c)].mean(0) for c in range(4)])
  predicted = np.argmin(((features[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)
  return float(np.mean(predicted == codes[~train]))


def test_face_codes_are_learnable_across_identities():
  """Nearest centroid on 28x28 grey aligned crops: new identities, chance is 0.25."""
  rng = np.random.default_rng(0)
  features, codes = [], []
  for person in range(48):
    ident = synth_render.random_identity(rng, 192)
    background = synth_render.random_background(rng, 192, 256)
    for code in range(4):
      frame = background.copy()
      center = (128 + rng.uniform(-20, 20), 96 + rng.uniform(-6, 6))
      synth_render.draw_face(frame, center, ident, code)
      crop = align.align_face(frame, synth_render.face_landmarks(center, ident, code))
      grey = cv2.resize(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), (28, 28), interpolation=cv2.INTER_AREA)
      x = grey.astype(np.float32).ravel()
      features.append((x - x.mean()) / (x.std() + 1e-6))
      codes.append(code)
  codes = np.array(codes)
  train = np.arange(len(codes)) < 32 * 4
  assert _nearest_centroid_accuracy(np.stack(features), codes, train) > 0.7


def test_audio_codes_are_learnable_across_voices():
  """Nearest centroid on a 2 s log-spectrum summary (band means + envelope rhythm)."""
  rng = np.random.default_rng(0)
  sample_rate = 16000
  features, codes = [], []
  for person in range(24):
    voice = synth_render.random_voice(rng)
    for code in range(4):
      x = synth_render.voice_segment(rng, voice, code, 2 * sample_rate, sample_rate)
      x = x + 0.1 * rng.standard_normal(x.shape)
      frames = np.lib.stride_tricks.sliding_window_view(x, 512)[::160] * np.hanning(512)
      spec = np.log(np.abs(np.fft.rfft(frames, axis=1)) ** 2 + 1e-6)
      bands = spec[:, :128].reshape(len(spec), 16, 8).mean(-1)  # 16 bands up to 4 kHz
      envelope = spec.max(1) - spec.max(1).mean()
      rhythm = np.abs(np.fft.rfft(envelope, n=256))[:32]
      f = np.concatenate([bands.mean(0) - bands.mean(), rhythm / (rhythm.sum() + 1e-6) * 10])
      features.append(f)
      codes.append(code)
  codes = np.array(codes)
  train = np.arange(len(codes)) < 16 * 4
  assert _nearest_centroid_accuracy(np.stack(features), codes, train) > 0.7


# ---------------------------------------------------------------------------------------------
# Video dynamics: expression ramps, blinks, talking mouths, degraded frames.


def _without_degradations(plan):
  persons = [dataclasses.replace(p, occlusions=[]) for p in plan.persons]
  return dataclasses.replace(plan, persons=persons, blur={}, jpeg={})


def test_degradation_rates_over_a_large_plan_match_the_documented_rates():
  """Planned fractions of blurred, compressed and occluded frames over ~45k frames."""
  plans = synth.plan_dataset(64, 0, (20.0, 40.0))
  frames = sum(p.num_frames for p in plans)
  blur = sum(len(p.blur) for p in plans) / frames
  jpeg = sum(len(p.jpeg) for p in plans) / frames
  person_frames = sum(p.num_frames for p in plans for _ in p.persons)
  occluded = sum(b - a for p in plans for q in p.persons for a, b, _ in q.occlusions)
  # Binomial standard errors are ~0.001 for blur and JPEG; occlusions come in runs of ~15
  # frames, so theirs is ~0.004.
  assert abs(blur - synth.BLUR_RATE) < 0.004, blur
  assert abs(jpeg - synth.JPEG_RATE) < 0.004, jpeg
  assert abs(occluded / person_frames - synth.OCCLUSION_RATE) < 0.012, occluded / person_frames
  runs = [b - a for p in plans for q in p.persons for a, b, _ in q.occlusions]
  assert min(runs) >= 3 and max(runs) <= 30   # 0.3-1 s at 10-30 fps


def test_generated_crops_are_degraded_exactly_on_the_planned_frames(dataset, tmp_path):
  """Renders each video of the fixture again without its degradations: the crops written by
  `generate` differ from those exactly on the planned frames. With the planned rates checked
  over a large plan above, the documented rates hold for generated frames; the rate measured
  on these ~350 crops is also checked, loosely (a few occlusion runs dominate its spread)."""
  out, _ = dataset
  differ_all, blur_sharpness = [], []
  for plan in synth.plan_dataset(4, 0, SECONDS):
    names = [p.name for p in plan.persons if p.annotated]
    crops = {n: tmp_path / plan.stem / n for n in names}
    for d in crops.values():
      d.mkdir(parents=True)
    _, frames = synth.render(_without_degradations(plan), 0, crops)
    for _ in frames:
      pass
    for person in plan.persons:
      if not person.annotated:
        continue
      planned = plan.degraded(person)
      for clean in sorted(crops[person.name].iterdir()):
        i = int(clean.stem) - 1
        made = (out / "cropped_aligned" / person.name / clean.name).read_bytes()
        differ = made != clean.read_bytes()
        assert differ == planned[i], (person.name, i, planned[i])
        differ_all.append(differ)
        if i in plan.blur and i not in plan.jpeg:
          grey = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE)
                  for b in (made, clean.read_bytes())]
          blur_sharpness.append(cv2.Laplacian(grey[0], cv2.CV_64F).var()
                                / cv2.Laplacian(grey[1], cv2.CV_64F).var())
  documented = 1 - (1 - synth.BLUR_RATE) * (1 - synth.JPEG_RATE) * (1 - synth.OCCLUSION_RATE)
  assert len(differ_all) > 300
  assert abs(np.mean(differ_all) - documented) < 0.06, np.mean(differ_all)
  assert blur_sharpness and max(blur_sharpness) < 0.8   # motion blur removes detail


def test_expressions_ramp_at_segment_boundaries():
  plan = synth.plan_dataset(4, 0, (20.0, 40.0))[2]
  person = plan.persons[0]
  _, intensity, _ = synth.face_dynamics(person, plan.num_frames)
  ramps = 0
  for prev, seg, nxt in zip(person.segments, person.segments[1:], person.segments[2:]):
    assert (seg.onset > 0) == (prev.face_code != seg.face_code)
    assert (seg.offset > 0) == (nxt.face_code != seg.face_code)
    if seg.onset:
      ramp = intensity[seg.start:seg.start + seg.onset + 1]
      assert ramp[0] < 0.5 and ramp[-1] == 1.0 and np.all(np.diff(ramp) > 0)
      ramps += 1
    if seg.offset:
      assert intensity[seg.end - 1] < 0.5 and np.all(np.diff(intensity[seg.end - seg.offset - 1:seg.end]) < 0)
  assert ramps >= 3


def test_intensity_moves_the_drawn_face_from_calm_to_the_expression():
  rng = np.random.default_rng(0)
  ident = synth_render.random_identity(rng, 192)
  background = synth_render.random_background(rng, 192, 256)

  def draw(code, **kw):
    img = background.copy()
    synth_render.draw_face(img, (128, 96), ident, code, **kw)
    return img.astype(np.float64)

  calm = draw(0)
  for code in (1, 2, 3):
    full = draw(code)
    assert np.array_equal(draw(code, intensity=0.0), calm)
    assert np.array_equal(draw(code, intensity=1.0), full)
    dist = [np.abs(draw(code, intensity=s) - full).mean() for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert np.all(np.diff(dist) < 0), dist


def test_blinks_close_the_eyes_briefly():
  plans = synth.plan_dataset(8, 0, (20.0, 40.0))
  closed, blink_frames, frames = 0, 0, 0
  for plan in plans:
    for person in plan.persons:
      _, _, eye_open = synth.face_dynamics(person, plan.num_frames)
      frames += plan.num_frames
      blink_frames += int(np.sum(eye_open < 1))
      closed += int(np.sum(eye_open <= 0.5))
      seconds = plan.num_frames / float(plan.fps)
      assert 0.05 < len(person.blinks) / seconds < 1.0
  assert 0.02 < blink_frames / frames < 0.12 and closed > 0


def test_mouth_opens_with_the_syllables_of_the_voice():
  """Lip motion follows the person's own voice: per-frame audio energy and mouth opening
  correlate, and the mouth stays shut in silent segments."""
  plan = synth.plan_dataset(4, 0, (20.0, 40.0))[2]   # one person
  rng = np.random.default_rng(np.random.SeedSequence([0, plan.index, 1]))
  audio, (mouth,) = synth._audio_track(plan, rng)  # pylint: disable=protected-access
  samples_per_frame = plan.sample_rate / float(plan.fps)
  energy = np.array([np.sqrt(np.mean(audio[int(i * samples_per_frame):
                                           int((i + 1) * samples_per_frame), 0] ** 2))
                     for i in range(plan.num_frames)])
  assert np.corrcoef(energy, mouth)[0, 1] > 0.5
  for s in plan.persons[0].segments:
    if s.audio_code < 0:
      assert not mouth[s.start:s.end].any()
  assert 0.2 < np.mean(mouth > 0.1) < 0.8


def test_a_folder_made_with_other_settings_is_refused_not_mixed(tmp_path):
  """A 3-video set asked again as 4 videos (or another seed) would keep the old plan's
  videos next to the new ones; the generator names the settings that differ instead."""
  out = tmp_path / "synth"
  synth.generate(out, num_videos=3, seed=5, workers=1, seconds=SECONDS)
  before = sorted(p.relative_to(out) for p in out.rglob("*"))
  for kwargs, named in (({"num_videos": 4, "seed": 5}, "num_videos 3 (asked: 4)"),
                        ({"num_videos": 3, "seed": 6}, "seed 5 (asked: 6)")):
    with pytest.raises(synth.SynthDirError, match=re.escape(named)):
      synth.generate(out, workers=1, seconds=SECONDS, **kwargs)
  assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing touched
  again = synth.generate(out, num_videos=3, seed=5, workers=1, seconds=SECONDS)
  assert again["generated"] == [] and len(again["skipped"]) == 3


def test_code_oracle_reads_the_drawn_codes_and_counts_every_labelled_frame(monkeypatch):
  plans = synth.plan_dataset(16, 0, (20.0, 40.0))
  labels, answers = synth.code_oracle(plans, "validation")
  # Exactly the split's labelled frames (the annotation files' labels before any length
  # mismatch), class by class.
  frames = np.concatenate([synth._labels(p, v.num_frames) for v in plans  # pylint: disable=protected-access
                           if v.split == "validation" for p in v.persons if p.annotated])
  np.testing.assert_array_equal(np.bincount(labels, minlength=8),
                                np.bincount(frames[frames >= 0], minlength=8))
  # Segments showing their label's own codes are answered right; noise segments exist and
  # some of them are answered wrong (the set's ceiling is below 1).
  segs = [s for v in plans if v.split == "validation" for p in v.persons if p.annotated
          for s in p.segments if s.label >= 0]
  clean = np.concatenate([np.full(s.end - s.start, (s.face_code, s.audio_code) ==
                                  (synth.FACE_CODE[s.label], synth.AUDIO_CODE[s.label]))
                          for s in segs])
  np.testing.assert_array_equal(answers[clean], labels[clean])
  assert (answers[~clean] != labels[~clean]).any()
  # Without noise codes the oracle is perfect.
  for name in ("_FACE_NOISE_PROB", "_SILENT_PROB", "_VOICE_NOISE_PROB"):
    monkeypatch.setattr(synth, name, 0.0)
  labels, answers = synth.code_oracle(synth.plan_dataset(16, 0, (20.0, 40.0)), "validation")
  np.testing.assert_array_equal(answers, labels)

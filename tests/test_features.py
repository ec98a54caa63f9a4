"""Feature extraction: equals a direct forward pass, aligns audio to video frames, resumes.

The data is a small raw Aff-Wild2 tree (real media with audio at 16, 44.1 and 48 kHz and
30, 25 and 29.97 fps) prepared by the real builder; the encoders are a test-size ViT and
wav2vec 2.0 with random weights saved as init files.
"""

import copy
import fractions
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

import prep_raw
from data_prep import build
from data_prep import tfds_affwild2
from mfer_jax import errors, evaluation, planning, reporting, sharding
from mfer_jax.data import pipeline
from mfer_jax.data import reader as reader_lib
from mfer_jax.data import sources
from mfer_jax.data import store
from mfer_jax.features import cache
from mfer_jax.features import extract
from mfer_jax.features import extractor as extractor_lib
from mfer_jax.models import model as model_lib
from mfer_jax.models import vit
from mfer_jax.models import vit_import
from mfer_jax.models import wav2vec2
from mfer_jax.models import wav2vec2_import

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS / "configs"))
import tiny_features  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _random_init_files(d: pathlib.Path) -> dict[str, str]:
  """Random test-size ViT and wav2vec 2.0 params written as converted init files."""
  v_cfg = vit.vit_config("test", img_size=32)
  a_cfg = wav2vec2.wav2vec2_config("wav2vec2", "test")
  out = {}
  for kind, cfg, module, save in (
      ("image", v_cfg, vit.VisionTransformer, vit_import.save_params),
      ("audio", a_cfg, wav2vec2.Wav2Vec2Model, wav2vec2_import.save_params)):
    model = module(cfg, rngs=nnx.Rngs(7))
    params = {"/".join(map(str, p)): np.asarray(v.get_value())
              for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    rng = np.random.default_rng(1)
    for k in params:   # LayerScale / norms away from their constant inits
      if k.endswith(("gamma", "scale", "bias", "weight_g")):
        params[k] = params[k] + rng.normal(0, 0.2, params[k].shape).astype(np.float32)
    out[kind] = str(d / f"{kind}.safetensors")
    save(out[kind], params, cfg)
  return out


def _config(data_dir, init_files, **features):
  c = tiny_features.get_config(str(data_dir))
  c.model.image.init_file = init_files["image"]
  c.model.audio.init_file = init_files["audio"]
  c.features.update(features)
  return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  raw = tmp_path_factory.mktemp("raw")
  prep_raw.make_raw_tree(raw, num_frames=16)
  data = tmp_path_factory.mktemp("data")
  build.build(raw, data, splits=["train", "validation"], workers=1, log=None)
  inits = _random_init_files(tmp_path_factory.mktemp("init"))
  config = _config(data, inits)
  ext = extractor_lib.FeatureExtractor(config)
  ref = tmp_path_factory.mktemp("features")
  summary = extract.extract(config, str(data), str(ref), media_root=str(raw), log=None,
                            extractor=ext)
  return raw, data, inits, config, ext, ref, summary


def _cache_files(out: pathlib.Path) -> dict[str, bytes]:
  """Every file a reader uses (arrays, metadata); sidecars are bookkeeping."""
  return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
          if p.is_file() and not p.name.endswith(".done.json")}


def test_features_equal_a_direct_forward_pass(prepared):
  raw, data, inits, config, _, ref, summary = prepared
  assert sorted(summary.extracted) == ["train/pair_left", "train/pair_right", "train/solo",
                                       "validation/val"]
  meta = cache.load_metadata(ref)
  assert meta["dims"] == {"image": 32, "audio": 32} and meta["dtype"] == "float16"
  index = store.load_split(data, "validation")
  reader = reader_lib.SplitReader(index, 32)
  examples = [reader[i] for i in range(len(index))]
  got = cache.read_video(ref, "validation", "val", "float16")
  np.testing.assert_array_equal(got["frame"], [ex["frame"] for ex in examples])

  # Faces: the ViT's class token on the records' crops, as training preprocesses them.
  v_cfg = vit.vit_config("test", img_size=32)
  v_model = nnx.eval_shape(lambda: vit.VisionTransformer(v_cfg, rngs=nnx.Rngs(0)))
  from mfer_jax.models import swin_import  # pylint: disable=g-import-not-at-top
  swin_import.apply_to_model(v_model, vit_import.load_vit_params(inits["image"], v_cfg))
  has_face = np.asarray([ex["has_face"] for ex in examples])
  faces = np.stack([ex["face"] for ex in examples])[has_face]
  _, want = v_model(model_lib.face_to_input(jnp.asarray(faces), (32, 32)))
  np.testing.assert_allclose(got["image"][has_face], np.asarray(want), rtol=2e-3,
                             atol=2e-3 * float(np.abs(want).max()))
  assert not got["image"][~has_face].any()

  # Audio: the whole track, normalised, zero-padded to the 4 s chunk, half a receptive field
  # on both ends; frame i takes the mean of the 5 encoder frames centred on column
  # round((i - 1) / fps * 50).
  a_cfg = wav2vec2.wav2vec2_config("wav2vec2", "test")
  a_model = nnx.eval_shape(lambda: wav2vec2.Wav2Vec2Model(a_cfg, rngs=nnx.Rngs(0)))
  swin_import.apply_to_model(a_model,
                             wav2vec2_import.load_wav2vec2_params(inits["audio"], a_cfg))
  entry = store.load_metadata(data)["videos"]["val"]
  wave = extract.load_waveform(str(raw / entry["media"]))
  wave = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
  track = np.zeros(4 * 16000, np.float32)
  track[:wave.size] = wave
  tokens, _ = a_model(jnp.asarray(np.pad(track, (200, 200))[None]))
  tokens = np.asarray(tokens[0])
  fps = fractions.Fraction(entry["fps_fraction"])
  assert fps == fractions.Fraction(30000, 1001)
  want = []
  for i in got["frame"]:
    c = int(fractions.Fraction(int(i) - 1) / fps * 50 + fractions.Fraction(1, 2))
    want.append(tokens[max(c - 2, 0):c + 3].mean(axis=0))
  want = np.stack(want)
  np.testing.assert_allclose(got["audio"], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_a_tfds_built_set_gives_the_same_cache_and_feature_batches(prepared, tmp_path):
  """Extraction without --data_dir from data.source=tfds writes the prepared source's cache
  (resumes, and a rebuilt TFDS split is extracted again), and training's pipeline reads that
  cache the same through either source."""
  raw, _, _, config, ext, ref, _ = prepared
  tfds_dir = tmp_path / "tfds"
  tfds_affwild2.AffWild2Expr(data_dir=str(tfds_dir)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  config = copy.deepcopy(config)
  config.data.source, config.data.tfds_data_dir = "tfds", str(tfds_dir)
  out = tmp_path / "f"
  summary = extract.extract(config, None, str(out), media_root=str(raw), log=None,
                            extractor=ext)
  assert sorted(summary.extracted) == ["train/pair_left", "train/pair_right", "train/solo",
                                       "validation/val"]
  got, want = _cache_files(out), _cache_files(ref)
  meta_got, meta_want = (json.loads(d.pop(cache.METADATA)) for d in (got, want))
  meta_got_dir = meta_got.pop("data_dir")
  assert meta_got_dir == f"tfds:{config.data.tfds_name}@{tfds_dir}"
  meta_want.pop("data_dir")
  assert meta_got == meta_want and got == want   # every array, byte for byte
  again = extract.extract(config, "", str(out), media_root=str(raw), log=None, extractor=ext)
  assert not again.extracted and len(again.resumed) == 4
  shard = next(tfds_dir.rglob("*-validation.array_record-*"))
  stat = shard.stat()
  os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # a rebuilt split
  again = extract.extract(config, "", str(out), media_root=str(raw), log=None, extractor=ext)
  assert again.extracted == ["validation/val"]
  after = _cache_files(out)
  assert json.loads(after.pop(cache.METADATA)) == {**meta_got, "data_dir": meta_got_dir}
  assert after == want
  batches = {}
  for source in sources.SOURCES:
    data = copy.deepcopy(config.data)
    data.source, data.features_dir = source, str(out)
    it = pipeline.make_train_iterator(data, sources.load_split(data, "train"),
                                      process_index=0, process_count=1)
    batches[source] = [next(it) for _ in range(3)]
    it.close()
    batches[source] += list(pipeline.make_eval_pipeline(data, sources.load_split(
        data, "validation"), process_index=0, process_count=1))
  assert batches["tfds"][0]["face"].shape == (8, 32)   # cached image features
  for a, b in zip(batches["tfds"], batches["prepared"], strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_pair_shares_its_audio_features(prepared):
  _, _, _, _, _, ref, _ = prepared
  left = cache.read_video(ref, "train", "pair_left", "float16")
  right = cache.read_video(ref, "train", "pair_right", "float16")
  common, li, ri = np.intersect1d(left["frame"], right["frame"], return_indices=True)
  assert common.size
  np.testing.assert_array_equal(left["audio"][li], right["audio"][ri])


def _click_audio(num_frames, fps, sample_rate, frame, click: bool):
  """Noise, plus a 2 ms burst at t = (frame - 1) / fps. wav2vec 2.0 base normalises each
  first-layer channel over the whole input (GroupNorm), so the burst is kept a few percent of
  the track's energy: it must stand out locally, not rescale every frame."""
  rng = np.random.default_rng(5)
  n = int(num_frames / fps * sample_rate)
  audio = 0.05 * rng.standard_normal(n)
  if click:
    start = int(round((frame - 1) / fps * sample_rate))
    width = sample_rate // 500
    audio[start:start + width] = 0.4 * rng.choice([-1.0, 1.0], width)
  return audio.astype(np.float32)


@pytest.mark.parametrize("fps,sample_rate,frame", [("25", 44100, 33), ("30000/1001", 48000, 47)])
def test_a_click_moves_the_audio_features_at_its_video_frame(prepared, tmp_path, fps,
                                                             sample_rate, frame):
  """Twin videos, with and without a 2 ms click at t = (frame - 1) / fps: the largest change
  of the features is at that frame (features of one 20 ms encoder frame per video frame)."""
  _, _, inits, _, ext, _, _ = prepared
  raw = tmp_path / "raw"
  rate = fractions.Fraction(fps)
  n = int(3 * rate)
  for name, click in (("click", True), ("quiet", False)):
    # .avi holds PCM audio: the twins differ by the click only (AAC's coding noise would
    # differ all along the track after it).
    prep_raw.write_media(raw / "batch1" / f"{name}.avi", n, fps=rate, sample_rate=sample_rate,
                         audio=_click_audio(n, rate, sample_rate, frame, click))
    prep_raw.write_annotation(raw, "train", name, [0] * n)
  data = tmp_path / "data"
  build.build(raw, data, splits=["train"], workers=1, log=None)
  # No per-track normalisation: the click would rescale the whole track.
  config = _config(data, inits, audio_pool_seconds=0.02, audio_normalize=False)
  ext.config = config   # same encoders; one-column pooling
  try:
    extract.extract(config, str(data), str(tmp_path / "f"), splits=["train"],
                    media_root=str(raw), log=None, extractor=ext)
  finally:
    ext.config = _config(data, inits)
  click = cache.read_video(tmp_path / "f", "train", "click", "float16")
  quiet = cache.read_video(tmp_path / "f", "train", "quiet", "float16")
  change = np.linalg.norm(click["audio"] - quiet["audio"], axis=1)
  assert int(click["frame"][np.argmax(change)]) == frame, change[frame - 4:frame + 3]
  assert change[frame - 1] > 2 * np.median(change)


def test_killed_extraction_resumed_equals_uninterrupted(prepared, tmp_path):
  raw, data, inits, _, _, ref, _ = prepared
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "mfer_jax.tools.extract",
         f"--config={TESTS / 'configs' / 'tiny_features.py'}:{data}",
         f"--config.model.image.init_file={inits['image']}",
         f"--config.model.audio.init_file={inits['audio']}",
         f"--data_dir={data}", f"--out={out}", f"--media_root={raw}"]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  deadline = time.time() + 600
  while not list(out.glob("*/*.done.json")) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  finished = len(list(out.glob("*/*.done.json")))
  assert finished >= 1
  if finished < 4:   # killed mid-extraction: nothing may look complete
    assert not (out / cache.METADATA).exists()
  rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"{finished} finished earlier" in rerun.stdout
  assert _cache_files(out) == _cache_files(ref)


def test_a_cache_of_other_weights_or_parameters_is_refused_with_both_hashes(prepared,
                                                                            tmp_path):
  _, data, inits, _, _, ref, _ = prepared
  config = _config(data, inits)
  config.data.features_dir = str(ref)
  assert cache.check_config(config)["dims"] == {"image": 32, "audio": 32}
  meta = cache.load_metadata(ref)
  other = _config(data, inits, audio_pool_seconds=0.5)
  other.data.features_dir = str(ref)
  with pytest.raises(cache.FeatureCacheError) as e:
    cache.check_config(other)
  want = cache.spec_hash(cache.spec(other, store.load_metadata(data)["features"]))
  assert meta["spec_hash"][:12] in str(e.value) and want[:12] in str(e.value)
  assert "features.audio_pool_seconds" in str(e.value)
  copy = tmp_path / "audio.safetensors"
  params = wav2vec2_import.load_wav2vec2_params(inits["audio"], wav2vec2.wav2vec2_config(
      "wav2vec2", "test"))
  params["encoder/layer_norm/bias"] = params["encoder/layer_norm/bias"] + 1.0
  wav2vec2_import.save_params(str(copy), params, wav2vec2.wav2vec2_config("wav2vec2", "test"))
  swapped = _config(data, dict(inits, audio=str(copy)))
  swapped.data.features_dir = str(ref)
  with pytest.raises(cache.FeatureCacheError) as e:
    cache.check_config(swapped)
  assert meta["weights"]["audio"][:12] in str(e.value)
  assert cache.weights(swapped)["audio"][:12] in str(e.value)


def test_head_trains_on_the_cache_and_predict_runs_the_encoders_first(prepared, tmp_path):
  """Training reads the cached features; prediction on the raw video recomputes them with
  the encoders (the same values) and gives the head the same inputs."""
  from mfer_jax.prediction import frames as frames_lib  # pylint: disable=g-import-not-at-top
  from mfer_jax.prediction import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from mfer_jax.prediction import videos  # pylint: disable=g-import-not-at-top
  from mfer_jax.training import loop  # pylint: disable=g-import-not-at-top
  raw, data, inits, _, _, ref, _ = prepared
  config = _config(data, inits)
  config.data.features_dir = str(ref)
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert 0.0 <= result["macro_f1"] <= 1.0
  assert (tmp_path / "run" / "feature_cache.json").is_file()
  # --mode=eval: the primary evaluator reads the same cache and equals the run's own
  # evaluation of the step it restores.
  evaluated = loop.evaluate_workdir(config, str(tmp_path / "run"))
  own = {e["step"]: e for e in evaluation.read_evals(tmp_path / "run")}[evaluated["step"]]
  assert {k: v for k, v in evaluated.items() if k != "path"} == own
  # The planner compiles the same head-only step: its params are the head's, exactly.
  head = nnx.state(nnx.eval_shape(lambda: model_lib.ExpressionModel(
      config.model, rngs=nnx.Rngs(0), from_features=True)), nnx.Param)
  plan = planning.plan_step(config, sharding.make_mesh((-1, 1, 1)), 16)
  assert plan.param_bytes == sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(head))
  # float32 features [32] x 2, has_face and mask (bool), label (int32), per device.
  assert plan.batch_bytes == 16 * (2 * 32 * 4 + 1 + 1 + 4) // jax.device_count()

  predictor = predictor_lib.Predictor(tmp_path / "run", which="latest", batch_size=16)
  assert predictor.from_features
  entry = store.load_metadata(data)["videos"]["val"]
  video = raw / entry["media"]
  params = videos.feature_params(tmp_path / "run")
  inputs, = frames_lib.read_video(video, params, predictor.face_size,
                                  raw / "cropped_aligned" / "val", 1)
  image, audio = predictor.encode(inputs.face, inputs.mel, inputs.has_face, video, inputs.fps)
  cached = cache.read_video(ref, "validation", "val", "float16")
  rows = cached["frame"] - 1
  np.testing.assert_allclose(audio[rows], cached["audio"], rtol=2e-3,
                             atol=2e-3 * np.abs(cached["audio"]).max())
  np.testing.assert_allclose(image[rows], cached["image"], rtol=2e-3,
                             atol=2e-3 * np.abs(cached["image"]).max())
  out, = videos.predict_video(predictor, params, video, tmp_path / "val.txt",
                              crops=raw / "cropped_aligned" / "val")
  assert out.num_frames == entry["num_frames"]
  probs, _ = predictor.predict(image, audio, inputs.has_face)
  lines = (tmp_path / "val.txt").read_text().splitlines()[1:]
  from mfer_jax.prediction import labels as labels_lib  # pylint: disable=g-import-not-at-top
  want = labels_lib.fill_no_face(probs, inputs.has_face, "audio").argmax(-1)
  assert [int(v) for v in lines] == want.tolist()


def test_a_video_without_audio_gets_silent_features_and_a_warning(prepared, tmp_path):
  _, _, inits, _, ext, _, _ = prepared
  raw = tmp_path / "raw"
  prep_raw.write_media(raw / "batch1" / "mute.mp4", 12, fps="25", sample_rate=None)
  prep_raw.write_annotation(raw, "train", "mute", [1] * 12)
  data = tmp_path / "data"
  build.build(raw, data, splits=["train"], workers=1, log=None)
  summary = extract.extract(_config(data, inits), str(data), str(tmp_path / "f"),
                            splits=["train"], media_root=str(raw), log=None, extractor=ext)
  assert len(summary.warnings) == 1 and "mute.mp4: no audio track" in summary.warnings[0]
  assert "features of silence" in summary.warnings[0]
  assert cache.load_metadata(tmp_path / "f")["warnings"] == summary.warnings
  got = cache.read_video(tmp_path / "f", "train", "mute", "float16")
  silence = ext.waveform_features(np.zeros(0, np.float32), fractions.Fraction(25),
                                  got["frame"])
  np.testing.assert_allclose(got["audio"], cache.to_storage(silence, "float16").astype(
      np.float32))


# ----------------------------------------------------------------------------- temporal heads

# Clips of T=4 frames, eval/predict windows 2 apart: every frame is in T / hop = 2 windows.
CLIP, HOP = 4, 2


def _temporal_config(data, inits, ref, head="transformer"):
  config = _config(data, inits)
  config.data.features_dir = str(ref)
  config.data.sequence.update(length=CLIP, stride=1, hop=HOP)
  config.data.sampling.epoch_size = 16          # 2 steps of 8 clips per epoch, 2 epochs
  config.model.temporal.update(name=head, num_heads=4, num_layers=1, dilations=(1, 2))
  config.train.checkpoint_every_steps = 2
  return config


@pytest.fixture(scope="module")
def temporal_run(prepared, tmp_path_factory):
  """A finished 4-step transformer-head run on the cache (evaluated at steps 2 and 4)."""
  from mfer_jax.training import loop  # pylint: disable=g-import-not-at-top
  _, data, inits, _, _, ref, _ = prepared
  config = _temporal_config(data, inits, ref)
  workdir = tmp_path_factory.mktemp("temporal_run")
  return config, workdir, loop.train_and_evaluate(config, str(workdir))


def test_feature_clips_stay_in_one_video_and_mask_padding(prepared, temporal_run):
  """Train clips read through the feature reader (the pixel route's read_clip): each holds
  the cached rows of one video at consecutive frames, padded slots are zero, unlabelled and
  out of the loss's mask; the planner's batch has the same layout, two hosts read halves of
  it, and the iterator state restores the same next batch."""
  from mfer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  _, data, _, _, _, ref, _ = prepared
  config, _, _ = temporal_run
  index = store.load_split(data, "train")
  it = pipeline.make_train_iterator(config.data, index)
  batch = next(it)
  rows = it.sampler.epoch_clips(0)[:config.data.batch_size]
  present = rows >= 0
  assert batch["face"].shape == (8, CLIP, 32) and batch["mel"].shape == (8, CLIP, 32)
  assert (~present).any() and present.any(axis=1).all()      # padding is exercised
  for k in range(rows.shape[0]):
    real = rows[k][present[k]]
    video = index.video_id[real]
    assert np.unique(video).size == 1                        # never across a video
    name = index.videos[video[0]]
    cached = cache.read_video(ref, "train", name, "float16")
    first = int(np.flatnonzero(index.video_id == video[0])[0])
    np.testing.assert_array_equal(np.diff(index.frame[real]), np.diff(np.flatnonzero(
        present[k])))                                        # consecutive frames, stride 1
    np.testing.assert_array_equal(batch["face"][k][present[k]], cached["image"][real - first])
    np.testing.assert_array_equal(batch["mel"][k][present[k]], cached["audio"][real - first])
  np.testing.assert_array_equal(batch["present"], present)
  assert not batch["face"][~present].any() and not batch["mel"][~present].any()
  np.testing.assert_array_equal(batch["label"][~present], -1)
  np.testing.assert_array_equal(batch["mask"], present & (batch["label"] >= 0))
  # The planner lays out the same batch (shapes, dtypes) for compiling ahead of time.
  plan = planning.abstract_batch(config, config.data.batch_size, sharding.make_mesh((-1, 1, 1)))
  assert {k: (v.shape, v.dtype) for k, v in plan.items()} == {
      k: (batch[k].shape, batch[k].dtype) for k in plan}
  # Two hosts read disjoint halves of the same global batch.
  halves = [next(pipeline.make_train_iterator(config.data, index, process_index=p,
                                              process_count=2)) for p in range(2)]
  for k in batch:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), batch[k], err_msg=k)
  state = it.get_state()
  expected = next(it)
  restored = pipeline.make_train_iterator(config.data, index)
  restored.set_state(state)
  for k, v in next(restored).items():
    np.testing.assert_array_equal(v, expected[k], err_msg=k)
  it.close()
  restored.close()


def test_temporal_head_on_the_cache_scores_each_valid_frame_once_and_equals_the_pixel_path(
    prepared, temporal_run):
  """The run trained and evaluated on feature windows: every valid validation frame is in
  T / hop windows and counted once (in training's evaluations, --mode=eval's and the
  report's). Its head on cached feature windows gives the logits of
  the same windows built from the encoders run on the video's pixels and waveform (what
  predict does), within the cache's float16 rounding; and predict's labels are the window
  averages of those logits."""
  from mfer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mfer_jax.prediction import frames as frames_lib  # pylint: disable=g-import-not-at-top
  from mfer_jax.prediction import labels as labels_lib  # pylint: disable=g-import-not-at-top
  from mfer_jax.prediction import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from mfer_jax.prediction import videos  # pylint: disable=g-import-not-at-top
  from mfer_jax.training import loop  # pylint: disable=g-import-not-at-top
  raw, data, _, _, _, _, _ = prepared
  config, workdir, result = temporal_run
  index = store.load_split(data, "validation")
  valid = index.label >= 0
  assert result["num_examples"] == valid.sum() == np.sum(result["confusion"])
  assert [e["num_examples"] for e in evaluation.read_evals(workdir)] == [valid.sum()] * 2
  batches = list(pipeline.make_eval_pipeline(config.data, index))
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  scored = rows["index"][rows["mask"]]
  np.testing.assert_array_equal(np.bincount(scored, minlength=len(index)),
                                np.where(valid, CLIP // HOP, 0))
  # --mode=eval reads the same cache and equals the run's own evaluation of that step.
  evaluated = loop.evaluate_workdir(config, str(workdir), which="latest")
  assert {k: v for k, v in evaluated.items() if k != "path"} == evaluation.read_evals(
      workdir)[-1]
  best = max(evaluation.read_evals(workdir), key=lambda e: e["macro_f1"])
  report = reporting.write_report(workdir).read_text()
  assert f"| {best['macro_f1']:.4f} | {best['accuracy']:.4f} | {valid.sum()} |" in report

  predictor = predictor_lib.Predictor(workdir, which="latest", batch_size=16 * CLIP)
  entry = store.load_metadata(data)["videos"]["val"]
  video = raw / entry["media"]
  params = videos.feature_params(workdir)
  inputs, = frames_lib.read_video(video, params, predictor.face_size,
                                  raw / "cropped_aligned" / "val", 1)
  image, audio = predictor.encode(inputs.face, inputs.mel, inputs.has_face, video, inputs.fps)
  np.testing.assert_array_equal(inputs.has_face[index.frame - 1], index.has_face)

  def head(face, mel, has_face, present):
    """The run's logits for windows, 16 per call (the predictor's jitted clip forward)."""
    out = []
    for start in range(0, face.shape[0], 16):
      chunk = [a[start:start + 16] for a in (face, mel, has_face, present)]
      pad = 16 - chunk[0].shape[0]
      chunk = [np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in chunk]
      got, _ = predictor._forward_clips(predictor._params, *chunk)  # pylint: disable=protected-access
      out.append(np.asarray(got)[:16 - pad])
    return np.concatenate(out)

  # The eval windows, from the cache and from the encoders' features of the same frames.
  present = rows["present"]
  frame_row = index.frame[np.maximum(rows["index"], 0)] - 1
  at = lambda a, shift=0: np.where(  # noqa: E731
      present[..., None], a[np.clip(frame_row + shift, 0, len(a) - 1)], 0)
  cached = head(rows["face"], rows["mel"], rows["has_face"], present)[present]
  pixels = head(at(image), at(audio), rows["has_face"], present)[present]
  scale = np.abs(pixels).max()
  # Float32 throughout. The pixel path's features rounded to the cache's float16 give the
  # cached path's logits (measured: identical); unrounded, float16's 2^-11 relative rounding
  # moved no logit by more than 2.1e-4 of the largest (measured), against 0.69 for the same
  # windows one frame later, so both comparisons can fail.
  stored = lambda a: cache.to_storage(a, "float16").astype(np.float32)  # noqa: E731
  rounded = head(at(stored(image)), at(stored(audio)), rows["has_face"], present)[present]
  np.testing.assert_allclose(cached, rounded, rtol=0, atol=2e-5 * scale)
  np.testing.assert_allclose(cached, pixels, rtol=0, atol=1e-3 * scale)
  shifted = head(at(image, 1), at(audio, 1), rows["has_face"], present)[present]
  assert np.abs(shifted - pixels).max() > 100 * 1e-3 * scale

  # Predict: the encoders, then the head over windows of the whole video, T=4 hop 2 written
  # out by hand; each frame's label is from its mean logits over its two windows.
  out, = videos.predict_video(predictor, params, video, workdir / "val.txt",
                              crops=raw / "cropped_aligned" / "val")
  n = inputs.face.shape[0]
  assert out.num_frames == entry["num_frames"] == n
  windows = np.asarray([[-1, -1, 0, 1]] + [[s, s + 1, s + 2, s + 3] for s in range(0, n, HOP)])
  windows[windows >= n] = -1
  q = windows >= 0
  take = np.maximum(windows, 0)
  got = head(np.where(q[..., None], image[take], 0), np.where(q[..., None], audio[take], 0),
             inputs.has_face[take] & q, q)
  sums = np.zeros((n, 8))
  np.add.at(sums, windows[q], got[q])
  np.testing.assert_array_equal(np.bincount(windows[q]), CLIP // HOP)
  mean = sums / (CLIP // HOP)
  probs = np.exp(mean - mean.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = labels_lib.fill_no_face(probs, inputs.has_face, "audio").argmax(-1)
  lines = (workdir / "val.txt").read_text().splitlines()[1:]
  assert [int(v) for v in lines] == want.tolist()


def test_a_temporal_run_on_a_cache_without_its_eval_split_is_a_one_line_error(prepared,
                                                                             tmp_path):
  """A cache extracted for train only, and a temporal run that evaluates on validation:
  refused before anything is built, in one line naming the split and the fix."""
  from mfer_jax.training import loop  # pylint: disable=g-import-not-at-top
  _, data, inits, _, _, ref, _ = prepared
  partial = tmp_path / "train_only"
  shutil.copytree(ref, partial)
  meta = json.loads((partial / cache.METADATA).read_text())
  del meta["splits"]["validation"]
  (partial / cache.METADATA).write_text(json.dumps(meta))
  shutil.rmtree(partial / "validation")
  config = _temporal_config(data, inits, partial)
  with pytest.raises(cache.FeatureCacheError) as e:
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert isinstance(e.value, errors.UserError) and "\n" not in str(e.value)
  assert "split 'validation'" in str(e.value) and "--splits=train,validation" in str(e.value)
  assert not (tmp_path / "run" / "checkpoints").exists()

"""Clips and windows: geometry, video boundaries, clip resampling targets, clip batches."""

import numpy as np
import pytest

from mfer_jax import errors
from mfer_jax.data import clips, config, pipeline, sampling, store
from mfer_jax.testing import fake_data

PROBS = np.asarray(fake_data.AFFWILD2_CLASS_PROBS)


def _segmented_index(seed=0, num_videos=20, lengths=(150, 2500), mean_segment=60,
                     invalid=0.1, keep_invalid=False):
  """Labels in segments (as annotated video), -1 runs without records, one video per id."""
  rng = np.random.default_rng(seed)
  label, video_id, frame = [], [], []
  for v in range(num_videos):
    n = int(rng.integers(*lengths))
    runs = rng.geometric(1 / mean_segment, size=n)
    lab = np.repeat(rng.choice(8, size=n, p=PROBS), runs)[:n]
    lab = np.where(np.repeat(rng.random(n) < invalid, runs)[:n], -1, lab)
    keep = np.ones(n, bool) if keep_invalid else lab >= 0
    label.append(lab[keep])
    frame.append(np.arange(1, n + 1)[keep])
    video_id.append(np.full(keep.sum(), v))
  return (np.concatenate(label).astype(np.int32), np.concatenate(video_id).astype(np.int32),
          np.concatenate(frame).astype(np.int32))


def _frame_labels(rows, label):
  return np.where(rows >= 0, label[np.maximum(rows, 0)], -1)


@pytest.mark.parametrize("length,stride", [(1, 1), (5, 1), (4, 3)])
def test_clips_never_cross_a_video_and_pad_missing_frames(length, stride):
  # Short videos (some shorter than a clip), -1 frames without records, unsorted video sizes.
  label, video_id, frame = _segmented_index(num_videos=7, lengths=(2, 30), mean_segment=3,
                                            invalid=0.3)
  table = clips.ClipTable(label, video_id, frame, length, stride)
  rows = table.records(np.arange(table.num_clips))
  assert rows.shape == (table.num_clips, length)
  lookup = {(int(v), int(f)): i for i, (v, f) in enumerate(zip(video_id, frame))}
  if length == 1:
    np.testing.assert_array_equal(rows[:, 0], np.arange(label.size))   # frame mode: records
    return
  video, start = table.video_and_start(np.arange(table.num_clips))
  pad = (length - 1) * stride
  for k in range(table.num_clips):
    want = [lookup.get((int(video[k]), int(start[k]) + j * stride), -1) for j in range(length)]
    np.testing.assert_array_equal(rows[k], want)        # same video, frames at the stride
  assert {int(r) for r in rows[rows >= 0]} == set(range(label.size))
  # Starts run from 1 - pad to the video's last frame: each frame is in exactly T clips.
  for v in np.unique(video_id):
    last = frame[video_id == v].max()
    np.testing.assert_array_equal(np.sort(start[video == v]), np.arange(1 - pad, last + 1))
  np.testing.assert_array_equal(np.bincount(rows[rows >= 0], minlength=label.size), length)
  counts = table.class_counts()
  for c in range(8):
    np.testing.assert_array_equal(counts[:, c], (_frame_labels(rows, label) == c).sum(1))


def test_clip_longer_than_its_video_is_padded():
  label = np.array([3, 4, 4], np.int32)
  table = clips.ClipTable(label, np.zeros(3, np.int32), np.array([1, 2, 3], np.int32), 8, 1)
  rows = table.records(np.arange(table.num_clips))
  assert rows.shape == (3 + 7, 8)
  np.testing.assert_array_equal(rows[0], [-1, -1, -1, -1, -1, -1, -1, 0])   # starts at 1 - 7
  np.testing.assert_array_equal(rows[7], [0, 1, 2, -1, -1, -1, -1, -1])     # starts at 1
  np.testing.assert_array_equal(rows[9], [2, -1, -1, -1, -1, -1, -1, -1])   # starts at 3
  w = clips.windows(np.zeros(3), np.array([1, 2, 3]), np.ones(3, bool),
                    clips.SequenceOptions(8, 1, 8))
  np.testing.assert_array_equal(w, [[0, 1, 2, -1, -1, -1, -1, -1]])


def test_sequence_options_are_checked_at_config_time():
  with pytest.raises(errors.UsageError, match="hop=5 is larger than .*length=4"):
    clips.SequenceOptions(length=4, hop=5)
  with pytest.raises(errors.UsageError, match="stride"):
    clips.SequenceOptions(length=4, stride=0)
  assert clips.SequenceOptions(length=16).window_hop == 8
  assert clips.SequenceOptions(length=1).window_hop == 1


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_clip_resampling_gives_labelled_frames_the_target_class_frequencies(alpha):
  label, video_id, frame = _segmented_index()
  seq = clips.SequenceOptions(16, 2)
  s = sampling.EpochSampler(label, video_id, frame,
                            sampling.SamplingOptions(alpha_start=alpha, alpha_shape="constant",
                                                     epoch_size=20_000), seed=0, sequence=seq)
  # Target: frame mode's class mass n_c^(1 - alpha) / sum_k n_k^(1 - alpha), from the labels.
  n = np.bincount(label[label >= 0], minlength=8).astype(float)
  target = n ** (1 - alpha) / (n ** (1 - alpha)).sum()
  candidates, p = s.distribution(0)
  m = s.clip_class_counts(candidates).astype(float)
  expected = p @ m / (p @ m).sum()
  np.testing.assert_allclose(expected, target, rtol=1e-9)   # exact in expectation
  if alpha == 0.0:
    np.testing.assert_allclose(p, 1 / p.size, rtol=1e-9)    # natural: uniform clip draws
  # A drawn epoch: frequencies within 4 standard errors of the target. Frames of one clip are
  # correlated, so the error is computed per clip: Var(m_c - t_c M) under p, over draws.
  e = s.epoch_clips(0)
  labs = _frame_labels(e, label)
  got = np.bincount(labs[labs >= 0], minlength=8) / (labs >= 0).sum()
  resid = m - target * m.sum(1, keepdims=True)
  sigma = np.sqrt((p @ resid ** 2) / e.shape[0]) / (p @ m.sum(1))
  assert (np.abs(got - target) < 4 * sigma).all(), (got, target, sigma)
  # Clips without a labelled frame are never drawn.
  assert ((labs >= 0).sum(1) > 0).all()


def test_pure_clips_get_the_frame_weights_and_adaptive_f1_applies():
  # One class per video: every clip is pure, so clip weights are frame mode's class weights.
  rng = np.random.default_rng(1)
  sizes = rng.integers(40, 400, size=16)
  label = np.concatenate([np.full(n, v % 8) for v, n in enumerate(sizes)]).astype(np.int32)
  video_id = np.concatenate([np.full(n, v) for v, n in enumerate(sizes)]).astype(np.int32)
  frame = np.concatenate([np.arange(1, n + 1) for n in sizes]).astype(np.int32)
  f1 = np.array([0.9, 0.1, 0.2, 0.0, 0.7, 0.5, 0.4, 1.0])
  base = sampling.EpochSampler(label, video_id, frame, sampling.SamplingOptions(
      alpha_start=0.5, alpha_shape="constant", adaptive_beta=2.0), seed=0,
      sequence=clips.SequenceOptions(8, 1))
  s = base.with_class_f1(f1, 0)
  ids, p = s.distribution(0)
  lab = label[s.clips.records(ids)[np.arange(ids.size), (s.clips.records(ids) >= 0).argmax(1)]]
  n = np.bincount(label, minlength=8).astype(float)
  w = n ** -0.5 * np.maximum(1 - f1, 0.01) ** 2
  np.testing.assert_allclose(p, w[lab] / w[lab].sum(), rtol=1e-9)
  assert s.epoch_size == -(-ids.size // 8)


def test_clip_stratification_and_natural_mode():
  label, video_id, frame = _segmented_index(num_videos=6, lengths=(100, 300))
  seq = clips.SequenceOptions(4, 1)
  s = sampling.EpochSampler(label, video_id, frame, sampling.SamplingOptions(stratify_chunk=10),
                            seed=3, sequence=seq)
  video, start = s.clips.video_and_start(np.arange(s.clips.num_clips))
  for epoch in range(3):
    ids, _ = s.distribution(epoch)
    keys = list(zip(video[ids], (start[ids] + 3 - 1) // 10))
    assert len(set(keys)) == len(keys) == s.num_candidates     # one clip per (video, chunk)
  nat = sampling.EpochSampler(label, video_id, frame, sampling.SamplingOptions(
      mode="natural", epoch_size=10_000), seed=0, sequence=seq)
  ids = nat.epoch_indices(0)
  n_cand = nat.num_candidates
  counts = np.bincount(ids, minlength=nat.clips.num_clips)
  assert counts.max() - counts[counts > 0].min() <= 1 and (counts > 0).sum() == n_cand


@pytest.mark.parametrize("length,stride,hop", [(4, 1, 2), (6, 2, 3), (5, 1, 5), (4, 1, 3)])
def test_windows_cover_every_target_frame(length, stride, hop):
  label, video_id, frame = _segmented_index(num_videos=5, lengths=(3, 60), mean_segment=4,
                                            invalid=0.3, keep_invalid=True)
  target = label >= 0
  opts = clips.SequenceOptions(length, stride, hop)
  w = clips.windows(video_id, frame, target, opts)
  assert w.shape[1] == length
  cover = np.bincount(w[w >= 0], minlength=label.size)
  assert (cover[target] >= 1).all()
  if length % hop == 0:
    np.testing.assert_array_equal(cover[target], length // hop)
  for row in w:
    real = row[row >= 0]
    assert np.unique(video_id[real]).size == 1                 # one video per window
    j = np.flatnonzero(row >= 0)
    # Frames sit at their slot: frame = first frame + slot * stride.
    first = frame[row[j[0]]] - j[0] * stride
    np.testing.assert_array_equal(frame[row[j]], first + j * stride)
    assert target[real].any()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return fake_data.make_fake_dataset(
      tmp_path_factory.mktemp("clipdata"), splits={"train": 4, "validation": 3},
      frames_per_video=(6, 40), invalid_fraction=0.2, no_face_fraction=0.2, mel_shape=(16, 20),
      face_size=32, seed=0)


def _cfg(data_dir, **seq):
  cfg = config.default_data_config()
  cfg.data_dir = str(data_dir)
  cfg.face_size = 32
  cfg.batch_size = 4
  cfg.eval_batch_size = 4
  cfg.sampling.epoch_size = 12
  cfg.sequence.update(seq)
  return cfg


def test_clip_batches_follow_the_drawn_clips(data_dir):
  cfg = _cfg(data_dir, length=5, stride=2)
  index = store.load_split(data_dir, "train")
  it = pipeline.make_train_iterator(cfg, index)
  batch = next(it)
  rows = it.sampler.epoch_clips(0)[:4]
  assert batch["face"].shape == (4, 5, 32, 32, 3) and batch["mel"].shape == (4, 5, 16, 20)
  present = rows >= 0
  np.testing.assert_array_equal(batch["present"], present)
  np.testing.assert_array_equal(batch["label"], _frame_labels(rows, index.label))
  np.testing.assert_array_equal(batch["mask"], present & (batch["label"] >= 0))
  np.testing.assert_array_equal(batch["has_face"], present & index.has_face[np.maximum(rows, 0)])
  assert not batch["face"][~present].any() and not batch["mel"][~present].any()
  assert batch["mask"].any(axis=1).all()     # every clip has a frame for the loss
  # Hosts read disjoint halves of the same global batches.
  halves = [next(pipeline.make_train_iterator(cfg, index, process_index=p, process_count=2))
            for p in range(2)]
  for k in batch:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), batch[k], err_msg=k)
  state = it.get_state()
  expected = next(it)
  restored = pipeline.make_train_iterator(cfg, index)
  restored.set_state(state)
  for k, v in next(restored).items():
    np.testing.assert_array_equal(v, expected[k], err_msg=k)


def test_clip_face_augmentation_is_shared_by_the_frames_of_a_clip(data_dir):
  # Every frame of the clip reads the same record content: identical faces after augmenting.
  index = store.load_split(data_dir, "train")
  reader = index.open_reader(32)
  r = int(np.flatnonzero(index.has_face & (index.label >= 0))[0])
  aug = pipeline.augment.Augmenter()
  clip = pipeline.read_clip(reader, np.array([r, r, -1, r]), np.ones(4, bool), aug, (0, 1, 2))
  np.testing.assert_array_equal(clip["face"][0], clip["face"][3])
  assert not np.array_equal(clip["face"][0], reader[r]["face"])    # it was augmented
  assert not np.array_equal(clip["mel"][0], clip["mel"][1])        # per-frame SpecAugment


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_window_eval_scores_every_valid_frame(data_dir, hosts):
  cfg = _cfg(data_dir, length=4, stride=1, hop=2)
  cfg.eval_batch_size = 6
  index = store.load_split(data_dir, "validation")
  valid = np.flatnonzero(index.label >= 0)
  pipes = [pipeline.make_eval_pipeline(cfg, index, process_index=p, process_count=hosts)
           for p in range(hosts)]
  assert len({len(p) for p in pipes}) == 1
  per_host = [list(p) for p in pipes]
  rows = {k: np.concatenate([b[k] for bs in zip(*per_host) for b in bs]) for k in per_host[0][0]}
  scored = rows["index"][rows["mask"]]
  assert set(scored.tolist()) == set(valid.tolist())
  np.testing.assert_array_equal(np.bincount(scored, minlength=len(index))[valid], 2)
  np.testing.assert_array_equal(rows["label"][rows["mask"]], index.label[scored])
  assert (index.label[rows["index"][rows["present"] & ~rows["mask"]]] < 0).all()


def test_main_refuses_a_hop_larger_than_the_clip_in_one_line(tmp_path):
  import pathlib, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  root = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run(
      [sys.executable, str(root / "main.py"), f"--config={root / 'tests/configs/tiny.py'}",
       f"--workdir={tmp_path}", "--config.data.sequence.length=4",
       "--config.data.sequence.hop=5"], cwd=root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == errors.EXIT_USAGE, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "error: data.sequence.hop=5 is larger than data.sequence.length=4: windows would skip "
      "frames; use a hop between 1 and the length (0 = length // 2)"]
  assert not any(tmp_path.iterdir())      # nothing was started


def test_clip_batches_are_the_same_with_worker_processes(data_dir):
  cfg = _cfg(data_dir, length=5, stride=2)
  index = store.load_split(data_dir, "train")
  expected = [next(it) for it in [pipeline.make_train_iterator(cfg, index)] for _ in range(3)]
  cfg.num_workers = 2
  it = pipeline.make_train_iterator(cfg, index)
  try:
    for want in expected:
      got = next(it)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  finally:
    it.close()

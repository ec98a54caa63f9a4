"""Epoch draws: class frequencies, alpha schedule, stratification, adaptive weights, determinism."""

import math

import numpy as np
import pytest

from mfer_jax.data import sampling

# An Aff-Wild2-like imbalance (~2% for the rare classes) plus unusable -1 frames.
COUNTS = np.array([3000, 240, 170, 180, 1300, 1100, 430, 2800])


def _index(counts=COUNTS, invalid=500, seed=0, frames_per_video=250):
  """Shuffled labels with -1 frames, cut into videos of consecutive frames."""
  rng = np.random.default_rng(seed)
  label = np.concatenate([np.repeat(np.arange(8), counts), np.full(invalid, -1)])
  label = rng.permutation(label).astype(np.int32)
  n = label.size
  video_id = (np.arange(n) // frames_per_video).astype(np.int32)
  frame = (np.arange(n) % frames_per_video + 1).astype(np.int32)
  return label, video_id, frame


def _sampler(label, video_id, frame, seed=0, **options):
  return sampling.EpochSampler(label, video_id, frame, sampling.SamplingOptions(**options),
                               seed=seed)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_class_frequencies_match_target(alpha):
  label, video_id, frame = _index()
  draws = 40_000
  s = _sampler(label, video_id, frame, alpha_start=alpha, alpha_shape="constant",
               epoch_size=draws)
  # Reference: w_i ∝ n_c^-alpha, so class c gets n_c^(1-alpha) / sum_k n_k^(1-alpha).
  mass = COUNTS.astype(float) ** (1 - alpha)
  target = mass / mass.sum()
  for epoch in (0, 1):
    got = s.epoch_indices(epoch)
    assert got.shape == (draws,)
    assert (label[got] >= 0).all(), "a -1 frame was drawn"
    freq = np.bincount(label[got], minlength=8) / draws
    sigma = np.sqrt(target * (1 - target) / draws)
    # Per-class binomial test at 4 sigma (false alarm < 1e-4 per class).
    assert (np.abs(freq - target) < 4 * sigma).all(), (freq, target)
  # The per-record probabilities themselves, exactly.
  candidates, p = s.distribution(0)
  np.testing.assert_array_equal(candidates, np.flatnonzero(label >= 0))
  ref = COUNTS[label[candidates]].astype(float) ** -alpha
  np.testing.assert_allclose(p, ref / ref.sum(), rtol=1e-12)


def test_epochs_differ_and_seed_reproduces_stream():
  label, video_id, frame = _index()
  a = _sampler(label, video_id, frame, seed=7)
  b = _sampler(label, video_id, frame, seed=7)
  c = _sampler(label, video_id, frame, seed=8)
  e0, e1 = a.epoch_indices(0), a.epoch_indices(1)
  assert a.epoch_size == (label >= 0).sum()   # default: one draw per candidate frame
  assert not np.array_equal(e0, e1)
  # Draws with replacement from ~9k frames: two epochs share few positions by chance.
  assert (e0 == e1).mean() < 0.01
  for epoch in (0, 1, 5):
    np.testing.assert_array_equal(a.epoch_indices(epoch), b.epoch_indices(epoch))
  assert not np.array_equal(a.epoch_indices(0), c.epoch_indices(0))
  # Epochs are independent of the order they are asked for (workers jump around).
  fresh = _sampler(label, video_id, frame, seed=7)
  np.testing.assert_array_equal(fresh.epoch_indices(5), a.epoch_indices(5))


def test_alpha_schedule_values():
  kw = dict(start=1.0, end=0.3, decay_epochs=10)
  linear = [sampling.alpha_at(e, shape="linear", **kw) for e in (0, 2, 5, 10, 25)]
  np.testing.assert_allclose(linear, [1.0, 0.86, 0.65, 0.3, 0.3])
  cosine = [sampling.alpha_at(e, shape="cosine", **kw) for e in (0, 2, 5, 10, 25)]
  # 0.3 + 0.7 * (1 + cos(pi * e / 10)) / 2
  np.testing.assert_allclose(cosine, [1.0, 0.3 + 0.35 * (1 + math.cos(0.2 * math.pi)), 0.65,
                                      0.3, 0.3])
  assert sampling.alpha_at(25, shape="constant", **kw) == 1.0
  assert sampling.alpha_at(0, start=1.0, end=0.3, decay_epochs=0, shape="linear") == 0.3
  with pytest.raises(ValueError, match="alpha_shape"):
    sampling.alpha_at(0, shape="step", **kw)
  # The sampler weights epoch 5 with alpha 0.65.
  label, video_id, frame = _index()
  s = _sampler(label, video_id, frame, alpha_start=1.0, alpha_end=0.3, alpha_decay_epochs=10)
  candidates, p = s.distribution(5)
  ref = COUNTS[label[candidates]].astype(float) ** -0.65
  np.testing.assert_allclose(p, ref / ref.sum(), rtol=1e-12)


def test_stratification_takes_one_frame_per_chunk():
  k = 7
  label, video_id, frame = _index(frames_per_video=100)
  # Reference grouping, written independently: (video, chunk of K frames) -> valid records.
  chunks = {}
  for i, (v, f, y) in enumerate(zip(video_id, frame, label)):
    if y >= 0:
      chunks.setdefault((int(v), (int(f) - 1) // k), []).append(i)
  s = _sampler(label, video_id, frame, stratify_chunk=k, alpha_start=0.5,
               alpha_shape="constant")
  assert s.epoch_size == len(chunks)
  picked_ever = set()
  for epoch in range(40):
    candidates, p = s.distribution(epoch)
    assert len(candidates) == len(chunks)
    owner = {i: key for key, members in chunks.items() for i in members}
    assert sorted(owner[i] for i in candidates) == sorted(chunks)   # one per chunk
    picked_ever.update(candidates.tolist())
    # Weights use the class counts of the candidates, not of the whole index.
    n_c = np.bincount(label[candidates], minlength=8)
    ref = n_c[label[candidates]].astype(float) ** -0.5
    np.testing.assert_allclose(p, ref / ref.sum(), rtol=1e-12)
    assert np.isin(s.epoch_indices(epoch), candidates).all()
  # The pick within a chunk is random: over 40 epochs most frames get picked at least once
  # (a fixed pick would give exactly one per chunk, ~1/7 of the frames).
  assert len(picked_ever) > 0.9 * sum(len(m) for m in chunks.values())


def test_adaptive_weights_multiply_by_one_minus_f1():
  label, video_id, frame = _index()
  beta, alpha = 2.0, 0.5
  base = _sampler(label, video_id, frame, alpha_start=alpha, alpha_shape="constant",
                  adaptive_beta=beta)
  f1 = np.array([0.9, 0.1, 0.2, 0.0, 0.7, 0.5, 0.4, 1.0])
  s = base.with_class_f1(f1, first_epoch=2)
  for epoch in (0, 1):   # before first_epoch nothing changes
    np.testing.assert_array_equal(s.distribution(epoch)[1], base.distribution(epoch)[1])
    np.testing.assert_array_equal(s.epoch_indices(epoch), base.epoch_indices(epoch))
  candidates, p = s.distribution(2)
  factor = np.maximum(1 - f1, 0.01) ** beta   # F1 = 1 keeps the documented floor
  ref = COUNTS[label[candidates]].astype(float) ** -alpha * factor[label[candidates]]
  np.testing.assert_allclose(p, ref / ref.sum(), rtol=1e-12)
  # A later F1 takes over from its own first epoch; the earlier one still holds before it.
  f1b = np.full(8, 0.5)
  s2 = s.with_class_f1(f1b, first_epoch=4)
  np.testing.assert_array_equal(s2.distribution(3)[1], s.distribution(3)[1])
  np.testing.assert_allclose(s2.distribution(4)[1], base.distribution(4)[1], rtol=1e-12)
  # With beta = 0 the F1 is recorded but does not change the draws.
  off = _sampler(label, video_id, frame).with_class_f1(f1, 0)
  np.testing.assert_array_equal(off.epoch_indices(0), _sampler(label, video_id, frame)
                                .epoch_indices(0))
  with pytest.raises(ValueError, match="8 values"):
    base.with_class_f1([0.5] * 7, 0)


def test_natural_mode_is_a_shuffle_without_replacement():
  label, video_id, frame = _index()
  valid = np.flatnonzero(label >= 0)
  s = _sampler(label, video_id, frame, mode="natural")
  e0 = s.epoch_indices(0)
  np.testing.assert_array_equal(np.sort(e0), valid)
  assert not np.array_equal(e0, valid) and not np.array_equal(e0, s.epoch_indices(1))
  longer = _sampler(label, video_id, frame, mode="natural", epoch_size=2 * valid.size + 10)
  counts = np.bincount(longer.epoch_indices(0), minlength=label.size)[valid]
  assert counts.min() >= 2 and counts.max() <= 3 and counts.sum() == 2 * valid.size + 10


def test_options_are_validated():
  with pytest.raises(ValueError, match="mode"):
    sampling.SamplingOptions(mode="balanced")
  with pytest.raises(ValueError, match="no labelled frame"):
    _sampler(np.full(10, -1, np.int32), np.zeros(10, np.int32), np.arange(1, 11))

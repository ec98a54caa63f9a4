"""The train step: loss, sharding parity, gradient accumulation, the NaN guard, bf16 moments,
the transfer guard, EMA, and the documented loss and optimizer options against references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from ml_collections import ConfigDict

from conftest import tiny_config
from mfer_jax import config_lib, errors, sharding
from mfer_jax.data import pipeline, store
from mfer_jax.models.model import ExpressionModel
from mfer_jax.training import loop
from mfer_jax.training import losses, optimizer
from mfer_jax.training import state as state_lib
from mfer_jax.training import step as step_lib
from training_helpers import deterministic_config, pieces


def test_loss_decreases_on_a_fixed_batch(data_dir):
  config = deterministic_config(data_dir)   # the same program as the accum=1 test below
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, state, _, step, local = pieces(config, mesh)
  batch = pipeline.to_global_batch(local, mesh)
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 6
  assert losses[-1] < losses[0] * 0.9, losses


def test_sharded_step_matches_single_device(data_dir):
  config = tiny_config(data_dir)
  results = []
  for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices())):
    mesh = sharding.make_mesh(shape, devices=devices)
    _, state, _, step, local = pieces(config, mesh)
    losses = []
    for _ in range(2):
      state, metrics = step(state, pipeline.to_global_batch(local, mesh))
      losses.append(float(metrics["loss"]))
    results.append((losses, jax.device_get(nnx.to_pure_dict(state.params))))
  (l1, p1), (l8, p8) = results
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_grad_accumulation_matches_full_batch(data_dir):
  config = deterministic_config(data_dir)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  out = []
  for accum in (1, 2):
    config.train.grad_accum_steps = accum
    _, state, _, step, local = pieces(config, mesh)
    state, metrics = step(state, pipeline.to_global_batch(local, mesh))
    out.append((float(metrics["loss"]), jax.device_get(nnx.to_pure_dict(state.params))))
  assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_nan_guard_freezes_state_and_names_the_step(data_dir):
  config = tiny_config(data_dir)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, state, _, step, local = pieces(config, mesh)
  batch = pipeline.to_global_batch(local, mesh)
  state, _ = step(state, batch)
  poisoned = jax.tree.map(lambda x: x, state.params)
  leaf = poisoned["fusion"]["head"]["bias"]
  leaf.set_value(leaf.get_value().at[0].set(jnp.nan))
  state = state.replace(params=poisoned)
  before = jax.device_get(nnx.to_pure_dict(state.params))
  state, metrics = step(state, batch)
  state, _ = step(state, batch)
  assert not np.isfinite(float(metrics["loss"]))
  assert int(state.bad_step) == 1 and int(state.step) == 1
  after = jax.device_get(nnx.to_pure_dict(state.params))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_bf16_first_moments_and_one_step_matches_float32(data_dir):
  """train.mu_dtype=bfloat16: Adam's first moments are bf16 (second moments stay float32),
  and two steps (the first has learning rate 0 in warmup) move the params as float32 does."""
  config = deterministic_config(data_dir)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  moved = {}
  for mu_dtype in ("float32", "bfloat16"):
    config.train.mu_dtype = mu_dtype
    _, state, _, step, local = pieces(config, mesh)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    nu = optax.tree_utils.tree_get(state.opt_state, "nu")
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(mu_dtype)}
    assert {x.dtype for x in jax.tree.leaves(nu)} == {jnp.dtype(jnp.float32)}
    before = jax.device_get(nnx.to_pure_dict(state.params))
    batch = pipeline.to_global_batch(local, mesh)
    for _ in range(2):
      state, _ = step(state, batch)
    after = jax.device_get(nnx.to_pure_dict(state.params))
    moved[mu_dtype] = jax.tree.map(lambda a, b: a - b, after, before)
  total = 0.0
  for a, b in zip(jax.tree.leaves(moved["bfloat16"]), jax.tree.leaves(moved["float32"])):
    np.testing.assert_allclose(a, b, atol=1e-2 * np.abs(b).max() + 1e-9)
    total += float(np.abs(b).sum())
  assert total > 0


def test_step_runs_under_transfer_guard_and_refuses_implicit_copies(data_dir):
  """The step needs no implicit host<->device copy (the loop runs it under the guard); a numpy
  batch, which jit would silently copy, is refused."""
  config = deterministic_config(data_dir)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, state, _, step, local = pieces(config, mesh)
  batch = pipeline.to_global_batch(local, mesh)
  with jax.transfer_guard("disallow"):
    state, metrics = step(state, batch)
    with pytest.raises(Exception, match="host-to-device transfer"):
      step(state, local)
  assert np.isfinite(float(metrics["loss"]))


def test_ema_params_follow_the_formula_and_are_what_is_evaluated(data_dir):
  """ema_t = d_t ema_{t-1} + (1 - d_t) params_t with d_t = min(decay, (1 + t) / (10 + t)),
  starting from the initial params, computed here in numpy from the params of each step."""
  config = deterministic_config(data_dir)
  config.train.ema_decay = 0.6   # below (1 + t) / (10 + t) from t = 13: both branches of min
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, state, _, step, local = pieces(config, mesh)
  batch = pipeline.to_global_batch(local, mesh)
  as_numpy = lambda tree: [np.asarray(x, np.float64) for x in
                           jax.tree.leaves(jax.device_get(nnx.to_pure_dict(tree)))]
  expected = as_numpy(state.params)
  for a, b in zip(as_numpy(state.ema_params), expected, strict=True):
    np.testing.assert_array_equal(a, b)
  for t in range(15):
    state, _ = step(state, batch)
    d = min(0.6, (1 + t) / (10 + t))
    expected = [d * e + (1 - d) * p for e, p in zip(expected, as_numpy(state.params))]
  ema = as_numpy(state.ema_params)
  for a, b in zip(ema, expected, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert any(not np.allclose(a, p) for a, p in zip(ema, as_numpy(state.params)))
  assert state_lib.eval_params(state) is state.ema_params


def test_class_weights_follow_the_formula():
  """w_c = n_c^-p (p = 1 inverse, 1/2 inverse_sqrt), 0 for absent classes, scaled so that the
  mean weight over the labelled frames is 1; -1 frames do not count."""
  label = np.array([0] * 50 + [1] * 5 + [4] * 20 + [7] * 2 + [-1] * 9)
  counts = np.array([50, 5, 0, 0, 20, 0, 0, 2], np.float64)
  for mode, power in (("inverse", 1.0), ("inverse_sqrt", 0.5)):
    got = loop.class_loss_weights(ConfigDict({"class_weights": mode}), label, 8)
    raw = np.array([c ** -power if c else 0.0 for c in counts])
    expected = raw * counts.sum() / (raw * counts).sum()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[1] / got[0] == pytest.approx((50 / 5) ** power, rel=1e-6)
  np.testing.assert_array_equal(
      loop.class_loss_weights(ConfigDict({"class_weights": "none"}), label, 8), np.ones(8))
  with pytest.raises(errors.UsageError, match="train.class_weights='inverse_square'"):
    loop.class_loss_weights(ConfigDict({"class_weights": "inverse_square"}), label, 8)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_smoothed_loss_matches_optax_smooth_labels(smoothing):
  """The step's per-example loss (train.loss=cross_entropy) is CE(optax.smooth_labels(
  onehot(y)), logits), the cross-entropy computed here with numpy; weighted by class weight x
  mask as the step sums it."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 8)).astype(np.float32)
  labels = np.array([0, 1, 4, 4, 7, 2])
  weights = np.array([1.0, 2.5, 0.5, 0.5, 1.0, 0.0], np.float32)   # class weight x mask
  cfg = config_lib.base_config().train
  cfg.label_smoothing = smoothing
  loss = losses.make_loss(cfg, 8)(jnp.asarray(logits), jnp.asarray(labels))
  targets = np.asarray(optax.smooth_labels(jax.nn.one_hot(labels, 8), smoothing))
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -(targets * log_softmax).sum(-1)
  np.testing.assert_allclose(np.asarray(loss), ce, rtol=1e-5)
  assert float(jnp.sum(loss * weights)) == pytest.approx(float((weights * ce).sum()), rel=1e-5)


def _batch_with_faceless_and_masked_frames(config):
  """The first train batch (8 frames) with frames 1, 4 and 7 planted without a face and frame
  5 masked out (padding), so a loss term can be checked on both kinds of frame."""
  it = pipeline.make_train_iterator(config.data,
                                    store.load_split(config.data.data_dir, "train"))
  batch = step_lib.model_inputs(next(it))
  it.close()
  batch["has_face"] = np.asarray(batch["has_face"]) & (np.arange(8) % 3 != 1)
  batch["mask"] = np.asarray(batch["mask"]) & (np.arange(8) != 5)
  return batch


def test_unimodal_heads_add_their_available_frames_loss_to_the_step_loss(data_dir):
  """model.fusion.unimodal_loss_weight=w: the step's loss sum is the fused head's weighted CE
  plus w times each unimodal head's, the visual head's over frames with a face only; computed
  here with numpy from the model's outputs (deterministic config: no dropout of any kind)."""
  config = deterministic_config(data_dir)
  config.model.fusion.unimodal_loss_weight = 0.5
  config.train.label_smoothing = 0.1
  batch = _batch_with_faceless_and_masked_frames(config)
  spec = state_lib.ModelSpec(config.model)
  params = nnx.state(ExpressionModel(config.model, rngs=nnx.Rngs(0)), nnx.Param)
  class_weights = np.linspace(0.5, 2.0, 8)
  total, (w_sum, _) = step_lib.make_loss_sum(spec, config, class_weights)(
      params, batch, jax.random.key(0))
  out = spec.merge(params)(batch["face"], batch["mel"], batch["has_face"])

  def ce(logits, labels):   # smoothed cross-entropy, numpy
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    q = np.eye(8)[labels] * 0.9 + 0.1 / 8
    return -(q * logp).sum(-1)

  labels = np.maximum(np.asarray(batch["label"]), 0)
  weights = np.asarray(batch["mask"], np.float64) * class_weights[labels]
  has_face = np.asarray(batch["has_face"], np.float64)
  assert 0 < has_face.sum() < len(has_face) and (weights == 0).any()   # both cases present
  uni = np.asarray(out["unimodal_logits"])
  expected = (weights * (ce(out["logits"], labels) + 0.5 * has_face * ce(uni[:, 0], labels)
                         + 0.5 * ce(uni[:, 1], labels))).sum()
  assert float(total) == pytest.approx(expected, rel=1e-5)
  assert float(w_sum) == pytest.approx(weights.sum(), rel=1e-6)


def test_gate_entropy_penalty_adds_log2_minus_entropy_on_frames_with_both_modalities(data_dir):
  """model.fusion.gate_entropy_weight=w: the step's loss sum grows by w * sum of frame weight *
  (log 2 - H(gates)) over the frames where both modalities were seen, computed here with numpy
  from the model's gates; a planted gate bias makes the gates one-sided so the term is large.
  With fixed gates (concat) the weight changes nothing."""
  config = deterministic_config(data_dir)
  batch = _batch_with_faceless_and_masked_frames(config)
  class_weights = np.linspace(0.5, 2.0, 8)

  def loss_and_gates(fusion, weight):
    config.model.fusion.name = fusion
    config.model.fusion.gate_entropy_weight = weight
    spec = state_lib.ModelSpec(config.model)
    model = ExpressionModel(config.model, rngs=nnx.Rngs(0))
    if fusion == "mfm":   # gates near (0.88, 0.12): entropy 0.37 against log 2 = 0.69
      model.fusion.gate_fc2.bias[...] = jnp.asarray([1.0, -1.0])
    params = nnx.state(model, nnx.Param)
    total, _ = step_lib.make_loss_sum(spec, config, class_weights)(params, batch,
                                                                  jax.random.key(0))
    return float(total), np.asarray(model(batch["face"], batch["mel"], batch["has_face"])["gates"],
                                    np.float64)

  base, gates = loss_and_gates("mfm", 0.0)
  penalised, _ = loss_and_gates("mfm", 0.3)
  labels = np.maximum(np.asarray(batch["label"]), 0)
  weights = np.asarray(batch["mask"], np.float64) * class_weights[labels]
  both = np.asarray(batch["has_face"], np.float64)   # the audio is always there
  entropy = -(gates * np.log(np.maximum(gates, 1e-30))).sum(-1)
  expected = 0.3 * (weights * both * (np.log(2.0) - entropy)).sum()
  assert ((weights * both) > 0).any() and ((weights * (1 - both)) > 0).any()  # both cases
  assert expected > 0.05
  assert penalised - base == pytest.approx(expected, rel=1e-4)
  assert loss_and_gates("concat", 0.3)[0] == loss_and_gates("concat", 0.0)[0]
  config.model.fusion.gate_entropy_weight = -0.1
  with pytest.raises(errors.UsageError, match="gate_entropy_weight"):
    config_lib.validate(config)


def test_adam_is_adam_with_l2_decay_on_matrices():
  """optimizer=adam: the authors' Adam with L2 decay added to the gradient of matrices (not
  of biases), against a numpy Adam; AdamW (decoupled decay) would differ."""
  cfg = config_lib.base_config().train
  cfg.update(optimizer="adam", learning_rate=0.05, warmup_steps=0, final_lr_ratio=1.0,
             weight_decay=0.1, b1=0.9, b2=0.999, grad_clip_norm=0.0)
  tx, _ = optimizer.make_optimizer(cfg, 10)
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
           for _ in range(3)]
  ref = jax.tree.map(np.asarray, params)
  m = jax.tree.map(np.zeros_like, ref)
  v = jax.tree.map(np.zeros_like, ref)
  opt_state = tx.init(params)
  for t, g in enumerate(grads, start=1):
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    for layer in ("kernel", "bias"):
      p, gi = ref["dense"][layer], np.asarray(g["dense"][layer], np.float64)
      if layer == "kernel":
        gi = gi + 0.1 * p
      m["dense"][layer] = 0.9 * m["dense"][layer] + 0.1 * gi
      v["dense"][layer] = 0.999 * v["dense"][layer] + 0.001 * gi ** 2
      m_hat = m["dense"][layer] / (1 - 0.9 ** t)
      v_hat = v["dense"][layer] / (1 - 0.999 ** t)
      ref["dense"][layer] = p - 0.05 * m_hat / (np.sqrt(v_hat) + 1e-8)
  for layer in ("kernel", "bias"):
    np.testing.assert_allclose(params["dense"][layer], ref["dense"][layer], rtol=1e-5,
                               atol=1e-6)

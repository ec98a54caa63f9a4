"""Temporal heads and the model on clips: frame-mode parity, positions, receptive field, loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mfer_jax import config_lib, errors, planning, sharding
from mfer_jax.models import layers, temporal
from mfer_jax.models.model import ExpressionModel
from mfer_jax.training import losses
from test_model import make_batch, tiny_model_config


@nnx.jit
def apply(head, x, present):
  return head(x, present)


def head_config(name, **kw):
  c = config_lib.base_config().model.temporal
  c.update(name=name, dropout=0.0, **kw)
  return c


def test_t1_none_equals_the_frame_model_exactly():
  """Same params, same batch, same dropout keys: a [B, 1] clip is the [B] frame batch."""
  cfg = tiny_model_config()
  cfg.modality_dropout = 0.3     # every random path of training is on
  model = ExpressionModel(cfg, rngs=nnx.Rngs(0))
  graph, params = nnx.split(model)
  batch = make_batch(b=4)
  labels = jnp.asarray([0, 3, 7, 1])
  train_cfg = config_lib.base_config().train
  train_cfg.update(label_smoothing=0.1)
  loss_fn = losses.make_loss(train_cfg, 8)

  def run(model, face, mel, has_face, labels, present):
    """Training (dropout on) and inference (no rngs) outputs."""
    out = model(face, mel, has_face, present, rngs=nnx.Rngs(dropout=jax.random.key(5)))
    eval_logits = model(face, mel, has_face, present)["logits"]
    return out["logits"], out["gates"], jnp.sum(loss_fn(out["logits"], labels)), eval_logits

  @jax.jit
  def both(params, face, mel, has_face, labels):
    # One program (one compile). XLA may share work between the two paths only where their
    # computations are identical, so any difference of the clip path still shows.
    model = nnx.merge(graph, params)
    return (run(model, face, mel, has_face, labels, None),
            run(model, face[:, None], mel[:, None], has_face[:, None], labels[:, None],
                jnp.ones((4, 1), bool)))

  frame, clip = both(params, batch["face"], batch["mel"], batch["has_face"], labels)
  assert clip[0].shape == (4, 1, 8)
  np.testing.assert_array_equal(np.asarray(clip[0])[:, 0], np.asarray(frame[0]))
  np.testing.assert_array_equal(np.asarray(clip[1])[:, 0], np.asarray(frame[1]))
  assert float(clip[2]) == float(frame[2])
  np.testing.assert_array_equal(np.asarray(clip[3])[:, 0], np.asarray(frame[3]))
  assert not np.array_equal(np.asarray(frame[0]), np.asarray(frame[3]))   # dropout was on


@pytest.mark.parametrize("position", ["learned", "relative"])
def test_transformer_head_is_permutation_sensitive_and_masks_padding(position):
  head = temporal.TransformerHead(head_config("transformer", position=position, num_heads=4),
                                  32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  present = jnp.ones((2, 10), bool)
  perm = np.random.default_rng(0).permutation(10)

  def equivariance_gap(h):
    return float(jnp.abs(apply(h, x[:, perm], present) - apply(h, x, present)[:, perm]).max())

  # Self-attention without positions is permutation-equivariant up to rounding; the position
  # params (at their initial values) make the head tell orders apart.
  table = head.pos_embed if position == "learned" else head.rel_bias
  saved = table[...]
  table[...] = jnp.zeros_like(saved)
  no_positions = equivariance_gap(head)
  table[...] = saved
  assert no_positions < 2e-6
  assert equivariance_gap(head) > 50 * max(no_positions, 1e-7)
  y = apply(head, x, present)
  # A padded slot is never attended to: changing it leaves every other output unchanged.
  present = present.at[:, 4].set(False)
  a = apply(head, x, present)
  b = apply(head, x.at[:, 4].set(100.0), present)
  keep = np.arange(10) != 4
  np.testing.assert_allclose(np.asarray(a)[:, keep], np.asarray(b)[:, keep], atol=1e-5)
  assert float(jnp.abs(a - y).max()) > 1e-4     # the mask did change what the others see


@pytest.mark.parametrize("kernel_size,dilations", [(3, (1, 2, 4)), (5, (1, 3))])
def test_tcn_receptive_field_matches_its_config(kernel_size, dilations):
  cfg = head_config("tcn", kernel_size=kernel_size, dilations=dilations)
  rf = temporal.receptive_field(cfg)
  assert rf == 1 + (kernel_size - 1) * sum(dilations)
  head = temporal.TCNHead(cfg, 16, rngs=nnx.Rngs(0))
  t, t0 = 64, 30
  x = jax.random.normal(jax.random.key(2), (1, t, 16))
  present = jnp.ones((1, t), bool)
  # Not constant across channels: LayerNorm would remove a constant shift.
  impulse = jnp.zeros_like(x).at[0, t0].set(jax.random.normal(jax.random.key(3), (16,)))
  delta = np.abs(np.asarray(apply(head, x + impulse, present) - apply(head, x, present)))
  delta = delta[0].max(-1)
  changed = np.flatnonzero(delta > 0)     # outside the field the output is bit-identical
  half = (rf - 1) // 2
  np.testing.assert_array_equal(changed, np.arange(t0 - half, t0 + half + 1))


@pytest.mark.parametrize("name", ["transformer", "tcn"])
def test_heads_follow_the_precision_and_remat_policies(name):
  """Remat changes no gradient (float32); a bf16 compute dtype feeds bf16 operands to the
  head's matmuls, keeps float32 outputs and stays within bf16 rounding of float32."""
  cfg = head_config(name, num_heads=4, dilations=(1, 2))
  x = jax.random.normal(jax.random.key(1), (2, 6, 32))
  present = jnp.ones((2, 6), bool).at[0, 5].set(False)

  def build(**kw):
    return nnx.split(temporal.make_head(cfg, 32, rngs=nnx.Rngs(0), **kw))

  def loss_and_grads(graph, params):
    loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graph, p)(x, present)))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)

  plain = loss_and_grads(*build())
  remat = loss_and_grads(*build(remat="block"))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  graph, params = build(precision=layers.Precision.resolve("bfloat16", matmul="xla"))
  fn = jax.jit(lambda p: nnx.merge(graph, p)(x, present))
  assert "bf16" in fn.lower(params).as_text()
  y = fn(params)
  assert y.dtype == jnp.float32
  graph32, params32 = build()
  y32 = jax.jit(lambda p: nnx.merge(graph32, p)(x, present))(params32)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y32), atol=0.1)
  assert not np.array_equal(np.asarray(y), np.asarray(y32))


def test_clip_model_shapes_gradients_and_frame_input_error():
  cfg = tiny_model_config()
  cfg.temporal.update(name="transformer", num_heads=4, dropout=0.1)
  model = ExpressionModel(cfg, rngs=nnx.Rngs(0))
  b = make_batch(b=6)
  face, mel = b["face"].reshape(2, 3, 24, 24, 3), b["mel"].reshape(2, 3, 16, 40)
  has_face = b["has_face"].reshape(2, 3)
  present = jnp.asarray([[True, True, False], [True, True, True]])
  graph, params = nnx.split(model)

  @jax.jit
  def forward_and_grads(params):
    def loss(params):
      out = nnx.merge(graph, params)(face, mel, has_face, present, rngs=nnx.Rngs(dropout=0))
      return jnp.sum(out["logits"][:, 1] ** 2), out
    return jax.grad(loss, has_aux=True)(params)

  grads, out = forward_and_grads(params)
  assert out["logits"].shape == (2, 3, 8) and out["gates"].shape == (2, 3, 2)
  norms = {k: float(optax_norm(v)) for k, v in grads.items()
           if k in ("temporal", "image_encoder", "audio_encoder")}
  assert all(n > 0 for n in norms.values()) and len(norms) == 3, norms
  with pytest.raises(ValueError, match="temporal head needs clips"):   # found while tracing
    jax.eval_shape(lambda p: nnx.merge(graph, p)(b["face"], b["mel"], b["has_face"]), params)


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_temporal_config_is_validated():
  c = config_lib.base_config()
  c.model.temporal.name = "transformer"
  with pytest.raises(errors.UsageError, match="needs clips"):
    config_lib.validate(c)
  c.data.sequence.length = 8
  config_lib.validate(c)
  c.model.temporal.name = "lstm"
  with pytest.raises(errors.UsageError, match="none, transformer, tcn"):
    config_lib.validate(c)
  c.model.temporal.update(name="tcn", kernel_size=4)
  with pytest.raises(errors.UsageError, match="odd"):
    config_lib.validate(c)
  c = config_lib.apply_variant_args(config_lib.base_config(), "temporal=tcn")
  assert c.data.sequence.length == config_lib.DEFAULT_CLIP_LENGTH == 16
  # Frames per batch kept: the base config's 64 frames become 4 clips of 16.
  assert (c.data.batch_size, c.data.eval_batch_size) == (4, 4)
  config_lib.validate(c)
  c = config_lib.apply_variant_args(config_lib.base_config(), "clip=8,temporal=transformer")
  assert (c.data.sequence.length, c.data.batch_size) == (8, 8)


def _focal_reference(logits, labels, gamma, alpha=None, smoothing=0.0):
  """Direct numpy: -sum_c q_c alpha_c (1 - p_c)^gamma log p_c."""
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  q = np.eye(logits.shape[-1])[labels] * (1 - smoothing) + smoothing / logits.shape[-1]
  a = np.ones(logits.shape[-1]) if alpha is None else np.asarray(alpha)
  return -(q * a * (1 - p) ** gamma * np.log(p)).sum(-1)


@pytest.mark.parametrize("gamma,alpha,smoothing", [
    (2.0, None, 0.0), (0.5, (0.25, 1, 2, 2, 0.5, 0.5, 1, 0.25), 0.0), (2.0, None, 0.1)])
def test_focal_loss_matches_numpy(gamma, alpha, smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (5, 4, 8)).astype(np.float32)
  labels = rng.integers(0, 8, (5, 4))
  cfg = config_lib.base_config().train
  cfg.update(loss="focal", focal_gamma=gamma, focal_alpha=alpha or (), label_smoothing=smoothing)
  got = losses.make_loss(cfg, 8)(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(got), _focal_reference(logits, labels, gamma, alpha,
                                                               smoothing), rtol=2e-5)


def test_focal_with_gamma_zero_is_cross_entropy():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(0, 3, (16, 8)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 8, 16))
  cfg = config_lib.base_config().train
  cfg.label_smoothing = 0.1
  ce = losses.make_loss(cfg, 8)(logits, labels)
  cfg.update(loss="focal", focal_gamma=0.0)
  np.testing.assert_allclose(np.asarray(losses.make_loss(cfg, 8)(logits, labels)),
                             np.asarray(ce), rtol=1e-6)
  cfg.focal_alpha = (1.0,) * 7
  with pytest.raises(errors.UsageError, match="8 non-negative"):
    losses.make_loss(cfg, 8)


def test_the_planner_lays_out_clip_batches_like_the_pipeline():
  c = config_lib.apply_variant_args(config_lib.base_config(), "clip=4,temporal=tcn")
  mesh = sharding.make_mesh((-1, 1, 1))
  batch = planning.abstract_batch(c, 16, mesh)
  assert batch["face"].shape == (16, 4, c.data.face_size, c.data.face_size, 3)
  assert {k: v.shape for k, v in batch.items() if k not in ("face", "mel")} == {
      k: (16, 4) for k in ("has_face", "label", "mask", "present")}
  assert batch["mel"].shape[:2] == (16, 4)
  frames = planning.abstract_batch(config_lib.base_config(), 16, mesh)
  assert "present" not in frames and frames["label"].shape == (16,)

"""The full model: every fusion variant, gates, gradients, modality masking, sharded parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mfer_jax import config_lib, sharding
from mfer_jax.constants import FUSION_VARIANTS
from mfer_jax.models import fusion as fusion_lib
from mfer_jax.models.model import ExpressionModel, face_to_input, mel_to_input


def tiny_model_config(fusion="mfm"):
  c = config_lib.base_config().model
  for enc, size in ((c.image, (32, 32)), (c.audio, (32, 64))):
    enc.variant = "test"
    enc.img_size = size
    enc.window_size = 4
  c.fusion.update(name=fusion, dim=32, num_layers=1, num_heads=4, gate_hidden=16)
  return c


def make_batch(b=4, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "face": jnp.asarray(rng.integers(0, 256, (b, 24, 24, 3), np.uint8)),
      "mel": jnp.asarray(rng.integers(0, 256, (b, 16, 40), np.uint8)),
      "has_face": jnp.asarray([True, False] * (b // 2)),
  }


def run(model, batch, rngs=None):
  return model(batch["face"], batch["mel"], batch["has_face"], rngs=rngs)


@pytest.mark.parametrize("fusion", FUSION_VARIANTS)
def test_variant_shapes_and_gates(fusion):
  model = ExpressionModel(tiny_model_config(fusion), rngs=nnx.Rngs(0))
  out = run(model, make_batch())
  assert out["logits"].shape == (4, 8) and out["logits"].dtype == jnp.float32
  gates = np.asarray(out["gates"])
  if fusion == "mfm_sigmoid_concat":   # a weight per modality, each in [0, 1]
    assert ((gates >= 0) & (gates <= 1)).all() and (gates[0::2] > 0).all()
  else:
    np.testing.assert_allclose(gates.sum(-1), 1.0, atol=1e-6)
  if fusion == "visual_only":
    np.testing.assert_allclose(gates, [[1, 0]] * 4, atol=1e-6)
  else:
    # Examples 1 and 3 have no face: the visual modality gets no weight there.
    np.testing.assert_allclose(gates[1::2, 0], 0.0, atol=1e-6)
  if fusion == "audio_only":
    np.testing.assert_allclose(gates[:, 1], 1.0, atol=1e-6)
  if fusion in ("concat", "sum"):
    np.testing.assert_allclose(gates[0::2], 0.5, atol=1e-6)
  assert np.isfinite(np.asarray(out["logits"])).all()


@pytest.mark.parametrize("fusion", ["sum", "gated"])
def test_reported_gates_are_the_weights_the_head_sees(fusion):
  """Without cross-attention each pooled feature ignores the other modality and the head is
  linear, so if the head sees gates[0] * visual + gates[1] * audio, the logits with both
  modalities are the gate-weighted mix of the logits with each one alone (gates 1 there)."""
  fuse = fusion_lib.Fusion(tiny_model_config(fusion).fusion, 24, 40, 8, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  v = jnp.asarray(rng.normal(size=(3, 5, 24)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(3, 7, 40)), jnp.float32)
  out = {}
  for name, avail in (("both", [True, True]), ("visual", [True, False]),
                      ("audio", [False, True])):
    out[name] = fuse(v, a, jnp.asarray([avail] * 3))
  gates = np.asarray(out["both"][1])
  if fusion == "sum":
    np.testing.assert_allclose(gates, 0.5, atol=1e-7)
  np.testing.assert_allclose(out["visual"][1], [[1.0, 0.0]] * 3, atol=1e-7)
  mixed = gates[:, :1] * out["visual"][0] + gates[:, 1:] * out["audio"][0]
  np.testing.assert_allclose(out["both"][0], mixed, atol=1e-5)


def test_sigmoid_concat_head_sees_each_modality_scaled_by_its_own_weight():
  """mfm_sigmoid_concat feeds the head [2 g_v visual, 2 g_a audio]. With no cross-attention
  block each pooled feature ignores the other modality, so with both modalities each half is
  the single-modality run's half, rescaled by the ratio of that modality's weight with both
  to its weight alone, and a missing modality's half is zero."""
  cfg = tiny_model_config("mfm_sigmoid_concat").fusion
  cfg.num_layers = 0
  fuse = fusion_lib.Fusion(cfg, 24, 40, 8, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  v = jnp.asarray(rng.normal(size=(3, 5, 24)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(3, 7, 40)), jnp.float32)
  out = {name: [np.asarray(x) for x in fuse.features(v, a, jnp.asarray([avail] * 3))[:2]]
         for name, avail in
         (("both", [True, True]), ("visual", [True, False]), ("audio", [False, True]))}
  d = cfg.dim
  g = {name: gates for name, (_, gates) in out.items()}
  assert (g["visual"][:, 1] == 0).all() and (g["audio"][:, 0] == 0).all()
  assert not np.allclose(g["both"].sum(-1), 1.0)   # not a share: sigmoid weights
  assert (out["visual"][0][:, d:] == 0).all() and (out["audio"][0][:, :d] == 0).all()
  np.testing.assert_allclose(out["both"][0][:, :d],
                             out["visual"][0][:, :d] * g["both"][:, :1] / g["visual"][:, :1],
                             atol=1e-5)
  np.testing.assert_allclose(out["both"][0][:, d:],
                             out["audio"][0][:, d:] * g["both"][:, 1:] / g["audio"][:, 1:],
                             atol=1e-5)


def test_single_modality_variants_build_one_encoder():
  assert ExpressionModel(tiny_model_config("visual_only"), rngs=nnx.Rngs(0)).audio_encoder is None
  assert ExpressionModel(tiny_model_config("audio_only"), rngs=nnx.Rngs(0)).image_encoder is None


def test_mfm_gradient_reaches_both_encoders():
  model = ExpressionModel(tiny_model_config("mfm"), rngs=nnx.Rngs(0))
  batch = make_batch()
  batch["has_face"] = jnp.ones(4, bool)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    return run(nnx.merge(graphdef, p), batch)["logits"].sum()

  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
  for enc in ("image_encoder", "audio_encoder"):
    norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[enc]))
    assert norm > 0, f"no gradient reaches {enc}"


def test_missing_face_ignores_face_pixels():
  """Without a face the prediction must not depend on the (blank or garbage) face image."""
  model = ExpressionModel(tiny_model_config("mfm"), rngs=nnx.Rngs(0))
  batch = make_batch()
  other = dict(batch, face=255 - batch["face"])
  a, b = run(model, batch)["logits"], run(model, other)["logits"]
  np.testing.assert_allclose(a[1::2], b[1::2], atol=1e-5)
  assert not np.allclose(a[0::2], b[0::2], atol=1e-5)


def test_modality_dropout_is_seeded_and_keeps_one_modality():
  cfg = tiny_model_config("gated")
  cfg.modality_dropout = 1.0
  model = ExpressionModel(cfg, rngs=nnx.Rngs(0))
  batch = make_batch(b=8)
  graphdef, params = nnx.split(model)
  gates = jax.jit(lambda p, key: run(nnx.merge(graphdef, p), batch, nnx.Rngs(dropout=key))["gates"])
  k1, k2 = jax.random.key(1), jax.random.key(2)
  g1, g2 = np.asarray(gates(params, k1)), np.asarray(gates(params, k1))
  assert not np.array_equal(g1, np.asarray(gates(params, k2)))
  np.testing.assert_array_equal(g1, g2)
  # Every example keeps exactly one modality; faceless ones always keep audio.
  assert set(np.round(g1.ravel(), 6)) <= {0.0, 1.0}
  np.testing.assert_allclose(g1[1::2, 1], 1.0)


def test_preprocessing_matches_numpy():
  face = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8)
  x = np.asarray(face_to_input(jnp.asarray(face), (8, 8)))
  ref = (face / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(x, ref, atol=1e-5)
  mel = np.full((1, 4, 6), 255, np.uint8)
  m = np.asarray(mel_to_input(jnp.asarray(mel), (8, 12), 1))
  assert m.shape == (1, 8, 12, 1)
  np.testing.assert_allclose(m, (1.0 - 0.449) / 0.226, atol=1e-3)
  # An encoder family's own RGB statistics (CLIP's, say): one channel uses their averages.
  clip = ((0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758))
  m = np.asarray(mel_to_input(jnp.asarray(mel), (4, 6), 1, clip))
  np.testing.assert_allclose(m, (1.0 - np.mean(clip[0])) / np.mean(clip[1]), rtol=1e-6)
  f = np.asarray(face_to_input(jnp.asarray(face), (8, 8), clip))
  np.testing.assert_allclose(f, (face / 255.0 - np.array(clip[0])) / np.array(clip[1]),
                             atol=1e-5)


def test_sharded_forward_equals_unsharded():
  """Params placed by the rules on 8 devices (data 2 x fsdp 2 x model 2) give the same output."""
  assert jax.device_count() == 8
  model = ExpressionModel(tiny_model_config("mfm"), rngs=nnx.Rngs(0))
  batch = make_batch(b=8)
  expected = run(model, batch)
  graphdef, params = nnx.split(model, nnx.Param)
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  param_sh = sharding.state_shardings(params, mesh, rules)
  specs = [s.spec for s in jax.tree.leaves(param_sh)]
  assert any("model" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)
  params = jax.device_put(params, param_sh)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))

  @jax.jit
  def fwd(p, b):
    with sharding.use_rules(mesh, rules):
      return run(nnx.merge(graphdef, p), b)

  got = fwd(params, batch)
  np.testing.assert_allclose(got["logits"], expected["logits"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got["gates"], expected["gates"], atol=1e-6)


def test_unimodal_heads_each_see_one_modality_and_exist_only_when_weighted():
  cfg = tiny_model_config("mfm")
  cfg.fusion.unimodal_loss_weight = 0.5
  model = ExpressionModel(cfg, rngs=nnx.Rngs(0))
  batch = make_batch()
  out = run(model, batch)
  assert out["unimodal_logits"].shape == (4, 2, 8)
  np.testing.assert_array_equal(out["available"], [[1, 1], [0, 1], [1, 1], [0, 1]])
  other_mel = run(model, {**batch, "mel": batch["mel"][::-1]})
  other_face = run(model, {**batch, "face": batch["face"][::-1]})
  # The visual head ignores the audio and the audio head the faces, though the MFM's
  # cross-attention makes the fused logits depend on both.
  np.testing.assert_array_equal(out["unimodal_logits"][:, 0], other_mel["unimodal_logits"][:, 0])
  np.testing.assert_array_equal(out["unimodal_logits"][:, 1], other_face["unimodal_logits"][:, 1])
  assert not np.allclose(out["unimodal_logits"][:, 1], other_mel["unimodal_logits"][:, 1])
  assert not np.allclose(out["unimodal_logits"][0::2, 0], other_face["unimodal_logits"][0::2, 0])
  assert not np.allclose(out["logits"], other_mel["logits"])
  # Weight 0 (the default) builds no heads: the usual outputs and parameters.
  plain = ExpressionModel(tiny_model_config("mfm"), rngs=nnx.Rngs(0))
  assert set(run(plain, batch)) == {"logits", "gates", "available"}
  assert "unimodal" not in nnx.to_pure_dict(nnx.state(plain, nnx.Param))["fusion"]
  assert "unimodal" in nnx.to_pure_dict(nnx.state(model, nnx.Param))["fusion"]
  # A single-modality variant has nothing to add a head to.
  cfg = tiny_model_config("visual_only")
  cfg.fusion.unimodal_loss_weight = 0.5
  assert set(run(ExpressionModel(cfg, rngs=nnx.Rngs(0)), batch)) == {"logits", "gates",
                                                                   "available"}

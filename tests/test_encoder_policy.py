"""The foundation encoders (ViT, wav2vec 2.0) follow the model's precision and remat policies
exactly as Swin does (`mfer_jax.models.layers`; tests/test_layers.py checks Swin and MFM)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mfer_jax import config_lib
from mfer_jax.models import layers
from mfer_jax.models import vit
from mfer_jax.models import wav2vec2
from mfer_jax.models.model import ExpressionModel

F32 = layers.FLOAT32
BF16_XLA = layers.Precision("bfloat16", matmul="xla")
BF16_AMX = layers.Precision("bfloat16", matmul="cpu_amx")


def _vit(precision, remat):
  cfg = vit.vit_config("test", img_size=(32, 32), drop_path_rate=0.3)
  return vit.VisionTransformer(cfg, rngs=nnx.Rngs(0), precision=precision, remat=remat)


def _wav2vec2(precision, remat):
  cfg = wav2vec2.wav2vec2_config("wav2vec2", "test")
  return wav2vec2.Wav2Vec2Model(cfg, rngs=nnx.Rngs(0), precision=precision, remat=remat)


ENCODERS = {
    "vit": (_vit, np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)),
    "wav2vec2": (_wav2vec2,
                 np.random.default_rng(1).normal(scale=0.3, size=(2, 4000)).astype(np.float32)),
}


def _loss(tokens, pooled):
  return (tokens ** 2).mean() + pooled.sum()


@functools.lru_cache(maxsize=None)
def _run(name: str, precision: layers.Precision, remat: str, lowered: bool = False):
  """(loss, param gradients) in training mode (drop path active where the encoder has it),
  from the same seed-0 params whatever the policy; or the lowered HLO text."""
  make, x = ENCODERS[name]
  # Params of the float32 build, cast to the policy's storage dtype: identical weights.
  params = nnx.state(make(F32, "none"), nnx.Param)
  graphdef, built = nnx.split(nnx.eval_shape(lambda: make(precision, remat)), nnx.Param)
  params = jax.tree.map(lambda p, b: p.astype(b.dtype), params, built)

  def loss(p):
    return _loss(*nnx.merge(graphdef, p)(jnp.asarray(x), rngs=nnx.Rngs(dropout=7)))

  fn = jax.jit(jax.value_and_grad(loss))
  if lowered:
    return fn.lower(params).as_text()
  value, grads = fn(params)
  return float(value), jax.tree.leaves(nnx.to_pure_dict(grads))


@pytest.mark.parametrize("name", list(ENCODERS))
def test_remat_gives_the_same_gradients(name):
  value, want = _run(name, F32, "none")
  # Some leaves of the random tiny wav2vec 2.0 (the feature projection, the position conv's
  # bias) have gradients near 1e-7, float32 rounding noise behind its normalisations:
  # absolute differences count on the whole tree's scale.
  atol = 1e-6 * max(np.abs(w).max() for w in want)
  for policy in ("block", "dots_saveable"):
    got_value, got = _run(name, F32, policy)
    assert got_value == pytest.approx(value, rel=1e-6)   # same drop-path draws
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_matmul_paths_agree(name):
  """bf16 xla and cpu_amx: same loss and gradients within bf16 tolerance, both near float32;
  only cpu_amx pins layouts with optimisation barriers."""
  v32, g32 = _run(name, F32, "none")
  vx, gx = _run(name, BF16_XLA, "none")
  va, ga = _run(name, BF16_AMX, "none")
  assert abs(vx - va) <= 0.02 * abs(v32) and abs(vx - v32) <= 0.05 * abs(v32)
  # Each leaf on its own scale, with a floor for the near-zero leaves (see above).
  floor = 1e-4 * max(np.abs(w).max() for w in g32)
  for x, a, w in zip(gx, ga, g32):
    scale = np.abs(w).max() + floor
    assert np.abs(x - a).max() <= 0.05 * scale
    assert np.abs(x - w).max() <= 0.1 * scale
  assert "optimization_barrier" in _run(name, BF16_AMX, "none", lowered=True)
  assert "optimization_barrier" not in _run(name, BF16_XLA, "none", lowered=True)


def test_expression_model_builds_vit_with_the_model_policy():
  """``config.model.precision`` / ``.remat`` reach a ViT face encoder inside the model."""
  c = config_lib.base_config().model
  c.image.update(family="vit", variant="test", img_size=(32, 32))
  c.audio.update(variant="test", img_size=(32, 64), window_size=4)
  c.fusion.update(dim=32, num_layers=1, num_heads=4, gate_hidden=16)
  c.precision.update(compute_dtype="bfloat16", param_dtype="bfloat16", matmul="xla")
  c.remat = "block"
  model = nnx.eval_shape(lambda: ExpressionModel(c, rngs=nnx.Rngs(0)))
  assert model.precision == layers.Precision("bfloat16", "bfloat16", "xla")
  assert model.image_encoder.remat == "block"
  assert model.image_encoder.blocks[0].attn.precision == model.precision
  dtypes = {p.dtype for p in jax.tree.leaves(nnx.state(model.image_encoder, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}

"""The layer library: precision policy, both matmul paths, attention, MLP, LayerNorm, remat."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mfer_jax import config_lib
from mfer_jax.models import layers
from mfer_jax.models.model import ExpressionModel
from mfer_jax.testing.timm_reference import torch


def tiny_model_config(fusion="mfm", remat="none"):
  c = config_lib.base_config().model
  for enc, size in ((c.image, (32, 32)), (c.audio, (32, 64))):
    enc.variant = "test"
    enc.img_size = size
    enc.window_size = 4
    enc.drop_path_rate = 0.2
  c.fusion.update(name=fusion, dim=32, num_layers=1, num_heads=4, gate_hidden=16, dropout=0.2)
  c.remat = remat
  return c


def make_batch(b=4, seed=0):
  rng = np.random.default_rng(seed)
  return {"face": jnp.asarray(rng.integers(0, 256, (b, 24, 24, 3), np.uint8)),
          "mel": jnp.asarray(rng.integers(0, 256, (b, 16, 40), np.uint8)),
          "has_face": jnp.asarray([True, True, False, True][:b])}


@functools.lru_cache(maxsize=None)
def _init_params(fusion: str):
  """Seed-0 params of the tiny model (jitted: eager init dispatches thousands of small ops)."""
  return jax.jit(lambda: nnx.state(ExpressionModel(tiny_model_config(fusion),
                                                   rngs=nnx.Rngs(0)), nnx.Param))()


@functools.lru_cache(maxsize=None)
def _loss_and_grads(remat: str, precision: layers.Precision):
  """Loss, outputs and param gradients of the tiny MFM model in training mode (dropout, drop
  path and modality dropout active), from the shared seed-0 params."""
  cfg = tiny_model_config(remat=remat)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: ExpressionModel(cfg, rngs=nnx.Rngs(0),
                                                                 precision=precision)))
  batch = make_batch()

  @jax.jit
  def loss_and_grads(params, key):
    def loss(p):
      out = nnx.merge(graphdef, p)(batch["face"], batch["mel"], batch["has_face"],
                                   rngs=nnx.Rngs(dropout=key))
      return (out["logits"] ** 2).mean() + out["gates"][:, 0].sum(), out
    return jax.value_and_grad(loss, has_aux=True)(params)

  (value, out), grads = loss_and_grads(_init_params("mfm"), jax.random.key(3))
  return value, out, nnx.to_pure_dict(grads)


# ----------------------------------------------------------------------------- precision


def test_auto_matmul_follows_the_backend(monkeypatch):
  for backend, want in (("cpu", "cpu_amx"), ("gpu", "xla"), ("tpu", "xla"), ("cuda", "xla")):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert layers.Precision.resolve("bfloat16", matmul="auto").matmul == want
    # Explicit choices are never overridden.
    assert layers.Precision.resolve("bfloat16", matmul="xla").matmul == "xla"
    assert layers.Precision.resolve("bfloat16", matmul="cpu_amx").matmul == "cpu_amx"
  cfg = config_lib.base_config().model.precision
  assert layers.Precision.from_config(cfg, backend="tpu") == layers.Precision("float32",
                                                                               "float32", "xla")


@pytest.mark.parametrize("key,value", [("compute_dtype", "float16"), ("param_dtype", "fp32"),
                                       ("matmul", "amx")])
def test_unknown_precision_values_name_the_key(key, value):
  with pytest.raises(layers.LayerConfigError, match=f"model.precision.{key}='{value}'"):
    layers.Precision.resolve(**{key: value})


def test_variant_dtype_arg_sets_the_compute_dtype():
  c = config_lib.apply_variant_args(config_lib.base_config(), "dtype=bfloat16")
  assert c.model.precision.compute_dtype == "bfloat16"
  assert c.model.precision.param_dtype == "float32"


def test_xla_path_lowers_without_optimization_barriers():
  """The portable path leaves layouts to the compiler; cpu_amx pins them with barriers."""
  texts = {}
  for path in ("xla", "cpu_amx"):
    model = nnx.eval_shape(lambda: ExpressionModel(
        tiny_model_config(), rngs=nnx.Rngs(0), precision=layers.Precision("bfloat16",
                                                                           matmul=path)))
    graphdef, params = nnx.split(model, nnx.Param)
    batch = make_batch()

    def loss(p):
      out = nnx.merge(graphdef, p)(batch["face"], batch["mel"], batch["has_face"])
      return out["logits"].sum()

    texts[path] = jax.jit(jax.grad(loss)).lower(params).as_text()
  assert "optimization_barrier" in texts["cpu_amx"]
  assert "optimization_barrier" not in texts["xla"]
  # The forward products take bf16 operands and accumulate in float32.
  assert re.search(r"dot_general .*: \(tensor<[0-9x]+xbf16>, tensor<[0-9x]+xbf16>\) -> "
                   r"tensor<[0-9x]+xf32>", texts["xla"])


def test_matmul_paths_agree_on_swin_and_mfm():
  """bf16 xla and cpu_amx: same logits, gates and gradients (encoders and MFM) within bf16
  tolerance, and both near float32."""
  v32, out32, g32 = _loss_and_grads("none", layers.FLOAT32)
  vx, outx, gx = _loss_and_grads("none", layers.Precision("bfloat16", matmul="xla"))
  va, outa, ga = _loss_and_grads("none", layers.Precision("bfloat16", matmul="cpu_amx"))
  np.testing.assert_allclose(outx["logits"], outa["logits"], atol=0.03, rtol=0.03)
  np.testing.assert_allclose(outx["gates"], outa["gates"], atol=0.01)
  np.testing.assert_allclose(outx["logits"], out32["logits"], atol=0.05, rtol=0.05)
  assert abs(float(vx) - float(va)) < 0.02 * abs(float(v32))
  for part in ("image_encoder", "audio_encoder", "fusion"):
    for x, a, w in zip(jax.tree.leaves(gx[part]), jax.tree.leaves(ga[part]),
                       jax.tree.leaves(g32[part])):
      assert x.dtype == a.dtype == jnp.float32
      scale = np.abs(w).max() + 1e-6
      assert np.abs(x - a).max() <= 0.05 * scale, part
      assert np.abs(x - w).max() <= 0.1 * scale, part


def test_param_dtype_is_the_storage_dtype():
  model = nnx.eval_shape(lambda: ExpressionModel(
      tiny_model_config(), rngs=nnx.Rngs(0),
      precision=layers.Precision("bfloat16", "bfloat16", "xla")))
  dtypes = {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}


# ----------------------------------------------------------------------------- primitives


def test_attention_matches_torch_multihead_attention():
  """Self- and cross-attention with an additive bias against torch's SDPA and projections."""
  rng = np.random.default_rng(0)
  dim, heads = 16, 4
  for cross in (False, True):
    attn = layers.MultiHeadAttention(dim, heads, cross=cross, kv_dim=12 if cross else None,
                                     rngs=nnx.Rngs(0))
    x = rng.normal(size=(2, 3, 5, dim)).astype(np.float32)  # two leading dims
    ctx = rng.normal(size=(2, 3, 7, 12)).astype(np.float32) if cross else x
    m = ctx.shape[2]
    bias = rng.normal(size=(3, heads, 5, m)).astype(np.float32)
    got = attn(jnp.asarray(x), jnp.asarray(ctx) if cross else None, bias=bias)

    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    lin = lambda y, d: t(y) @ t(d.kernel[...]) + t(d.bias[...])  # noqa: E731
    if cross:
      q = lin(x, attn.q)
      k, v = lin(ctx, attn.kv).chunk(2, dim=-1)
    else:
      q, k, v = lin(x, attn.qkv).chunk(3, dim=-1)
    split = lambda y: y.reshape(*y.shape[:-1], heads, dim // heads).transpose(-2, -3)  # noqa
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v),
                                                           attn_mask=t(bias))
    want = out.transpose(-2, -3).reshape(2, 3, 5, dim) @ t(attn.proj.kernel[...]) + t(
        attn.proj.bias[...])
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)


@pytest.mark.parametrize("activation,approximate", [("gelu", "none"), ("gelu_tanh", "tanh"),
                                                    ("quick_gelu", None)])
def test_mlp_activations_match_torch(activation, approximate):
  mlp = layers.Mlp(6, 10, out_dim=4, activation=activation, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
  h = torch.from_numpy(x) @ torch.from_numpy(np.asarray(mlp.fc1.kernel[...]))
  if approximate is None:
    h = h * torch.sigmoid(1.702 * h)
  else:
    h = torch.nn.functional.gelu(h, approximate=approximate)
  want = h @ torch.from_numpy(np.asarray(mlp.fc2.kernel[...]))
  np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), want.numpy(), atol=1e-5)
  with pytest.raises(ValueError, match="activation 'relu6'"):
    layers.Mlp(6, 10, activation="relu6", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_layer_norm_matches_torch(eps):
  ln = layers.LayerNorm(8, eps=eps)
  ln.scale.set_value(jnp.linspace(0.5, 1.5, 8))
  ln.bias.set_value(jnp.linspace(-1, 1, 8))
  x = (np.random.default_rng(2).normal(size=(4, 8)) * 0.1 + 3).astype(np.float32)
  want = torch.nn.functional.layer_norm(torch.from_numpy(x), (8,), torch.linspace(0.5, 1.5, 8),
                                        torch.linspace(-1, 1, 8), eps)
  np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x))), want.numpy(), atol=1e-4)


def test_dense_init_is_timm_truncated_normal():
  d = layers.Dense(512, 512, ("embed", "mlp"), rngs=nnx.Rngs(0))
  k = np.asarray(d.kernel[...])
  assert abs(k.std() - 0.02) < 0.001 and np.abs(k).max() < 0.2
  np.testing.assert_array_equal(np.asarray(d.bias[...]), 0.0)
  assert d.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")


# ----------------------------------------------------------------------------- remat


def test_remat_gives_the_same_gradients():
  """float32, with dropout, drop path and modality dropout active: every policy recomputes
  exactly the forward pass it replaces."""
  _, out, want = _loss_and_grads("none", layers.FLOAT32)
  for policy in ("block", "dots_saveable"):
    _, got_out, got = _loss_and_grads(policy, layers.FLOAT32)
    np.testing.assert_array_equal(got_out["gates"], out["gates"])  # same random draws
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_unknown_remat_policy_is_an_error():
  with pytest.raises(ValueError, match="model.remat='full'"):
    nnx.eval_shape(lambda: ExpressionModel(tiny_model_config(remat="full"), rngs=nnx.Rngs(0)))

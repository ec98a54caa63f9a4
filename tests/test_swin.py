"""Swin encoder: parity with timm's SwinTransformer, window constants, drop path, bf16 matmuls.

Models are built abstractly and filled from timm state dicts (through the import path, which
test_swin_import.py covers on its own): JAX's random init compiles for seconds on CPU.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.torch import save_file

from mfer_jax.models import layers
from mfer_jax.models import swin
from mfer_jax.models import swin_import
from mfer_jax.models import swin_layers
from mfer_jax.testing.timm_reference import timm_swin, torch


def _timm_and_ours(tmp_path, cfg: swin.SwinConfig, seed: int = 0):
  """A seeded random timm model (LayerNorms perturbed too) and our model with its weights."""
  torch.manual_seed(seed)
  ref = timm_swin.SwinTransformer(
      img_size=cfg.img_size, window_size=cfg.window_size, embed_dim=cfg.embed_dim,
      depths=cfg.depths, num_heads=cfg.num_heads, in_chans=cfg.in_chans).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))  # ones/zeros would hide a swapped scale and bias
  path = str(tmp_path / f"ref{seed}.safetensors")
  save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
  model = nnx.eval_shape(lambda: swin.SwinTransformer(cfg, rngs=nnx.Rngs(0)))
  swin_import.import_pretrained(model, path)
  return ref, model


def _reference_features(ref, x: np.ndarray):
  with torch.no_grad():
    tokens = ref.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    return tokens.numpy(), ref.forward_head(tokens, pre_logits=True).numpy()


@nnx.jit
def _forward(model, x):
  return model(x)


# Each case covers a different part of timm's window rules:
#  * window 12 at 384: the last stage (12x12) clamps to its extent and stops shifting;
#  * 64x128 mel-like, 1 channel, window 4: the last stage (4x8) shifts along W only;
#  * 96x160, window 7: padding in every stage and a (6, 7) window in the last one.
PARITY_CASES = {
    "window12_384": swin.SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                    img_size=(384, 384), window_size=12),
    "mel_64x128": swin.SwinConfig(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
                                  img_size=(64, 128), window_size=4, in_chans=1),
    "padded_96x160": swin.SwinConfig(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
                                     img_size=(96, 160), window_size=7),
}


@pytest.mark.parametrize("name", PARITY_CASES)
def test_matches_timm(tmp_path, name):
  cfg = PARITY_CASES[name]
  ref, model = _timm_and_ours(tmp_path, cfg)
  x = np.random.default_rng(0).normal(size=(2, *cfg.img_size, cfg.in_chans)).astype(np.float32)
  want_tokens, want_pooled = _reference_features(ref, x)
  tokens, pooled = _forward(model, jnp.asarray(x))
  assert tokens.shape == (2, *model.grid_size, model.num_features) == want_tokens.shape
  np.testing.assert_allclose(np.asarray(tokens), want_tokens, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), want_pooled, atol=1e-4, rtol=0)


def test_stage_windows_follow_timm_blocks():
  cfg = PARITY_CASES["padded_96x160"]
  ref = timm_swin.SwinTransformer(
      img_size=cfg.img_size, window_size=cfg.window_size, embed_dim=cfg.embed_dim,
      depths=cfg.depths, num_heads=cfg.num_heads)
  for stage, (window, shift) in zip(ref.layers, cfg.stage_windows()):
    assert tuple(stage.blocks[0].window_size) == window
    assert tuple(stage.blocks[0].shift_size) == (0, 0)
    assert tuple(stage.blocks[1].shift_size) == shift


def test_relative_position_index_matches_naive_loops():
  for wh, ww in [(7, 7), (3, 5), (1, 4)]:
    coords = [(i, j) for i in range(wh) for j in range(ww)]
    table = {(dy, dx): t for t, (dy, dx) in enumerate(
        itertools.product(range(-(wh - 1), wh), range(-(ww - 1), ww)))}
    want = np.array([[table[(qi - ki, qj - kj)] for ki, kj in coords] for qi, qj in coords])
    np.testing.assert_array_equal(swin_layers.relative_position_index((wh, ww)), want)


def _naive_shift_mask(size, window, shift):
  """Tokens of a shifted window may attend iff neither or both came around the wrap, per axis."""
  (h, w), (wh, ww), (sh, sw) = size, window, shift
  masks = []
  for r0 in range(0, h, wh):
    for c0 in range(0, w, ww):
      cells = [(r, c) for r in range(r0, r0 + wh) for c in range(c0, c0 + ww)]
      wrapped = [(r >= h - sh, c >= w - sw) for r, c in cells]
      masks.append([[0.0 if a == b else swin_layers.MASK_VALUE for b in wrapped]
                    for a in wrapped])
  return np.array(masks, np.float32)


@pytest.mark.parametrize("size,window,shift", [((14, 14), (7, 7), (3, 3)),
                                               ((8, 12), (4, 4), (2, 2)),
                                               ((4, 8), (4, 4), (0, 2))])
def test_shift_mask_matches_naive_construction(size, window, shift):
  got = swin_layers.shift_attention_mask(size, window, shift)
  np.testing.assert_array_equal(got, _naive_shift_mask(size, window, shift))


def test_no_mask_without_shift():
  assert swin_layers.shift_attention_mask((14, 14), (7, 7), (0, 0)) is None


def test_drop_path_only_with_rngs(tmp_path):
  cfg = swin.swin_config("test", img_size=(32, 32), window_size=4, drop_path_rate=0.5)
  _, model = _timm_and_ours(tmp_path, cfg)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 32, 32, 3)), jnp.float32)

  @nnx.jit
  def pooled(model, x, key):
    return model(x, rngs=nnx.Rngs(dropout=key))[1]

  base = np.asarray(_forward(model, x)[1])
  a = np.asarray(pooled(model, x, jax.random.key(1)))
  again = np.asarray(pooled(model, x, jax.random.key(1)))
  b = np.asarray(pooled(model, x, jax.random.key(2)))
  np.testing.assert_array_equal(a, again)
  assert np.abs(a - b).max() > 1e-3
  assert np.abs(a - base).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(_forward(model, x)[1]), base)


# Dense forward/backward, both attention products, and the patch embedding.
EINSUM_CASES = [("mi,io->mo", (6, 5), (5, 3)),
                ("bwhnd,bwhmd->bwhnm", (2, 3, 2, 4, 5), (2, 3, 2, 4, 5)),
                ("bwhnm,bwhmd->bwhnd", (2, 3, 2, 4, 4), (2, 3, 2, 4, 5)),
                ("bhpwqc,pqco->bhwo", (2, 3, 2, 3, 2, 3), (2, 2, 3, 4))]


@pytest.mark.parametrize("spec,sa,sb", EINSUM_CASES)
@pytest.mark.parametrize("dtype,path", [("float32", "xla"), ("float32", "cpu_amx"),
                                        ("bfloat16", "xla"), ("bfloat16", "cpu_amx")])
def test_einsum_and_its_gradients_match_jnp(spec, sa, sb, dtype, path):
  """Products of ``dtype``-rounded operands accumulated in float32.

  In the backward pass cpu_amx rounds the cotangent to bf16 (bf16-in / f32-out dots); xla
  transposes with the float32 cotangent (JAX's own rule) and rounds each operand's gradient
  to the operand's compute dtype, i.e. to bf16 at most one unit in the last place away.
  """
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (sa, sb))
  precision = layers.Precision(compute_dtype=dtype, matmul=path)
  out, vjp = jax.vjp(lambda a, b: layers.einsum(spec, a, b, precision), a, b)
  g = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  rnd = lambda t: t.astype(dtype).astype(jnp.float32)  # noqa: E731
  want_out, want_vjp = jax.vjp(
      lambda a, b: jnp.einsum(spec, a, b, precision="highest"), rnd(a), rnd(b))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  if path == "cpu_amx":
    wants, rtol = want_vjp(rnd(g)), 1e-5
  else:
    wants, rtol = [rnd(w) for w in want_vjp(g)], 1e-5 if dtype == "float32" else 2**-7
  for got, want in zip(vjp(g), wants):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-5)


def test_einsum_rejects_an_index_summed_within_one_operand():
  for path in ("xla", "cpu_amx"):
    with pytest.raises(ValueError, match="summed within one operand"):
      layers.einsum("ij,jk->k", jnp.ones((2, 3)), jnp.ones((3, 4)),
                    layers.Precision("bfloat16", matmul=path))


@pytest.mark.parametrize("path", ["xla", "cpu_amx"])
def test_bf16_compute_stays_close_to_float32(tmp_path, path):
  """Forward and gradients; the backward also checks every bf16 dot compiles on XLA:CPU."""
  cfg = swin.swin_config("test", img_size=(32, 64), window_size=4)
  _, model = _timm_and_ours(tmp_path, cfg)
  precision = layers.Precision("bfloat16", matmul=path)
  low = nnx.eval_shape(lambda: swin.SwinTransformer(cfg, rngs=nnx.Rngs(0), precision=precision))
  nnx.update(low, nnx.state(model))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 64, 3)), jnp.float32)

  @nnx.jit
  def pooled_and_grads(model, x):
    loss = lambda m: (m(x, rngs=nnx.Rngs(dropout=0))[1] ** 2).sum()  # noqa: E731
    return nnx.value_and_grad(loss)(model)

  want, want_grads = pooled_and_grads(model, x)
  got, got_grads = pooled_and_grads(low, x)
  assert abs(float(got) - float(want)) < 0.05 * abs(float(want))
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    assert g.dtype == jnp.float32
    assert np.abs(np.asarray(g) - w).max() <= 0.1 * np.abs(w).max() + 1e-6


def test_config_errors_and_shapes():
  with pytest.raises(ValueError, match="known: tiny, small, base, large"):
    swin.swin_config("huge")
  cfg = swin.swin_config("tiny", img_size=(224, 448))
  model = nnx.eval_shape(lambda: swin.SwinTransformer(cfg, rngs=nnx.Rngs(0)))
  assert (model.num_features, model.grid_size) == (768, (7, 14))
  with pytest.raises(ValueError, match=r"expected input \[B, 224, 448, 3\] \(NHWC\)"):
    model(jnp.zeros((1, 3, 224, 448)))
  with pytest.raises(ValueError, match="multiple of patch_size"):
    swin.swin_config("tiny", img_size=(226, 224))


def test_params_carry_logical_axis_names():
  cfg = swin.swin_config("test", img_size=(32, 32), window_size=4)
  model = nnx.eval_shape(lambda: swin.SwinTransformer(cfg, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  names = {"/".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in flat}
  assert all(len(v.get_metadata()["out_sharding"]) == len(v.shape) for _, v in flat)
  assert names["layers/0/blocks/1/attn/qkv/kernel"] == ("embed", "heads")
  assert names["layers/0/blocks/1/attn/proj/kernel"] == ("heads", "embed")
  assert names["layers/1/blocks/0/mlp/fc1/kernel"] == ("embed", "mlp")
  assert names["layers/1/blocks/0/mlp/fc2/bias"] == ("embed",)
  assert names["layers/1/downsample/reduction/kernel"] == (None, "embed")
  assert names["norm/scale"] == ("embed",)
  assert names["patch_embed/kernel"] == (None, None, None, "embed")

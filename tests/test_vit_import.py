"""ViT encoders (DINOv2, MAE, CLIP) against timm: import, position-embedding resize, errors.

Each reference is a random-initialised timm model (no download) with its LayerNorms, biases,
LayerScales and tokens perturbed, so that a swapped or dropped parameter changes the output;
each model compiles once. ViT-B models run 2 blocks: every block is the same code.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.torch import save_file

from mfer_jax.models import import_common
from mfer_jax.models import swin_import
from mfer_jax.models import vit
from mfer_jax.models import vit_import
from mfer_jax.testing.timm_reference import timm, torch
from timm.layers import resample_abs_pos_embed
from timm.models import vision_transformer as timm_vit


def _perturb(model, seed=0):
  """Moves every norm, bias, LayerScale and token away from its init value."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias") or "token" in name:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
      elif name.endswith("gamma"):   # LayerScale inits to 1e-5: make the blocks count
        p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _save(model, path):
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
  return str(path)


def _ours(cfg, path):
  model = nnx.eval_shape(lambda: vit.VisionTransformer(cfg, rngs=nnx.Rngs(0)))
  swin_import.apply_to_model(model, vit_import.load_vit_params(path, cfg))
  return model


def _close(ours, want):
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-4,
                             atol=1e-4 * float(np.abs(want).max()))


def _compare(ref, model, cfg, seed=0):
  x = np.random.default_rng(seed).normal(size=(2, *cfg.img_size, 3)).astype(np.float32)
  with torch.no_grad():
    tokens = ref.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    pooled = ref.forward_head(tokens, pre_logits=True).numpy()
  grid, ours_pooled = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))
  h, w = cfg.grid_size
  patches = tokens[:, cfg.num_prefix_tokens:].numpy().reshape(2, h, w, -1)
  _close(grid, patches)
  _close(ours_pooled, pooled)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
  """timm DINOv2 ViT-S/14 with 4 registers at its 518-px default, full depth."""
  d = tmp_path_factory.mktemp("dinov2")
  torch.manual_seed(0)
  ref = _perturb(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False,
                                   num_classes=0))
  return ref, _save(ref, d / "dinov2.safetensors"), d


def test_dinov2_s14_registers_at_another_size_matches_timm(dinov2):
  """Loaded at 112 px (8x8 patches, from 37x37): timm's own loader resizes the same way."""
  ref, path, _ = dinov2
  cfg = vit.vit_config("dinov2_s14_reg", img_size=(112, 112))
  target = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                             img_size=112)
  target.load_state_dict(timm_vit.checkpoint_filter_fn(ref.state_dict(), target))
  _compare(target.eval(), _ours(cfg, path), cfg)


def test_mae_b16_matches_timm(tmp_path):
  torch.manual_seed(1)
  ref = _perturb(timm.create_model("vit_base_patch16_224", pretrained=False, depth=2,
                                   img_size=112, num_classes=0, global_pool="avg",
                                   fc_norm=False), seed=1)
  cfg = vit.vit_config("mae_b16", img_size=(112, 112), depth=2)
  assert cfg.pool == "avg"
  _compare(ref, _ours(cfg, _save(ref, tmp_path / "mae.safetensors")), cfg, seed=1)


def test_clip_b16_quick_gelu_pre_norm_matches_timm(tmp_path):
  torch.manual_seed(2)
  ref = _perturb(timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False,
                                   depth=2, img_size=112, num_classes=0), seed=2)
  cfg = vit.vit_config("clip_b16", img_size=(112, 112), depth=2)
  _compare(ref, _ours(cfg, _save(ref, tmp_path / "clip.safetensors")), cfg, seed=2)


@pytest.mark.parametrize("old,new,prefix", [
    ((37, 37), (8, 8), 0),     # DINOv2 518 -> 112: downsampling, antialiased
    ((14, 14), (7, 7), 1),     # ViT-B/16 224 -> 112 with the class token's embedding
    ((7, 7), (16, 16), 1),     # upsampling
    ((14, 14), (8, 12), 5),    # non-square target, class + 4 registers
])
def test_position_embedding_resize_matches_timm(old, new, prefix):
  posemb = np.random.default_rng(0).normal(size=(1, prefix + old[0] * old[1], 24))
  posemb = posemb.astype(np.float32)
  want = resample_abs_pos_embed(torch.from_numpy(posemb), list(new), list(old),
                                num_prefix_tokens=prefix).numpy()
  got = vit_import.resample_pos_embed(posemb, new, prefix)
  assert got.shape == want.shape
  _close(got, want)
  np.testing.assert_array_equal(got[:, :prefix], posemb[:, :prefix])


def test_pth_and_converted_files_give_the_same_params(dinov2, tmp_path):
  ref, path, _ = dinov2
  cfg = vit.vit_config("dinov2_s14_reg", img_size=(112, 112))
  torch.save(ref.state_dict(), tmp_path / "dinov2.pth")
  first = vit_import.load_vit_params(path, cfg)
  from_pth = vit_import.load_vit_params(str(tmp_path / "dinov2.pth"), cfg)
  vit_import.save_params(str(tmp_path / "ours.safetensors"), first, cfg)
  ours = vit_import.load_vit_params(str(tmp_path / "ours.safetensors"), cfg)
  for params in (from_pth, ours):
    assert params.keys() == first.keys()
    for k in first:
      np.testing.assert_array_equal(params[k], first[k], err_msg=k)


def test_wrong_variant_names_the_expected_and_the_found_one(dinov2):
  _, path, _ = dinov2
  with pytest.raises(vit_import.CheckpointError) as e:
    vit_import.load_vit_params(path, vit.vit_config("dinov2_b14_reg"))
  msg = str(e.value)
  assert "dinov2_b14_reg (vit_base_patch14_reg4_dinov2)" in msg       # what the config wants
  assert "looks like dinov2_s14_reg (vit_small_patch14_reg4_dinov2)" in msg  # what it holds
  assert "mis-shaped keys: blocks.0.attn.proj.bias" in msg
  with pytest.raises(vit_import.CheckpointError) as e:   # registers missing from the model
    vit_import.load_vit_params(path, vit.vit_config("dinov2_s14"))
  assert "1 unexpected keys: reg_token" in str(e.value)


def test_a_swin_checkpoint_is_named_as_such(tmp_path):
  swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1))
  path = _save(swin, tmp_path / "swin.safetensors")
  with pytest.raises(vit_import.CheckpointError, match="is a swin checkpoint.*--family=swin"):
    vit_import.load_vit_params(path, vit.vit_config("vit_b16"))
  assert import_common.identify_family(import_common.read_state_dict(path)) == "swin"


def test_pickled_objects_are_refused(dinov2, tmp_path):
  ref, _, _ = dinov2
  path = tmp_path / "pickled.pth"
  torch.save({"state_dict": ref.state_dict(), "args": argparse_namespace()}, path)
  with pytest.raises(vit_import.CheckpointError, match="pickled objects"):
    vit_import.load_vit_params(str(path), vit.vit_config("dinov2_s14_reg", img_size=112))


def argparse_namespace():
  import argparse  # pylint: disable=g-import-not-at-top
  return argparse.Namespace(lr=0.1)

"""Pretrained import: timm / Microsoft checkpoint files -> our Swin, checked against timm itself."""

import argparse
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.torch import save_file

from mfer_jax.models import model as model_lib
from mfer_jax.models import swin
from mfer_jax.models import swin_import
from mfer_jax.testing.timm_reference import timm, timm_swin, torch

TINY = swin.swin_config("tiny")
# A small architecture for the adaptation paths; its timm checkpoint is made at window 7, 112.
SMALL_ARCH = dict(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4))


def _perturb(model):
  """Random LayerNorm params and biases, so swapped scale/bias or a dropped key shows."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _save_safetensors(sd, path):
  save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  return str(path)


def _microsoft_layout(ref) -> dict:
  """The original release's keys: downsample at the end of stage N, plain head, buffers."""
  out = {}
  for k, v in ref.state_dict().items():
    k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k)
    out[k.replace("head.fc.", "head.")] = v
  for i, stage in enumerate(ref.layers):
    for j, block in enumerate(stage.blocks):
      out[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = (
          block.attn.relative_position_index)
      if block.attn_mask is not None:
        out[f"layers.{i}.blocks.{j}.attn_mask"] = block.attn_mask
  return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """One seeded random timm swin_tiny, written as timm .safetensors, timm .pth and MS .pth."""
  d = tmp_path_factory.mktemp("tiny")
  torch.manual_seed(0)
  ref = _perturb(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False))
  sd = ref.state_dict()
  torch.save(sd, d / "timm.pth")
  torch.save({"model": _microsoft_layout(ref)}, d / "ms.pth")
  files = {"safetensors": _save_safetensors(sd, d / "timm.safetensors"),
           "pth": str(d / "timm.pth"), "microsoft": str(d / "ms.pth")}
  return ref, files, d


def _model(cfg, params):
  model = nnx.eval_shape(lambda: swin.SwinTransformer(cfg, rngs=nnx.Rngs(0)))
  swin_import.apply_to_model(model, params)
  return model


def _compare(ref, model, cfg, batch=1, seed=0):
  x = np.random.default_rng(seed).normal(size=(batch, *cfg.img_size, cfg.in_chans))
  x = x.astype(np.float32)
  with torch.no_grad():
    want_tokens = ref.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
    want_pooled = ref.forward_head(want_tokens, pre_logits=True).numpy()
  tokens, pooled = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(tokens), want_tokens.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), want_pooled, atol=1e-4, rtol=0)


def test_every_format_gives_the_same_params(tiny):
  _, files, _ = tiny
  loaded = {name: swin_import.load_swin_params(f, TINY) for name, f in files.items()}
  first = loaded.pop("safetensors")
  for params in loaded.values():
    assert params.keys() == first.keys()
    for k in first:
      np.testing.assert_array_equal(params[k], first[k], err_msg=k)


def test_data_parallel_prefix_is_stripped_in_both_layouts(tiny, tmp_path):
  """DataParallel/DDP checkpoints prefix every key with ``module.``, Microsoft's too."""
  ref, files, _ = tiny
  want = swin_import.load_swin_params(files["safetensors"], TINY)
  for name, sd in (("timm", ref.state_dict()), ("microsoft", _microsoft_layout(ref))):
    path = tmp_path / f"{name}_ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    got = swin_import.load_swin_params(str(path), TINY)
    assert got.keys() == want.keys(), name
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")


def test_swin_tiny_matches_timm(tiny):
  ref, files, _ = tiny
  _compare(ref, _model(TINY, swin_import.load_swin_params(files["microsoft"], TINY)), TINY)


def test_convert_cli_round_trip(tiny):
  _, files, d = tiny
  out = d / "visual_init.safetensors"
  run = subprocess.run([sys.executable, "-m", "mfer_jax.tools.convert",
                        f"--in={files['microsoft']}", "--variant=tiny", "--img_size=224,224",
                        "--window=7", "--in_chans=3", f"--out={out}"],
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0 and "swin_tiny" in run.stdout, run.stderr
  ours = swin_import.load_swin_params(str(out), TINY)
  want = swin_import.load_swin_params(files["safetensors"], TINY)
  assert ours.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(ours[k], want[k], err_msg=k)


def test_convert_help():
  run = subprocess.run([sys.executable, "-m", "mfer_jax.tools.convert", "--help"],
                       capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr
  assert "--img_size" in run.stdout and "--variant" in run.stdout, run.stderr


@pytest.fixture(scope="module")
def small_w7(tmp_path_factory):
  """A small timm Swin checkpoint trained (randomly) at window 7 and 112x112."""
  torch.manual_seed(1)
  ref = _perturb(timm_swin.SwinTransformer(img_size=112, window_size=7, **SMALL_ARCH))
  path = tmp_path_factory.mktemp("small") / "w7.safetensors"
  return ref.state_dict(), _save_safetensors(ref.state_dict(), path)


# window 12 at 192: tables 13x13 -> 23x23; 64x128: the last stage's window clamps to (4, 7),
# a non-square table timm derives from the square one.
@pytest.mark.parametrize("img_size,window", [((192, 192), 12), ((64, 128), 7)])
def test_window_change_matches_timm_filter(small_w7, img_size, window):
  sd, path = small_w7
  cfg = swin.SwinConfig(img_size=img_size, window_size=window, **SMALL_ARCH)
  ref = timm_swin.SwinTransformer(img_size=img_size, window_size=window, **SMALL_ARCH).eval()
  ref.load_state_dict(timm_swin.checkpoint_filter_fn(dict(sd), ref))
  params = swin_import.load_swin_params(path, cfg)
  for i, stage in enumerate(ref.layers):
    want = stage.blocks[1].attn.relative_position_bias_table.detach().numpy()
    got = params[f"layers/{i}/blocks/1/attn/relative_position_bias_table"]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  _compare(ref, _model(cfg, params), cfg)


def test_one_channel_model_equals_the_rgb_model_on_a_grey_image(small_w7, tmp_path):
  """A uint8 spectrogram through our 1-channel encoder (its own input normalisation, the
  imported weights) gives the 3-channel timm model's output on the same grey image repeated
  into RGB and normalised with the ImageNet statistics it was trained with. Also through a
  converted 1-channel file (`save_params` -> load)."""
  sd, path = small_w7
  size = (64, 128)
  cfg = swin.SwinConfig(img_size=size, window_size=4, in_chans=1, **SMALL_ARCH)
  ref = timm_swin.SwinTransformer(img_size=size, window_size=4, **SMALL_ARCH).eval()
  ref.load_state_dict(timm_swin.checkpoint_filter_fn(dict(sd), ref))
  mel = np.random.default_rng(0).integers(0, 256, (2, *size), np.uint8)
  rgb = np.repeat(mel[..., None] / 255.0, 3, axis=-1)
  rgb = ((rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]))
  with torch.no_grad():
    want = ref.forward_features(torch.from_numpy(rgb.astype(np.float32)).permute(0, 3, 1, 2))
    want_pooled = ref.forward_head(want, pre_logits=True).numpy()
  x = model_lib.mel_to_input(jnp.asarray(mel), size, 1)
  params = swin_import.load_swin_params(path, cfg)
  converted = tmp_path / "grey.safetensors"
  swin_import.save_params(str(converted), params, cfg)
  for p in (params, swin_import.load_swin_params(str(converted), cfg)):
    tokens, pooled = nnx.jit(lambda m, x: m(x))(_model(cfg, p), x)
    np.testing.assert_allclose(np.asarray(tokens), want.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), want_pooled, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["timm.safetensors", "timm.pth"])
def test_truncated_file_is_named_with_a_fix(tiny, tmp_path, name):
  _, _, d = tiny
  data = (d / name).read_bytes()
  cut = tmp_path / name
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(swin_import.CheckpointError) as e:
    swin_import.load_swin_params(str(cut), TINY)
  assert str(cut) in str(e.value)
  assert "truncated" in str(e.value) and "re-export" in str(e.value)


def test_bigger_variant_checkpoint_for_tiny(tiny, tmp_path):
  """A swin_small-shaped file (18 blocks in stage 2) given for variant tiny."""
  ref, _, _ = tiny
  sd = dict(ref.state_dict())
  for j in range(6, 18):
    for k, v in list(ref.state_dict().items()):
      if k.startswith("layers.2.blocks.0."):
        sd[k.replace("blocks.0.", f"blocks.{j}.")] = v.clone()
  path = _save_safetensors(sd, tmp_path / "small.safetensors")
  with pytest.raises(swin_import.CheckpointError) as e:
    swin_import.load_swin_params(path, TINY)
  msg = str(e.value)
  assert "looks like swin_small" in msg and "does not fit swin_tiny" in msg
  assert "156 unexpected keys: layers.2.blocks.10." in msg  # 12 blocks x 13 tensors
  assert "missing" not in msg


def test_tiny_checkpoint_for_base(tiny):
  _, files, _ = tiny
  with pytest.raises(swin_import.CheckpointError) as e:
    swin_import.load_swin_params(files["pth"], swin.swin_config("base"))
  msg = str(e.value)
  assert "looks like swin_tiny" in msg and "does not fit swin_base" in msg
  assert "missing keys: layers.2.blocks.6." in msg
  assert "mis-shaped keys: " in msg
  assert "layers.0.blocks.0.attn.qkv.weight (288, 96) (model wants (128, 384))" in msg


def test_missing_key_is_listed(tiny, tmp_path):
  ref, _, _ = tiny
  sd = {k: v for k, v in ref.state_dict().items() if k != "norm.weight"}
  path = _save_safetensors(sd, tmp_path / "no_norm.safetensors")
  with pytest.raises(swin_import.CheckpointError, match="1 missing keys: norm.weight$"):
    swin_import.load_swin_params(path, TINY)


def test_pickled_objects_are_refused(tiny, tmp_path):
  ref, _, _ = tiny
  path = tmp_path / "with_args.pth"
  torch.save({"model": ref.state_dict(), "args": argparse.Namespace(lr=1)}, path)
  with pytest.raises(swin_import.CheckpointError, match="not loaded .no code"):
    swin_import.load_swin_params(str(path), TINY)

"""``python -m mfer_jax.tools.convert --family=vit|wav2vec2|hubert``, run as a user would."""

import numpy as np
import pytest
from safetensors.torch import save_file

from mfer_jax.models import import_common
from mfer_jax.models import vit
from mfer_jax.models import vit_import
from mfer_jax.models import wav2vec2
from mfer_jax.models import wav2vec2_import
from mfer_jax.testing.hf_reference import torch, transformers
from mfer_jax.testing.timm_reference import timm
from tests import commands


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  d = tmp_path_factory.mktemp("ckpt")
  torch.manual_seed(0)
  out = {}
  model = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, depth=1,
                            num_classes=0)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            str(d / "clip.safetensors"))
  out["vit"] = str(d / "clip.safetensors")
  # Our "test" ViT variant is a tiny DINOv2-with-registers; timm builds it at 64 px.
  small = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, embed_dim=32,
                            depth=2, num_heads=2, patch_size=8, img_size=64, num_classes=0)
  save_file({k: v.contiguous() for k, v in small.state_dict().items()},
            str(d / "small.safetensors"))
  out["vit_test"] = str(d / "small.safetensors")
  hub = transformers.HubertForCTC(transformers.HubertConfig(
      num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
      conv_dim=(16,) * 7))
  torch.save(hub.state_dict(), d / "pytorch_model.bin")
  out["hubert"] = str(d / "pytorch_model.bin")
  torch.save({"state_dict": hub.state_dict(), "epoch": object()}, d / "pickled.pth")
  out["pickled"] = str(d / "pickled.pth")
  return out, d


def test_vit_convert_resizes_and_writes_params_that_load_back(checkpoints, tmp_path):
  files, _ = checkpoints
  out = tmp_path / "vit_32.safetensors"
  proc = commands.run("mfer_jax.tools.convert", "--family=vit", "--variant=test",
                      "--img_size=32,32", f"--in={files['vit_test']}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "for test 32x32" in proc.stdout
  cfg = vit.vit_config("test", img_size=32)
  want = vit_import.load_vit_params(files["vit_test"], cfg)   # 8x8 -> 4x4 patches
  got = vit_import.load_vit_params(str(out), cfg)
  assert got["pos_embed"].shape == (1, 16, 32)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert import_common.read_params_meta(str(out))["img_size"] == "32,32"


def test_vit_convert_refuses_a_shallower_checkpoint(checkpoints, tmp_path):
  files, _ = checkpoints
  out = tmp_path / "clip_112.safetensors"
  proc = commands.run("mfer_jax.tools.convert", "--family=vit", "--variant=clip_b16",
                      "--img_size=112,112", f"--in={files['vit']}", f"--out={out}")
  # The timm model has one block, the variant twelve: refused, naming both.
  commands.assert_user_error(proc, 1, "clip_b16 (vit_base_patch16_clip_quickgelu_224.openai)",
                             "missing keys: blocks.1.")
  assert not out.exists()


def test_hubert_bin_with_a_head_converts(checkpoints, tmp_path):
  files, _ = checkpoints
  out = tmp_path / "hubert.safetensors"
  proc = commands.run("mfer_jax.tools.convert", "--family=hubert", "--variant=test",
                      f"--in={files['hubert']}", f"--out={out}")
  # The test variant has two layers; the checkpoint one: refused with the list.
  commands.assert_user_error(proc, 1, "hubert test encoder", "missing keys: encoder.layers.1.")
  cfg = wav2vec2.wav2vec2_config("hubert", "test", num_layers=1)
  params = wav2vec2_import.load_wav2vec2_params(files["hubert"], cfg)
  wav2vec2_import.save_params(str(out), params, cfg)
  assert import_common.read_params_meta(str(out))["format"] == "mfer_jax.wav2vec2"
  again = wav2vec2_import.load_wav2vec2_params(str(out), cfg)
  for k in params:
    np.testing.assert_array_equal(again[k], params[k])


def test_wrong_family_is_a_usage_error_naming_the_right_one(checkpoints, tmp_path):
  files, _ = checkpoints
  proc = commands.run("mfer_jax.tools.convert", "--family=wav2vec2", f"--in={files['vit']}",
                      f"--out={tmp_path / 'x.safetensors'}")
  commands.assert_user_error(proc, 2, "holds a vit checkpoint, not wav2vec2", "--family=vit")
  proc = commands.run("mfer_jax.tools.convert", "--family=vit", "--variant=nope",
                      f"--in={files['vit']}", f"--out={tmp_path / 'x.safetensors'}")
  commands.assert_user_error(proc, 2, "--variant=nope", "dinov2_s14_reg")


def test_pickled_objects_are_refused(checkpoints, tmp_path):
  files, _ = checkpoints
  proc = commands.run("mfer_jax.tools.convert", "--family=hubert", f"--in={files['pickled']}",
                      f"--out={tmp_path / 'x.safetensors'}")
  commands.assert_user_error(proc, 1, "pickled objects")
  assert not (tmp_path / "x.safetensors").exists()

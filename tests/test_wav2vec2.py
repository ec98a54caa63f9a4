"""wav2vec 2.0 and HuBERT against Hugging Face transformers: import, parity, frames, errors.

References are random-initialised ``transformers`` models built from a config (no
download) with norms, biases and the weight-norm gains perturbed, so that a swapped or dropped
parameter shows. Base-size models run 2 transformer layers: every layer is the same code.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.torch import save_file

from mfer_jax.media import audio_features
from mfer_jax.models import swin_import
from mfer_jax.models import wav2vec2
from mfer_jax.models import wav2vec2_import
from mfer_jax.testing.hf_reference import torch, transformers


def _perturb(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias") or "original0" in name:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _save(sd, path):
  save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  return str(path)


def _ours(cfg, path):
  model = nnx.eval_shape(lambda: wav2vec2.Wav2Vec2Model(cfg, rngs=nnx.Rngs(0)))
  swin_import.apply_to_model(model, wav2vec2_import.load_wav2vec2_params(path, cfg))
  return model


def _close(ours, want):
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-4,
                             atol=1e-4 * float(np.abs(want).max()))


def _compare(ref, model, seed, samples=16000):
  wave = np.random.default_rng(seed).normal(scale=0.3, size=(2, samples)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(wave)).last_hidden_state.numpy()
  tokens, pooled = nnx.jit(lambda m, w: m(w))(model, jnp.asarray(wave))
  assert tokens.shape == want.shape == (2, model.cfg.num_frames(samples), model.cfg.hidden_size)
  _close(tokens, want)
  _close(pooled, want.mean(axis=1))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """HF wav2vec 2.0 base (group-norm feature encoder, post-LN), 2 layers."""
  d = tmp_path_factory.mktemp("w2v")
  torch.manual_seed(0)
  ref = _perturb(transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(num_hidden_layers=2)), 0)
  return ref, _save(ref.state_dict(), d / "model.safetensors"), d


def test_wav2vec2_base_matches_transformers(base):
  ref, path, _ = base
  _compare(ref, _ours(wav2vec2.wav2vec2_config("wav2vec2", "base", num_layers=2), path), 0)


def test_hubert_base_matches_transformers(tmp_path):
  torch.manual_seed(1)
  ref = _perturb(transformers.HubertModel(transformers.HubertConfig(num_hidden_layers=2)), 1)
  cfg = wav2vec2.wav2vec2_config("hubert", "base", num_layers=2)
  _compare(ref, _ours(cfg, _save(ref.state_dict(), tmp_path / "hubert.safetensors")), 1)


def test_layer_norm_feature_encoder_and_pre_ln_blocks_match_transformers(tmp_path):
  """The large-lv60 / XLS-R / HuBERT-large layout at a small width."""
  torch.manual_seed(2)
  hf_cfg = transformers.Wav2Vec2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
      conv_dim=(16,) * 7, feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True)
  ref = _perturb(transformers.Wav2Vec2Model(hf_cfg), 2)
  cfg = wav2vec2.wav2vec2_config("wav2vec2", "test_stable")
  _compare(ref, _ours(cfg, _save(ref.state_dict(), tmp_path / "lv60.safetensors")), 2,
           samples=8000)


def test_every_layout_and_format_gives_the_same_params(base, tmp_path):
  """HF .bin, a ForCTC checkpoint (prefix, head), old weight_g/weight_v names, our file."""
  ref, path, _ = base
  cfg = wav2vec2.wav2vec2_config("wav2vec2", "base", num_layers=2)
  first = wav2vec2_import.load_wav2vec2_params(path, cfg)
  sd = ref.state_dict()
  torch.save(sd, tmp_path / "pytorch_model.bin")
  ctc = {f"wav2vec2.{k}": v for k, v in sd.items()}
  ctc.update({"lm_head.weight": torch.zeros(32, 768), "lm_head.bias": torch.zeros(32)})
  old = {k.replace("parametrizations.weight.original0", "weight_g")
          .replace("parametrizations.weight.original1", "weight_v"): v for k, v in sd.items()}
  files = [str(tmp_path / "pytorch_model.bin"), _save(ctc, tmp_path / "ctc.safetensors"),
           _save(old, tmp_path / "old.safetensors")]
  wav2vec2_import.save_params(str(tmp_path / "ours.safetensors"), first, cfg)
  files.append(str(tmp_path / "ours.safetensors"))
  for f in files:
    params = wav2vec2_import.load_wav2vec2_params(f, cfg)
    assert params.keys() == first.keys(), f
    for k in first:
      np.testing.assert_array_equal(params[k], first[k], err_msg=f"{f}: {k}")


def test_wrong_size_names_the_expected_variant_and_lists_keys(base):
  _, path, _ = base
  with pytest.raises(wav2vec2_import.CheckpointError) as e:
    wav2vec2_import.load_wav2vec2_params(path, wav2vec2.wav2vec2_config("wav2vec2", "large"))
  msg = str(e.value)
  assert "wav2vec2 large (facebook/wav2vec2-large) encoder" in msg
  assert "264 missing keys: encoder.layers.2." in msg   # 22 layers x 12 tensors
  assert "mis-shaped keys: encoder.layer_norm.bias (768,) (model wants (1024,))" in msg


def test_a_full_base_checkpoint_is_recognised():
  """describe_source reads key names and the projection's shape (no 95M-param file needed)."""
  cfg = wav2vec2.wav2vec2_config("hubert", "base")
  sd = {wav2vec2_import.hf_key(p): np.zeros((0,), np.float32)
        for p in wav2vec2_import.expected_shapes(cfg)}
  sd["feature_projection.projection.weight"] = np.zeros((768, 512), np.float32)
  assert wav2vec2_import.describe_source(sd) == (
      "the checkpoint looks like wav2vec2 base (facebook/wav2vec2-base)")
  sd = {f"hubert.{k}": v for k, v in sd.items()}
  assert wav2vec2_import.describe_source(sd) == (
      "the checkpoint looks like hubert base (facebook/hubert-base-ls960)")


def test_a_vit_checkpoint_is_named_as_such(tmp_path):
  from mfer_jax.testing.timm_reference import timm  # pylint: disable=g-import-not-at-top
  vit = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1)
  path = _save(vit.state_dict(), tmp_path / "vit.safetensors")
  with pytest.raises(wav2vec2_import.CheckpointError, match="is a vit checkpoint.*--family=vit"):
    wav2vec2_import.load_wav2vec2_params(path, wav2vec2.wav2vec2_config("hubert", "base"))


@pytest.mark.parametrize("samples", [400, 719, 720, 16000, 16319, 16320, 48123])
def test_padded_frames_are_the_mel_columns(samples):
  """Padded by half the receptive field, frame j is centred on sample j * 320: mel column j."""
  cfg = wav2vec2.wav2vec2_config("wav2vec2", "base")
  assert (cfg.hop, cfg.receptive_field) == (320, 400)
  padded = wav2vec2.padded_frames(np.zeros((1, samples)), cfg)
  params = audio_features.FeatureParams()
  assert cfg.num_frames(padded.shape[1]) == audio_features.num_mel_columns(samples, params)

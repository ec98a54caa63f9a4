"""wav2vec 2.0 and HuBERT audio encoders on raw 16 kHz waveform, identical to `transformers`.

Both models share one architecture (Baevski et al. 2020; Hsu et al. 2021), which this module
builds from a `Wav2Vec2Config`:

1. **Feature encoder**: seven 1-D convolutions (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2,
   so one output frame per 320 samples = 20 ms, each seeing 400 samples = 25 ms), GELU after
   each. ``feat_extract_norm="group"`` (base models) puts a per-channel GroupNorm after the
   first convolution only; ``"layer"`` (large-lv60, XLS-R, HuBERT large) a LayerNorm after
   every one. The convolutions run as strided patches and one matmul each, so they follow
   the model's precision policy like every other dense layer.
2. **Feature projection**: LayerNorm (absent in some HuBERT configs) and a linear map to the
   model width.
3. **Convolutional position embedding**: a grouped convolution (kernel 128, 16 groups) with
   weight normalisation over the kernel axis (``weight = g * v / |v|``), "same" padding with
   the extra frame of an even kernel dropped, GELU, added to the input.
4. **Transformer**: post-LN blocks with a LayerNorm before the first one
   (``stable_layer_norm=False``: the base models), or pre-LN blocks with a final LayerNorm
   (``True``: large-lv60, XLS-R, HuBERT large).

The encoder returns ``(tokens [B, T, C], pooled [B, C])``: the last hidden state (HF's
``last_hidden_state``) and its mean over time. No normalisation of the waveform happens here;
the extractor normalises each track (`mfer_jax.features`), as HF's feature extractor would
each utterance.

Frames and time: with the waveform padded by `Wav2Vec2Config.receptive_field` // 2 samples
at both ends, output frame j is centred on sample ``j * hop`` (t = j * 20 ms), which is where
log-mel column j of the data preparation is centred (hop 320 at 16 kHz). The feature
extractor uses this to align the frames with video frames exactly as the mel windows are.

Parameter paths mirror the Hugging Face module names, except that an attention's
``q_proj`` / ``k_proj`` / ``v_proj`` are fused into one ``qkv`` and ``out_proj`` is ``proj``,
and the feed-forward's ``intermediate_dense`` / ``output_dense`` are ``fc1`` / ``fc2`` (the
shared `layers.MultiHeadAttention` and `layers.Mlp`); `mfer_jax.models.wav2vec2_import`
maps them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfer_jax import sharding
from mfer_jax.models import layers
from mfer_jax.models.layers import FLOAT32, Precision

FAMILIES = ("wav2vec2", "hubert")
SAMPLE_RATE = 16000

_CONV = dict(conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
             conv_stride=(5, 2, 2, 2, 2, 2, 2))
_BASE = dict(_CONV, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
             feat_extract_norm="group", conv_bias=False, stable_layer_norm=False)
_LARGE = dict(_BASE, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
_LV60 = dict(_LARGE, feat_extract_norm="layer", conv_bias=True, stable_layer_norm=True)
# Test size: the real convolution stack (so frames are 20 ms), a narrow transformer.
_TEST = dict(_BASE, conv_dim=(16,) * 7, hidden_size=32, num_layers=2, num_heads=2,
             intermediate_size=64)

# (family, variant) -> (Hugging Face checkpoint it matches, architecture).
VARIANTS: dict[tuple[str, str], tuple[str, dict]] = {
    ("wav2vec2", "base"): ("facebook/wav2vec2-base", _BASE),
    ("wav2vec2", "large"): ("facebook/wav2vec2-large", _LARGE),
    ("wav2vec2", "large_lv60"): ("facebook/wav2vec2-large-lv60", _LV60),
    ("wav2vec2", "xlsr_53"): ("facebook/wav2vec2-large-xlsr-53", _LV60),
    ("wav2vec2", "test"): ("", _TEST),
    ("wav2vec2", "test_stable"): ("", dict(_TEST, feat_extract_norm="layer", conv_bias=True,
                                           stable_layer_norm=True)),
    ("hubert", "base"): ("facebook/hubert-base-ls960", _BASE),
    ("hubert", "large"): ("facebook/hubert-large-ll60k", _LV60),
    ("hubert", "test"): ("", _TEST),
}


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
  """Architecture of a wav2vec 2.0 / HuBERT encoder; build a named one with `wav2vec2_config`.

  Attributes:
    family: "wav2vec2" or "hubert" (the same computation; names the checkpoint family).
    hidden_size, num_layers, num_heads, intermediate_size: the transformer.
    conv_dim, conv_kernel, conv_stride: the feature encoder's convolutions.
    conv_bias: whether those convolutions have biases.
    feat_extract_norm: "group" (GroupNorm after the first convolution) or "layer"
      (LayerNorm after each).
    feat_proj_norm: LayerNorm before the feature projection.
    stable_layer_norm: pre-LN transformer blocks and a final LayerNorm (else post-LN blocks
      and a LayerNorm before them).
    num_conv_pos_embeddings, num_conv_pos_embedding_groups: the position convolution.
    layer_norm_eps: epsilon of every LayerNorm and GroupNorm.
    variant: the `VARIANTS` name ("" for a custom architecture).
    hf_name: the Hugging Face checkpoint the variant matches (for messages).
  """

  family: str
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  conv_dim: tuple[int, ...]
  conv_kernel: tuple[int, ...]
  conv_stride: tuple[int, ...]
  conv_bias: bool = False
  feat_extract_norm: str = "group"
  feat_proj_norm: bool = True
  stable_layer_norm: bool = False
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  layer_norm_eps: float = 1e-5
  variant: str = ""
  hf_name: str = ""

  def __post_init__(self):
    for name in ("conv_dim", "conv_kernel", "conv_stride"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    if self.family not in FAMILIES:
      raise ValueError(f"audio encoder family {self.family!r}: choose one of {FAMILIES}")
    if self.feat_extract_norm not in ("group", "layer"):
      raise ValueError(f"feat_extract_norm {self.feat_extract_norm!r}: group or layer")
    if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
      raise ValueError("conv_dim, conv_kernel and conv_stride differ in length")

  @property
  def num_features(self) -> int:
    return self.hidden_size

  @property
  def hop(self) -> int:
    """Samples between output frames (320 = 20 ms at 16 kHz)."""
    return math.prod(self.conv_stride)

  @property
  def receptive_field(self) -> int:
    """Samples one output frame sees (400 = 25 ms at 16 kHz)."""
    field = 1
    for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
      field = (field - 1) * s + k
    return field

  def num_frames(self, num_samples: int) -> int:
    """Output frames for a waveform of ``num_samples`` (HF's _get_feat_extract_output_lengths)."""
    n = int(num_samples)
    for k, s in zip(self.conv_kernel, self.conv_stride):
      n = (n - k) // s + 1
    return max(n, 0)

  def describe(self) -> str:
    name = f"{self.family} {self.variant}".strip()
    return name + (f" ({self.hf_name})" if self.hf_name else "")


def wav2vec2_config(family: str, variant: str, **overrides) -> Wav2Vec2Config:
  """The `Wav2Vec2Config` of a named variant; ``overrides`` change fields (e.g. num_layers).

  Raises:
    ValueError: for an unknown family or variant, listing the known ones.
  """
  if (family, variant) not in VARIANTS:
    known = ", ".join(v for f, v in VARIANTS if f == family) or "none"
    raise ValueError(f"unknown {family} variant {variant!r}; known: {known}"
                     if family in FAMILIES else
                     f"unknown audio encoder family {family!r}; choose one of {FAMILIES}")
  hf_name, arch = VARIANTS[(family, variant)]
  return Wav2Vec2Config(family=family, variant=variant, hf_name=hf_name,
                        **dict(arch, **overrides))


# ----------------------------------------------------------------------------- layers


class GroupNorm(nnx.Module):
  """GroupNorm with one channel per group over [B, T, C]: each channel normalised over time."""

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.eps = float(eps)
    self.scale = layers.param(layers.ones, (None,), None, (dim,), param_dtype)
    self.bias = layers.param(layers.zeros, (None,), None, (dim,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    xc = x - x.mean(axis=1, keepdims=True)
    var = jnp.mean(jnp.square(xc), axis=1, keepdims=True)
    y = xc * jax.lax.rsqrt(var + self.eps)
    return y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class Conv1d(nnx.Module):
  """Strided 1-D convolution without padding over [B, T, C], as patches and one matmul.

  The kernel is stored [k, in, out] (torch's [out, in, k] transposed (2, 1, 0)).
  """

  def __init__(self, din: int, dout: int, kernel: int, stride: int, *, use_bias: bool,
               precision: Precision, rngs: nnx.Rngs):
    self.kernel_size, self.stride, self.precision = kernel, stride, precision
    # torch's Conv1d default is U(+-1/sqrt(fan_in)); HF re-initialises with kaiming normal.
    init = nnx.initializers.he_normal(in_axis=(0, 1), out_axis=2)
    self.kernel = layers.param(init, (None, None, None), rngs.params(), (kernel, din, dout),
                               precision.param)
    self.bias = (layers.param(layers.zeros, (None,), rngs.params(), (dout,), precision.param)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, c = x.shape
    k, s = self.kernel_size, self.stride
    n = (t - k) // s + 1
    # Patch j holds frames j*s .. j*s+k-1: k strided slices, laid out [B, n, k, C].
    patches = jnp.stack([x[:, i:i + s * (n - 1) + 1:s] for i in range(k)], axis=2)
    kernel = self.kernel[...]
    y = layers.einsum("mi,io->mo", patches.reshape(b * n, k * c),
                      kernel.reshape(k * c, -1), self.precision).reshape(b, n, -1)
    return y if self.bias is None else y + self.bias[...].astype(jnp.float32)


class ConvLayer(nnx.Module):
  """One feature-encoder layer: convolution, optional Group/LayerNorm, GELU."""

  def __init__(self, cfg: Wav2Vec2Config, index: int, *, precision: Precision,
               rngs: nnx.Rngs):
    din = cfg.conv_dim[index - 1] if index else 1
    dout = cfg.conv_dim[index]
    self.conv = Conv1d(din, dout, cfg.conv_kernel[index], cfg.conv_stride[index],
                       use_bias=cfg.conv_bias, precision=precision, rngs=rngs)
    norm = dict(eps=cfg.layer_norm_eps, param_dtype=precision.param)
    if cfg.feat_extract_norm == "layer":
      self.layer_norm = layers.LayerNorm(dout, names=(None,), **norm)
    elif index == 0:
      self.layer_norm = GroupNorm(dout, **norm)
    else:
      self.layer_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x)
    if self.layer_norm is not None:
      x = self.layer_norm(x)
    return jax.nn.gelu(x, approximate=False)


class PositionalConv(nnx.Module):
  """Grouped convolution with weight normalisation (dim 2), same padding, GELU.

  ``weight_v`` is stored [k, in / groups, out] and ``weight_g`` [k]: the effective kernel is
  ``weight_g[k] * weight_v[k] / |weight_v[k]|``, the norm over the other two axes, as torch's
  ``weight_norm(conv, dim=2)``.
  """

  def __init__(self, cfg: Wav2Vec2Config, *, precision: Precision, rngs: nnx.Rngs):
    d, k, g = cfg.hidden_size, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups
    if d % g:
      raise ValueError(f"hidden_size {d} is not divisible by {g} position-conv groups")
    self.kernel_size, self.groups, self.precision = k, g, precision
    std = math.sqrt(4.0 / (k * d))   # HF's init of this convolution
    self.weight_v = layers.param(nnx.initializers.normal(std), (None, None, None),
                                 rngs.params(), (k, d // g, d), precision.param)
    self.weight_g = layers.param(layers.ones, (None,), None, (k,), precision.param)
    self.bias = layers.param(layers.zeros, (None,), None, (d,), precision.param)

  def kernel(self) -> jax.Array:
    v = self.weight_v[...].astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))
    return self.weight_g[...].astype(jnp.float32)[:, None, None] * v / norm

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    dtype = self.precision.compute
    # torch pads k//2 on both sides; an even kernel then yields one frame too many, which HF
    # drops from the end: the same as padding (k//2, k//2 - 1).
    pad = (k // 2, k // 2 - (1 if k % 2 == 0 else 0))
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), self.kernel().astype(dtype), window_strides=(1,), padding=[pad],
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=self.groups,
        preferred_element_type=jnp.float32)
    return jax.nn.gelu(y + self.bias[...].astype(jnp.float32), approximate=False)


class EncoderLayer(nnx.Module):
  """Transformer block: post-LN (base models) or pre-LN (``stable_layer_norm``)."""

  def __init__(self, cfg: Wav2Vec2Config, *, precision: Precision, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.pre_ln = cfg.stable_layer_norm
    norm = dict(eps=cfg.layer_norm_eps, param_dtype=precision.param)
    self.attention = layers.MultiHeadAttention(d, cfg.num_heads, precision=precision,
                                               rngs=rngs)
    self.layer_norm = layers.LayerNorm(d, **norm)
    self.feed_forward = layers.Mlp(d, cfg.intermediate_size, precision=precision, rngs=rngs)
    self.final_layer_norm = layers.LayerNorm(d, **norm)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pre_ln:
      x = x + self.attention(self.layer_norm(x))
      x = x + self.feed_forward(self.final_layer_norm(x))
    else:
      x = self.layer_norm(x + self.attention(x))
      x = self.final_layer_norm(x + self.feed_forward(x))
    return sharding.constrain(x, ("batch", None, "embed"))


class FeatureProjection(nnx.Module):

  def __init__(self, cfg: Wav2Vec2Config, *, precision: Precision, rngs: nnx.Rngs):
    din = cfg.conv_dim[-1]
    self.layer_norm = (layers.LayerNorm(din, eps=cfg.layer_norm_eps, names=(None,),
                                        param_dtype=precision.param)
                       if cfg.feat_proj_norm else None)
    self.projection = layers.Dense(din, cfg.hidden_size, (None, "embed"), precision=precision,
                                   rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.projection(self.layer_norm(x) if self.layer_norm is not None else x)


class FeatureEncoder(nnx.Module):

  def __init__(self, cfg: Wav2Vec2Config, *, precision: Precision, rngs: nnx.Rngs):
    self.conv_layers = nnx.List([ConvLayer(cfg, i, precision=precision, rngs=rngs)
                                 for i in range(len(cfg.conv_dim))])

  def __call__(self, wave: jax.Array) -> jax.Array:
    x = wave.astype(jnp.float32)[:, :, None]
    for layer in self.conv_layers:
      x = layer(x)
    return x


class Encoder(nnx.Module):

  def __init__(self, cfg: Wav2Vec2Config, *, precision: Precision, remat: str,
               rngs: nnx.Rngs):
    self.pre_ln = cfg.stable_layer_norm
    self.remat = layers.check_remat(remat)
    self.pos_conv_embed = PositionalConv(cfg, precision=precision, rngs=rngs)
    self.layer_norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                       param_dtype=precision.param)
    self.layers = nnx.List([EncoderLayer(cfg, precision=precision, rngs=rngs)
                            for _ in range(cfg.num_layers)])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.pos_conv_embed(x)
    if not self.pre_ln:
      x = self.layer_norm(x)
    x = sharding.constrain(x, ("batch", None, "embed"))
    layer_call = layers.remat(EncoderLayer.__call__, self.remat)
    for layer in self.layers:
      x = layer_call(layer, x)
    return self.layer_norm(x) if self.pre_ln else x


class Wav2Vec2Model(nnx.Module):
  """wav2vec 2.0 / HuBERT encoder: waveform [B, N] -> (hidden states [B, T, C], mean [B, C]).

  Attributes:
    cfg: the architecture.
    num_features: the model width.
  """

  def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs, precision: Precision = FLOAT32,
               remat: str = "none"):
    """Builds the encoder.

    Args:
      cfg: architecture, usually from `wav2vec2_config`.
      rngs: needs a ``params`` stream.
      precision: matmul operand dtype, param dtype and matmul path; norms, softmax and the
        residual stream are float32 whatever it says.
      remat: rematerialisation of each transformer block (`layers.REMAT_POLICIES`).
    """
    self.cfg = cfg
    self.num_features = cfg.hidden_size
    self.feature_extractor = FeatureEncoder(cfg, precision=precision, rngs=rngs)
    self.feature_projection = FeatureProjection(cfg, precision=precision, rngs=rngs)
    self.encoder = Encoder(cfg, precision=precision, remat=remat, rngs=rngs)

  def __call__(self, wave: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """Encodes raw waveforms.

    Args:
      wave: float [B, N] at 16 kHz (N >= the 400-sample receptive field).
      rngs: unused (no dropout in the frozen encoder); accepted for a uniform encoder API.

    Returns:
      (tokens float32 [B, T, C] = HF's last_hidden_state, pooled [B, C] = their mean), with
      T = `Wav2Vec2Config.num_frames`(N).
    """
    del rngs
    if wave.ndim != 2 or wave.shape[1] < self.cfg.receptive_field:
      raise ValueError(f"expected a waveform [B, N >= {self.cfg.receptive_field}], got "
                       f"{tuple(wave.shape)}")
    x = self.feature_projection(self.feature_extractor(wave))
    x = self.encoder(x)
    return x, x.mean(axis=1)


def padded_frames(wave: np.ndarray, cfg: Wav2Vec2Config) -> np.ndarray:
  """Pads a waveform by half the receptive field at both ends (frame j centred on j * hop).

  A waveform of N samples then gives ``1 + N // hop`` frames, frame j centred on sample
  ``j * hop``: the same count and centres as the data preparation's log-mel columns
  (librosa's centred STFT with hop 320).
  """
  half = cfg.receptive_field // 2
  return np.pad(np.asarray(wave, np.float32), [(0, 0)] * (np.ndim(wave) - 1) + [(half, half)])

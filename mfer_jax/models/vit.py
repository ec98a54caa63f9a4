"""Vision Transformer encoder (DINOv2, MAE, CLIP, plain ViT), numerically identical to timm's.

One module covers the ViT families the recent ABAW winners start from (DESIGN.md §8):

  DINOv2   patch 14, LayerScale, optional register tokens (position embeddings on the patches
           only), LayerNorm eps 1e-6; the class token is the pooled feature.
  MAE      the plain ViT-B/16 (eps 1e-6); mean of the patch tokens is the usual feature.
  CLIP     OpenAI's vision tower: patch embedding without bias, LayerNorm before the blocks
           (``pre_norm``), quick-GELU, eps 1e-5; the class token (before CLIP's projection).

The named `VARIANTS` give the architectures with the timm model each matches; `vit_config`
builds one at any input size (a multiple of the patch). Pretrained timm checkpoints import
through `mfer_jax.models.vit_import`, which resizes the position embeddings to the grid of
``img_size`` exactly as timm does. Parameter paths mirror timm's module names
(``blocks/3/attn/qkv/kernel`` is ``blocks.3.attn.qkv.weight``).

The encoder returns ``(grid [B, h, w, C], pooled [B, C])``: the patch tokens after the final
LayerNorm laid out on their grid (class and register tokens left out), like the Swin
encoder's grid, so every fusion variant takes either; and the pooled feature (`ViTConfig.pool`).

Logical axis names (mapped to mesh axes by `mfer_jax.sharding`): ``embed`` on the model
width (norms, embeddings, LayerScale, the residual side of qkv/proj/fc1/fc2), ``heads`` on
the qkv output and proj input, ``mlp`` on the feed-forward hidden width; the token stream
[B, N, C] is constrained to ``('batch', None, 'embed')`` after every block. ``remat`` wraps
each block in ``jax.checkpoint`` (`layers.remat`). Stochastic depth runs only when ``rngs``
is passed (training).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfer_jax import sharding
from mfer_jax.models import layers
from mfer_jax.models.layers import FLOAT32, Precision

POOLS = ("token", "avg")
# Per-channel (mean, std) of the pixels in [0, 1] each family was pretrained with.
INPUT_STATS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}

# name -> (timm model it matches, architecture). Face crops are 112 px, so the default input
# is 224 (the faces are upsampled, as the pretrained models saw 224-px images); img_size is
# free as long as the patch size divides it.
_DINOV2 = dict(patch_size=14, layer_scale=1e-5, ln_eps=1e-6, pool="token")
_REG4 = dict(_DINOV2, reg_tokens=4, no_embed_class=True)
_CLIP = dict(patch_size=16, pre_norm=True, ln_eps=1e-5, activation="quick_gelu",
             pool="token", input_stats="clip")
_PLAIN = dict(patch_size=16, ln_eps=1e-6, pool="token")
_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dinov2_s14": ("vit_small_patch14_dinov2", dict(_DINOV2, size="s")),
    "dinov2_b14": ("vit_base_patch14_dinov2", dict(_DINOV2, size="b")),
    "dinov2_l14": ("vit_large_patch14_dinov2", dict(_DINOV2, size="l")),
    "dinov2_s14_reg": ("vit_small_patch14_reg4_dinov2", dict(_REG4, size="s")),
    "dinov2_b14_reg": ("vit_base_patch14_reg4_dinov2", dict(_REG4, size="b")),
    "dinov2_l14_reg": ("vit_large_patch14_reg4_dinov2", dict(_REG4, size="l")),
    # MAE's encoder is the plain ViT; its features are the mean of the patch tokens.
    "mae_b16": ("vit_base_patch16_224.mae", dict(_PLAIN, size="b", pool="avg")),
    "mae_l16": ("vit_large_patch16_224.mae", dict(_PLAIN, size="l", pool="avg")),
    "clip_b16": ("vit_base_patch16_clip_quickgelu_224.openai", dict(_CLIP, size="b")),
    "clip_l14": ("vit_large_patch14_clip_quickgelu_224.openai",
                 dict(_CLIP, size="l", patch_size=14)),
    "vit_s16": ("vit_small_patch16_224", dict(_PLAIN, size="s")),
    "vit_b16": ("vit_base_patch16_224", dict(_PLAIN, size="b")),
    # Test size: every option on (registers, LayerScale) so tiny models exercise every path.
    "test": ("", dict(_REG4, embed_dim=32, depth=2, num_heads=2, patch_size=8)),
}


def _pair(v) -> tuple[int, int]:
  return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of one ViT encoder; build a named one with `vit_config`.

  Attributes:
    embed_dim, depth, num_heads: width, blocks and attention heads.
    patch_size: patch side; it must divide both sides of ``img_size``.
    img_size: input (H, W).
    in_chans: input channels.
    mlp_ratio: feed-forward hidden width / embed_dim.
    qkv_bias: whether the qkv projection has a bias.
    reg_tokens: register tokens (DINOv2 "with registers"); 0 = none.
    no_embed_class: position embeddings cover the patches only (class and register tokens are
      concatenated after adding them), as timm's DINOv2-with-registers.
    layer_scale: LayerScale init value (DINOv2: 1e-5); None = no LayerScale.
    pre_norm: LayerNorm after the embeddings, before the blocks, and a patch embedding
      without bias (CLIP).
    ln_eps: LayerNorm epsilon of every norm.
    activation: feed-forward activation, a key of `layers.ACTIVATIONS`.
    pool: pooled feature: "token" (the class token) or "avg" (mean of the patch tokens).
    input_stats: the `INPUT_STATS` the images are normalised with ("clip" for CLIP).
    drop_path_rate: stochastic depth of the last block (linear from 0, as timm).
    variant: the `VARIANTS` name ("" for a custom architecture).
    timm_name: the timm model the variant matches (for messages).
  """

  embed_dim: int
  depth: int
  num_heads: int
  patch_size: int = 16
  img_size: tuple[int, int] = (224, 224)
  in_chans: int = 3
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  reg_tokens: int = 0
  no_embed_class: bool = False
  layer_scale: float | None = None
  pre_norm: bool = False
  ln_eps: float = 1e-6
  activation: str = "gelu"
  pool: str = "token"
  input_stats: str = "imagenet"
  drop_path_rate: float = 0.0
  variant: str = ""
  timm_name: str = ""

  def __post_init__(self):
    object.__setattr__(self, "img_size", _pair(self.img_size))
    h, w = self.img_size
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"ViT img_size {(h, w)} is not a multiple of its patch size "
                       f"{self.patch_size}; choose a multiple such as "
                       f"{self.patch_size * (224 // self.patch_size)}")
    if self.pool not in POOLS:
      raise ValueError(f"ViT pool {self.pool!r}: choose one of {POOLS}")
    if self.input_stats not in INPUT_STATS:
      raise ValueError(f"ViT input_stats {self.input_stats!r}: choose one of "
                       f"{', '.join(INPUT_STATS)}")
    if self.activation not in layers.ACTIVATIONS:
      raise ValueError(f"ViT activation {self.activation!r}: choose one of "
                       f"{', '.join(layers.ACTIVATIONS)}")

  @property
  def grid_size(self) -> tuple[int, int]:
    return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

  @property
  def num_prefix_tokens(self) -> int:
    """Class token plus registers, in front of the patch tokens."""
    return 1 + self.reg_tokens

  @property
  def pos_embed_prefix(self) -> int:
    """Prefix tokens that have a position embedding (0 with ``no_embed_class``)."""
    return 0 if self.no_embed_class else self.num_prefix_tokens

  @property
  def num_features(self) -> int:
    return self.embed_dim

  def describe(self) -> str:
    name = self.variant + (f" ({self.timm_name})" if self.timm_name else "")
    return name or f"ViT embed_dim {self.embed_dim}, depth {self.depth}"


def vit_config(variant: str, *, img_size=(224, 224), in_chans: int = 3,
               drop_path_rate: float = 0.0, **overrides) -> ViTConfig:
  """The `ViTConfig` of a named variant at ``img_size``.

  Args:
    variant: a key of `VARIANTS`.
    img_size: input (H, W); the patch size must divide both.
    in_chans: input channels.
    drop_path_rate: stochastic depth rate of the last block.
    **overrides: other `ViTConfig` fields (e.g. ``depth`` for small test models, ``pool``).

  Raises:
    ValueError: for an unknown variant (listing the known ones) or a bad size.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; known: {', '.join(VARIANTS)}")
  timm_name, arch = VARIANTS[variant]
  arch = dict(arch)
  size = arch.pop("size", None)
  if size is not None:
    arch["embed_dim"], arch["depth"], arch["num_heads"] = _SIZES[size]
  arch.update(overrides)
  return ViTConfig(img_size=_pair(img_size), in_chans=in_chans, drop_path_rate=drop_path_rate,
                   variant=variant, timm_name=timm_name, **arch)


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> embed_dim (timm's stride-p Conv2d), as one matmul.

  The kernel is stored [p, p, in_chans, embed] (torch's OIHW weight transposed (2, 3, 1, 0)).
  """

  def __init__(self, patch: int, in_chans: int, dim: int, *, use_bias: bool,
               precision: Precision, rngs: nnx.Rngs):
    self.patch = patch
    self.precision = precision
    # torch's default Conv2d init, which timm keeps: U(+-1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(patch * patch * in_chans)
    init = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)  # noqa: E731
    self.kernel = layers.param(init, (None, None, None, "embed"), rngs.params(),
                               (patch, patch, in_chans, dim), precision.param)
    self.bias = (layers.param(init, ("embed",), rngs.params(), (dim,), precision.param)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> float32 [B, H/p, W/p, embed]."""
    b, h, w, c = x.shape
    p = self.patch
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = layers.einsum("mk,ko->mo", x.reshape(-1, p * p * c),
                      self.kernel[...].reshape(p * p * c, -1), self.precision)
    x = x.reshape(b, h // p, w // p, -1)
    return x if self.bias is None else x + self.bias[...].astype(jnp.float32)


class Block(nnx.Module):
  """Pre-LN transformer block: attention, then MLP, each with LayerScale and drop path."""

  def __init__(self, cfg: ViTConfig, drop_path: float, *, precision: Precision,
               rngs: nnx.Rngs):
    dim = cfg.embed_dim
    norm = dict(eps=cfg.ln_eps, param_dtype=precision.param)
    self.drop_path = drop_path
    self.norm1 = layers.LayerNorm(dim, **norm)
    self.attn = layers.MultiHeadAttention(dim, cfg.num_heads, qkv_bias=cfg.qkv_bias,
                                          precision=precision, rngs=rngs)
    self.ls1 = (layers.LayerScale(dim, cfg.layer_scale, param_dtype=precision.param)
                if cfg.layer_scale else None)
    self.norm2 = layers.LayerNorm(dim, **norm)
    self.mlp = layers.Mlp(dim, int(dim * cfg.mlp_ratio), activation=cfg.activation,
                          precision=precision, rngs=rngs)
    self.ls2 = (layers.LayerScale(dim, cfg.layer_scale, param_dtype=precision.param)
                if cfg.layer_scale else None)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    y = self.attn(self.norm1(x))
    y = self.ls1(y) if self.ls1 is not None else y
    x = x + layers.drop_path(y, self.drop_path, rngs)
    x = sharding.constrain(x, ("batch", None, "embed"))
    y = self.mlp(self.norm2(x))
    y = self.ls2(y) if self.ls2 is not None else y
    x = x + layers.drop_path(y, self.drop_path, rngs)
    return sharding.constrain(x, ("batch", None, "embed"))


class VisionTransformer(nnx.Module):
  """ViT encoder: NHWC image -> (patch-token grid after the final LayerNorm, pooled feature).

  Attributes:
    cfg: the architecture.
    num_features: channels of the output (embed_dim).
    grid_size: the patch grid (H/p, W/p).
  """

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, precision: Precision = FLOAT32,
               remat: str = "none"):
    """Builds the encoder with timm's initialisation.

    Args:
      cfg: architecture, usually from `vit_config`.
      rngs: needs a ``params`` stream.
      precision: matmul operand dtype, param dtype and matmul path; LayerNorm, softmax and
        the residual stream are float32 whatever it says.
      remat: rematerialisation of each block, one of `layers.REMAT_POLICIES`.
    """
    self.cfg = cfg
    self.num_features = cfg.embed_dim
    self.grid_size = cfg.grid_size
    self.remat = layers.check_remat(remat)
    d = cfg.embed_dim
    pd = precision.param
    self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d, use_bias=not cfg.pre_norm,
                                  precision=precision, rngs=rngs)
    # timm: class and register tokens ~ N(0, 1e-6), position embeddings trunc-normal(0.02).
    tiny = nnx.initializers.normal(1e-6)
    self.cls_token = layers.param(tiny, (None, None, "embed"), rngs.params(), (1, 1, d), pd)
    self.reg_token = (layers.param(tiny, (None, None, "embed"), rngs.params(),
                                   (1, cfg.reg_tokens, d), pd) if cfg.reg_tokens else None)
    length = cfg.grid_size[0] * cfg.grid_size[1] + cfg.pos_embed_prefix
    self.pos_embed = layers.param(layers.trunc_normal, (None, None, "embed"), rngs.params(),
                                  (1, length, d), pd)
    self.norm_pre = layers.LayerNorm(d, eps=cfg.ln_eps, param_dtype=pd) if cfg.pre_norm else None
    rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    self.blocks = nnx.List([Block(cfg, rates[i], precision=precision, rngs=rngs)
                            for i in range(cfg.depth)])
    self.norm = layers.LayerNorm(d, eps=cfg.ln_eps, param_dtype=pd)

  def _prefix(self, b: int) -> list[jax.Array]:
    d = self.cfg.embed_dim
    out = [jnp.broadcast_to(self.cls_token[...].astype(jnp.float32), (b, 1, d))]
    if self.reg_token is not None:
      out.append(jnp.broadcast_to(self.reg_token[...].astype(jnp.float32),
                                  (b, self.cfg.reg_tokens, d)))
    return out

  def tokens(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """All tokens [B, prefix + h*w, C] after the final LayerNorm (timm's forward_features)."""
    cfg = self.cfg
    if x.ndim != 4 or tuple(x.shape[1:]) != (*cfg.img_size, cfg.in_chans):
      raise ValueError(f"expected input [B, {cfg.img_size[0]}, {cfg.img_size[1]}, "
                       f"{cfg.in_chans}] (NHWC), got {tuple(x.shape)}")
    b = x.shape[0]
    x = self.patch_embed(x)
    x = x.reshape(b, -1, x.shape[-1])
    pos = self.pos_embed[...].astype(jnp.float32)
    if cfg.no_embed_class:   # add to the patches, then put the class/register tokens in front
      x = jnp.concatenate(self._prefix(b) + [x + pos], axis=1)
    else:                    # put them in front, then add (their embedding comes first)
      x = jnp.concatenate(self._prefix(b) + [x], axis=1) + pos
    if self.norm_pre is not None:
      x = self.norm_pre(x)
    x = sharding.constrain(x, ("batch", None, "embed"))
    block_call = layers.remat(Block.__call__, self.remat)
    for block in self.blocks:
      x = block_call(block, x, rngs)
    return self.norm(x)

  def __call__(self, x: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """Encodes a batch.

    Args:
      x: [B, H, W, in_chans] float, already normalised; (H, W) must equal ``cfg.img_size``.
      rngs: with a ``dropout`` stream, enables stochastic depth (training); None otherwise.

    Returns:
      (grid [B, h, w, C]: the patch tokens after the final LayerNorm, pooled [B, C]: the
      class token (``pool="token"``) or the mean of the patch tokens (``pool="avg"``)), as
      timm's forward_features and forward_head(pre_logits=True).
    """
    x = self.tokens(x, rngs=rngs)
    patches = x[:, self.cfg.num_prefix_tokens:]
    pooled = x[:, 0] if self.cfg.pool == "token" else patches.mean(axis=1)
    grid = patches.reshape(x.shape[0], *self.grid_size, x.shape[-1])
    return grid, pooled

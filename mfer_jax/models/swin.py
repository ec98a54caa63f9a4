"""Swin Transformer encoder (Liu et al. 2021), numerically identical to timm's SwinTransformer.

Used twice by the model: on face crops and on log-mel spectrograms (any H x W the patch size
divides, e.g. 64x128). Pretrained timm / Microsoft weights import through
`mfer_jax.models.swin_import`; parameter paths mirror timm's module names
(``layers/2/blocks/5/attn/qkv/kernel`` is ``layers.2.blocks.5.attn.qkv.weight``), and like
timm 1.x the patch merging sits at the *start* of stages 1.. (``layers/N/downsample``).

Logical axis names on params (mapped to mesh axes by the rules in `mfer_jax.sharding`):

  embed   model width: LayerNorm scale/bias, patch-embedding output, the residual side of
          qkv/proj/fc1/fc2, the output of patch merging
  heads   attention width (heads * head_dim): qkv output (3x), proj input
  mlp     feed-forward hidden width: fc1 output, fc2 input
  None    replicated: patch-embedding input dims, patch-merging input (4C), and the
          relative-position bias tables [(2Wh-1)(2Ww-1), num_heads]

Activations: the residual stream [B, H, W, C] is constrained to ``('batch', None, None,
'embed')`` after every residual add.

Randomness: stochastic depth runs only when ``rngs`` is passed to `__call__` (training); the
module holds no RNG state and has no train/eval mode.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from mfer_jax import sharding
from mfer_jax.models import layers
from mfer_jax.models import swin_layers as L
from mfer_jax.models.layers import FLOAT32, Precision

# name -> (embed_dim, depths, num_heads). "test" and "test3" keep two blocks per stage so the
# shifted-window path is exercised; "test1" has one block per stage for the tests that train
# (tests/configs/tiny.py), whose time is mostly compiling, which grows with the blocks.
VARIANTS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
    "test": (32, (2, 2), (2, 4)),
    "test3": (16, (2, 2, 2), (1, 2, 4)),
    "test1": (32, (1, 1), (2, 4)),
}


def _pair(v) -> tuple[int, int]:
  return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  """Architecture of one Swin encoder; build it with `swin_config`.

  Attributes:
    embed_dim: width of stage 0; stage i has ``embed_dim * 2**i`` channels.
    depths: blocks per stage.
    num_heads: attention heads per stage.
    img_size: input (H, W); both must be multiples of ``patch_size``.
    patch_size: patch-embedding stride.
    window_size: attention window, an int or (h, w); clamped per stage as in timm.
    in_chans: input channels (3 for faces, 1 or 3 for spectrograms).
    mlp_ratio: MLP hidden width / block width.
    drop_path_rate: stochastic-depth rate of the last block (linear from 0).
    qkv_bias: whether the qkv projection has a bias.
    variant: the `VARIANTS` name, "" for custom sizes (used in import error messages).
  """

  embed_dim: int
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]
  img_size: tuple[int, int] = (224, 224)
  patch_size: int = 4
  window_size: int | tuple[int, int] = 7
  in_chans: int = 3
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.1
  qkv_bias: bool = True
  variant: str = ""

  def __post_init__(self):
    # Accept ints and lists from configs; keep the frozen instance hashable.
    object.__setattr__(self, "img_size", _pair(self.img_size))
    object.__setattr__(self, "depths", tuple(self.depths))
    object.__setattr__(self, "num_heads", tuple(self.num_heads))
    if not isinstance(self.window_size, int):
      object.__setattr__(self, "window_size", _pair(self.window_size))
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
    h, w = self.img_size
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"img_size {(h, w)} is not a multiple of patch_size {self.patch_size}")

  @property
  def stage_dims(self) -> tuple[int, ...]:
    return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

  @property
  def stage_resolutions(self) -> tuple[tuple[int, int], ...]:
    """Token grid of each stage's blocks (patch merging rounds odd sizes up, like timm)."""
    h, w = (s // self.patch_size for s in self.img_size)
    out = [(h, w)]
    for _ in self.depths[1:]:
      h, w = (h + 1) // 2, (w + 1) // 2
      out.append((h, w))
    return tuple(out)

  def stage_windows(self) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """(window, shift) per stage, for the shifted (odd) blocks.

    timm's rule, per dimension: a stage no larger than the window uses its whole extent as the
    window and does not shift; otherwise the window stays and shifts by half of it.
    """
    target = _pair(self.window_size)
    out = []
    for res in self.stage_resolutions:
      win = tuple(r if r <= t else t for r, t in zip(res, target))
      shift = tuple(0 if r <= t else t // 2 for r, t in zip(res, target))
      out.append((win, shift))
    return tuple(out)


def swin_config(variant: str, *, img_size=(224, 224), window_size=7, in_chans: int = 3,
                drop_path_rate: float = 0.1) -> SwinConfig:
  """The `SwinConfig` of a named variant (`VARIANTS`: "tiny", "small", "base", "large", "test",
  "test3", "test1").

  Raises:
    ValueError: for an unknown variant, listing the known ones.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown Swin variant {variant!r}; known: {', '.join(VARIANTS)}")
  embed_dim, depths, num_heads = VARIANTS[variant]
  return SwinConfig(embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                    img_size=_pair(img_size), window_size=window_size, in_chans=in_chans,
                    drop_path_rate=drop_path_rate, variant=variant)


class SwinStage(nnx.Module):
  """Optional patch merging (stages 1..), then the blocks, alternating plain and shifted."""

  def __init__(self, cfg: SwinConfig, index: int, drop_paths: list[float], *,
               precision: Precision, remat: str, rngs: nnx.Rngs):
    dim = cfg.stage_dims[index]
    self.remat = layers.check_remat(remat)
    kw = dict(rngs=rngs, precision=precision)
    self.downsample = (L.PatchMerging(cfg.stage_dims[index - 1], dim, **kw)
                       if index > 0 else None)
    window, shift = cfg.stage_windows()[index]
    self.blocks = nnx.List([
        L.SwinBlock(dim, cfg.num_heads[index], cfg.stage_resolutions[index], window,
                    shift if j % 2 else (0, 0), mlp_ratio=cfg.mlp_ratio,
                    qkv_bias=cfg.qkv_bias, drop_path=drop_paths[j], **kw)
        for j in range(cfg.depths[index])
    ])

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    if self.downsample is not None:
      x = sharding.constrain(self.downsample(x), ("batch", None, None, "embed"))
    block_call = layers.remat(L.SwinBlock.__call__, self.remat)
    for block in self.blocks:
      x = block_call(block, x, rngs)
    return x


class SwinTransformer(nnx.Module):
  """Swin encoder: NHWC image -> (final tokens after LayerNorm, their mean).

  Attributes:
    cfg: the architecture.
    num_features: channels of the final stage.
    grid_size: final token grid (H/32, W/32 for four stages and patch 4, rounded up).
  """

  def __init__(self, cfg: SwinConfig, *, rngs: nnx.Rngs, precision: Precision = FLOAT32,
               remat: str = "none"):
    """Builds the encoder with timm's initialisation.

    Args:
      cfg: architecture, usually from `swin_config`.
      rngs: needs a ``params`` stream.
      precision: matmul operand dtype, param dtype and matmul path (`layers.Precision`);
        LayerNorm, softmax and the residual stream are float32 whatever it says.
      remat: rematerialisation of each Swin block, one of `layers.REMAT_POLICIES`.
    """
    self.cfg = cfg
    self.num_features = cfg.stage_dims[-1]
    self.grid_size = cfg.stage_resolutions[-1]
    total = sum(cfg.depths)
    # timm: linear from 0 to the rate over all blocks (calculate_drop_path_rates).
    rates = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    self.patch_embed = L.PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim,
                                    precision=precision, rngs=rngs)
    self.layers = nnx.List([
        SwinStage(cfg, i, rates[sum(cfg.depths[:i]):sum(cfg.depths[:i + 1])],
                  precision=precision, remat=remat, rngs=rngs)
        for i in range(len(cfg.depths))
    ])
    self.norm = layers.LayerNorm(self.num_features, eps=L.LN_EPS, param_dtype=precision.param)

  def __call__(self, x: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    """Encodes a batch.

    Args:
      x: [B, H, W, in_chans] float, already normalised; (H, W) must equal ``cfg.img_size``.
      rngs: with a ``dropout`` stream, enables stochastic depth (training); None for the
        deterministic forward pass.

    Returns:
      (tokens [B, h, w, C] after the final LayerNorm, pooled [B, C] = mean over tokens), as
      timm's forward_features and forward_head(pre_logits=True).
    """
    if x.ndim != 4 or tuple(x.shape[1:]) != (*self.cfg.img_size, self.cfg.in_chans):
      raise ValueError(f"expected input [B, {self.cfg.img_size[0]}, {self.cfg.img_size[1]}, "
                       f"{self.cfg.in_chans}] (NHWC), got {tuple(x.shape)}")
    x = sharding.constrain(self.patch_embed(x), ("batch", None, None, "embed"))
    for stage in self.layers:
      x = stage(x, rngs)
    tokens = self.norm(x)
    return tokens, tokens.mean(axis=(1, 2))

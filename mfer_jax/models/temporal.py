"""Temporal heads: model the T fused frame features of a clip, before the classifier.

The encoders and the fusion run on every frame of a clip (B x T frames); the fused pre-head
feature of each frame, [B, T, D], goes through one of these (``config.model.temporal.name``),
and the fusion's classifier then predicts a label for every frame:

  none         identity: each frame on its own (the frame model, on clips)
  transformer  pre-LN self-attention blocks over the T frames, bidirectional (no causal
               mask), with learned absolute or relative positions; padded frames are masked
               out as keys
  tcn          residual blocks of non-causal dilated 1-D convolutions; padded frames are
               zeroed, so they act as the zero padding at the clip's ends

Both keep the feature width D and add residual updates, so they sit between the fusion and the
head without changing either. They are built from `mfer_jax.models.layers` only and follow the
model's precision policy (matmul operands in the compute dtype, float32 accumulation, residual
stream, LayerNorm and softmax) and its remat policy (per block); params carry logical axis
names (see `mfer_jax.sharding`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from mfer_jax import errors, sharding
from mfer_jax.constants import TEMPORAL_HEADS
from mfer_jax.models import layers
from mfer_jax.models.layers import FLOAT32, Precision

POSITIONS = ("learned", "relative")
LN_EPS = 1e-5
_MASKED = -1e9


def check_config(cfg: ConfigDict, dim: int | None = None) -> None:
  """Validates ``config.model.temporal`` (and, given the feature width, the head count)."""
  if cfg.name not in TEMPORAL_HEADS:
    raise errors.UsageError(f"model.temporal.name={cfg.name!r}: choose one of "
                            f"{', '.join(TEMPORAL_HEADS)}")
  if cfg.name == "transformer":
    if cfg.position not in POSITIONS:
      raise errors.UsageError(f"model.temporal.position={cfg.position!r}: choose one of "
                              f"{', '.join(POSITIONS)}")
    if dim is not None and dim % cfg.num_heads:
      raise errors.UsageError(f"model.temporal.num_heads={cfg.num_heads} does not divide the "
                              f"fused feature width {dim}")
  if cfg.name == "tcn":
    if cfg.kernel_size < 1 or cfg.kernel_size % 2 == 0 or not cfg.dilations or min(
        cfg.dilations) < 1:
      raise errors.UsageError(
          f"model.temporal: kernel_size={cfg.kernel_size}, dilations={tuple(cfg.dilations)}: "
          "the kernel size must be odd (centred, non-causal) and every dilation >= 1")


def receptive_field(cfg: ConfigDict) -> int:
  """Clip slots that one output of the TCN sees: 1 + (kernel_size - 1) * sum(dilations)."""
  return 1 + (int(cfg.kernel_size) - 1) * int(sum(cfg.dilations))


class _TransformerBlock(nnx.Module):
  """Pre-LN: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``, dropout on both branches."""

  def __init__(self, dim: int, num_heads: int, hidden: int, dropout_rate: float, *,
               precision: Precision, rngs: nnx.Rngs):
    self.dropout_rate = dropout_rate
    self.norm1 = layers.LayerNorm(dim, eps=LN_EPS, param_dtype=precision.param)
    self.attn = layers.MultiHeadAttention(dim, num_heads, precision=precision, rngs=rngs)
    self.norm2 = layers.LayerNorm(dim, eps=LN_EPS, param_dtype=precision.param)
    self.mlp = layers.Mlp(dim, hidden, precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array, bias: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = x + layers.dropout(self.attn(self.norm1(x), bias=bias), self.dropout_rate, rngs)
    return x + layers.dropout(self.mlp(self.norm2(x)), self.dropout_rate, rngs)


class TransformerHead(nnx.Module):
  """Pre-LN transformer blocks over the frames of a clip, then a final LayerNorm.

  Args:
    cfg: ``config.model.temporal`` (num_layers, num_heads, mlp_ratio, dropout, position,
      max_length).
    dim: the fused feature width D.
    precision: the model's matmul policy.
    remat: rematerialisation of each block (`layers.REMAT_POLICIES`).
  """

  def __init__(self, cfg: ConfigDict, dim: int, *, rngs: nnx.Rngs,
               precision: Precision = FLOAT32, remat: str = "none"):
    check_config(cfg, dim)
    self.position = cfg.position
    self.max_length = int(cfg.max_length)
    self.num_heads = int(cfg.num_heads)
    self.remat = layers.check_remat(remat)
    if self.position == "learned":
      self.pos_embed = layers.param(layers.trunc_normal, (None, "embed"), rngs.params(),
                                    (self.max_length, dim), precision.param)
    else:
      # One bias per head and signed distance -(max_length - 1) .. max_length - 1.
      self.rel_bias = layers.param(layers.trunc_normal, (None, None), rngs.params(),
                                   (2 * self.max_length - 1, self.num_heads), precision.param)
    hidden = int(dim * cfg.mlp_ratio)
    self.blocks = nnx.List([
        _TransformerBlock(dim, self.num_heads, hidden, float(cfg.dropout), precision=precision,
                          rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = layers.LayerNorm(dim, eps=LN_EPS, param_dtype=precision.param)

  def __call__(self, x: jax.Array, present: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """x: [B, T, D] fused frame features; present: bool [B, T] -> float32 [B, T, D]."""
    t = x.shape[1]
    if t > self.max_length:
      raise ValueError(f"clips of {t} frames exceed model.temporal.max_length="
                       f"{self.max_length}")
    x = x.astype(jnp.float32)
    bias = jnp.where(present, 0.0, _MASKED)[:, None, None, :].astype(jnp.float32)
    if self.position == "learned":
      x = x + self.pos_embed[...][:t].astype(jnp.float32)
    else:
      dist = np.arange(t)[None, :] - np.arange(t)[:, None] + self.max_length - 1
      bias = bias + jnp.moveaxis(self.rel_bias[...][dist], -1, 0).astype(jnp.float32)[None]
    block_call = layers.remat(_TransformerBlock.__call__, self.remat)
    for block in self.blocks:
      x = sharding.constrain(x, ("batch", None, "embed"))
      x = block_call(block, x, bias, rngs)
    return self.norm(x)


class _DilatedConv(nnx.Module):
  """Non-causal 1-D convolution over time: ``kernel_size`` taps ``dilation`` slots apart."""

  def __init__(self, din: int, dout: int, kernel_size: int, dilation: int, *,
               precision: Precision, rngs: nnx.Rngs):
    self.offsets = tuple((i - kernel_size // 2) * dilation for i in range(kernel_size))
    # The taps are stacked on the channel axis, so the convolution is one dense product.
    self.kernel = layers.Dense(kernel_size * din, dout, ("embed", "mlp"), precision=precision,
                               rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    t = x.shape[1]
    reach = max(abs(o) for o in self.offsets)
    padded = jnp.pad(x, ((0, 0), (reach, reach), (0, 0)))
    return self.kernel(jnp.concatenate([padded[:, reach + o:reach + o + t]
                                        for o in self.offsets], axis=-1))


class _TCNBlock(nnx.Module):
  """``x + fc(gelu(conv_d(LN(x) * present)))``."""

  def __init__(self, dim: int, hidden: int, kernel_size: int, dilation: int,
               dropout_rate: float, *, precision: Precision, rngs: nnx.Rngs):
    self.dropout_rate = dropout_rate
    self.norm = layers.LayerNorm(dim, eps=LN_EPS, param_dtype=precision.param)
    self.conv = _DilatedConv(dim, hidden, kernel_size, dilation, precision=precision, rngs=rngs)
    self.out = layers.Dense(hidden, dim, ("mlp", "embed"), precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array, keep: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    h = layers.ACTIVATIONS["gelu"](self.conv(self.norm(x) * keep))
    return x + layers.dropout(self.out(h), self.dropout_rate, rngs)


class TCNHead(nnx.Module):
  """Residual dilated-convolution blocks, one per dilation, then a LayerNorm.

  Args:
    cfg: ``config.model.temporal`` (kernel_size, dilations, mlp_ratio, dropout).
    dim: the fused feature width D.
    precision: the model's matmul policy.
    remat: rematerialisation of each block (`layers.REMAT_POLICIES`).
  """

  def __init__(self, cfg: ConfigDict, dim: int, *, rngs: nnx.Rngs,
               precision: Precision = FLOAT32, remat: str = "none"):
    check_config(cfg, dim)
    self.remat = layers.check_remat(remat)
    hidden = int(dim * cfg.mlp_ratio)
    self.blocks = nnx.List([
        _TCNBlock(dim, hidden, int(cfg.kernel_size), int(d), float(cfg.dropout),
                  precision=precision, rngs=rngs) for d in cfg.dilations])
    self.norm = layers.LayerNorm(dim, eps=LN_EPS, param_dtype=precision.param)

  def __call__(self, x: jax.Array, present: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """x: [B, T, D] fused frame features; present: bool [B, T] -> float32 [B, T, D]."""
    x = x.astype(jnp.float32)
    keep = present[..., None].astype(jnp.float32)
    block_call = layers.remat(_TCNBlock.__call__, self.remat)
    for block in self.blocks:
      x = sharding.constrain(x, ("batch", None, "embed"))
      x = block_call(block, x, keep, rngs)
    return self.norm(x)


def make_head(cfg: ConfigDict, dim: int, *, rngs: nnx.Rngs, precision: Precision = FLOAT32,
              remat: str = "none") -> nnx.Module | None:
  """The head named by ``cfg.name``, or None for 'none'."""
  check_config(cfg, dim)
  if cfg.name == "none":
    return None
  cls = TransformerHead if cfg.name == "transformer" else TCNHead
  return cls(cfg, dim, rngs=rngs, precision=precision, remat=remat)

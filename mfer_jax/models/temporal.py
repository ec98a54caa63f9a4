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
head without changing either. Params carry logical axis names (see `mfer_jax.sharding`);
LayerNorm and softmax run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from mfer_jax import errors, sharding
from mfer_jax.constants import TEMPORAL_HEADS
from mfer_jax.models import fusion_layers as L

POSITIONS = ("learned", "relative")
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


class _SelfAttention(nnx.Module):
  """Multi-head self-attention over the time axis with an additive bias."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.num_heads = num_heads
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.qkv = L.dense(dim, 3 * dim, ("embed", "heads"), **kw)
    self.proj = L.dense(dim, dim, ("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.num_heads
    q, k, v = jnp.moveaxis(self.qkv(x).reshape(b, t, 3, h, d // h), 2, 0)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    attn = jax.nn.softmax(logits * (d // h) ** -0.5 + bias, axis=-1).astype(v.dtype)
    return self.proj(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, d))


class TransformerHead(nnx.Module):
  """Pre-LN transformer blocks over the frames of a clip, then a final LayerNorm.

  Args:
    cfg: ``config.model.temporal`` (num_layers, num_heads, mlp_ratio, dropout, position,
      max_length).
    dim: the fused feature width D.
  """

  def __init__(self, cfg: ConfigDict, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    check_config(cfg, dim)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.position = cfg.position
    self.max_length = int(cfg.max_length)
    self.num_heads = int(cfg.num_heads)
    self.dropout_rate = float(cfg.dropout)
    init = nnx.initializers.truncated_normal(0.02)
    if self.position == "learned":
      self.pos_embed = nnx.Param(nnx.with_partitioning(init, (None, "embed"))(
          rngs.params(), (self.max_length, dim), param_dtype))
    else:
      # One bias per head and signed distance -(max_length - 1) .. max_length - 1.
      self.rel_bias = nnx.Param(nnx.with_partitioning(init, (None, None))(
          rngs.params(), (2 * self.max_length - 1, self.num_heads), param_dtype))
    hidden = int(dim * cfg.mlp_ratio)
    self.norms1 = nnx.List([L.layer_norm(dim, rngs=rngs) for _ in range(cfg.num_layers)])
    self.attns = nnx.List([_SelfAttention(dim, self.num_heads, **kw)
                           for _ in range(cfg.num_layers)])
    self.norms2 = nnx.List([L.layer_norm(dim, rngs=rngs) for _ in range(cfg.num_layers)])
    self.mlps = nnx.List([L.FeedForward(dim, hidden, **kw) for _ in range(cfg.num_layers)])
    self.norm = L.layer_norm(dim, rngs=rngs)

  def __call__(self, x: jax.Array, present: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """x: [B, T, D] fused frame features; present: bool [B, T] -> [B, T, D]."""
    t = x.shape[1]
    if t > self.max_length:
      raise ValueError(f"clips of {t} frames exceed model.temporal.max_length="
                       f"{self.max_length}")
    dt = x.dtype
    bias = jnp.where(present, 0.0, _MASKED)[:, None, None, :].astype(jnp.float32)
    if self.position == "learned":
      x = x + self.pos_embed[...][:t].astype(dt)
    else:
      dist = np.arange(t)[None, :] - np.arange(t)[:, None] + self.max_length - 1
      bias = bias + jnp.moveaxis(self.rel_bias[...][dist], -1, 0).astype(jnp.float32)[None]
    for norm1, attn, norm2, mlp in zip(self.norms1, self.attns, self.norms2, self.mlps):
      x = sharding.constrain(x, ("batch", None, "embed"))
      x = x + L.dropout(attn(norm1(x).astype(dt), bias), self.dropout_rate, rngs)
      x = x + L.dropout(mlp(norm2(x).astype(dt)), self.dropout_rate, rngs)
    return self.norm(x).astype(dt)


class _DilatedConv(nnx.Module):
  """Non-causal 1-D convolution over time: ``kernel_size`` taps ``dilation`` slots apart."""

  def __init__(self, din: int, dout: int, kernel_size: int, dilation: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.offsets = tuple((i - kernel_size // 2) * dilation for i in range(kernel_size))
    # The taps are stacked on the channel axis, so the convolution is one dense product.
    self.kernel = L.dense(kernel_size * din, dout, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    t = x.shape[1]
    reach = max(abs(o) for o in self.offsets)
    padded = jnp.pad(x, ((0, 0), (reach, reach), (0, 0)))
    taps = [padded[:, reach + o:reach + o + t] for o in self.offsets]
    return self.kernel(jnp.concatenate(taps, axis=-1))


class TCNHead(nnx.Module):
  """Residual blocks ``x + fc(gelu(conv_d(LN(x))))``, one per dilation, then a LayerNorm.

  Args:
    cfg: ``config.model.temporal`` (kernel_size, dilations, mlp_ratio, dropout).
    dim: the fused feature width D.
  """

  def __init__(self, cfg: ConfigDict, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    check_config(cfg, dim)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    hidden = int(dim * cfg.mlp_ratio)
    self.dropout_rate = float(cfg.dropout)
    self.norms = nnx.List([L.layer_norm(dim, rngs=rngs) for _ in cfg.dilations])
    self.convs = nnx.List([_DilatedConv(dim, hidden, int(cfg.kernel_size), int(d), **kw)
                           for d in cfg.dilations])
    self.outs = nnx.List([L.dense(hidden, dim, ("mlp", "embed"), **kw) for _ in cfg.dilations])
    self.norm = L.layer_norm(dim, rngs=rngs)

  def __call__(self, x: jax.Array, present: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """x: [B, T, D] fused frame features; present: bool [B, T] -> [B, T, D]."""
    dt = x.dtype
    keep = present[..., None].astype(dt)
    for norm, conv, out in zip(self.norms, self.convs, self.outs):
      x = sharding.constrain(x, ("batch", None, "embed"))
      h = jax.nn.gelu(conv(norm(x).astype(dt) * keep), approximate=False)
      x = x + L.dropout(out(h), self.dropout_rate, rngs)
    return self.norm(x).astype(dt)


def make_head(cfg: ConfigDict, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
              param_dtype=jnp.float32) -> nnx.Module | None:
  """The head named by ``cfg.name``, or None for 'none'."""
  check_config(cfg, dim)
  if cfg.name == "none":
    return None
  cls = TransformerHead if cfg.name == "transformer" else TCNHead
  return cls(cfg, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

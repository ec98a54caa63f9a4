"""Transformer parts of the Modal Fusion Module: cross-attention, feed-forward, pre-LN blocks.

Params carry logical axis names (see `mfer_jax.sharding`); attention softmax and LayerNorm run
in float32 whatever the compute dtype, because bf16 softmax loses the small attention weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_trunc = nnx.initializers.truncated_normal(stddev=0.02)


def dense(din: int, dout: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs,
          dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.Linear:
  """A Linear with truncated-normal(0.02) init, zero bias and logical axis names."""
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.with_partitioning(_trunc, names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[1:]),
                    rngs=rngs)


def layer_norm(dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32) -> nnx.LayerNorm:
  """LayerNorm (eps 1e-5, like torch) in float32, with ('embed',) names on scale and bias."""
  return nnx.LayerNorm(dim, epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
                       rngs=rngs)


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout, active only when ``rngs`` is given (training)."""
  if rngs is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class CrossAttention(nnx.Module):
  """Multi-head attention of ``x`` (queries) over ``context`` (keys and values)."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    if dim % num_heads:
      raise ValueError(f"fusion dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q = dense(dim, dim, ("embed", "heads"), **kw)
    self.kv = dense(dim, 2 * dim, ("embed", "heads"), **kw)
    self.out = dense(dim, dim, ("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, n, d = x.shape
    h = self.num_heads
    q = self.q(x).reshape(b, n, h, d // h)
    k, v = jnp.split(self.kv(context).reshape(b, context.shape[1], 2, h, d // h), 2, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k[:, :, 0], preferred_element_type=jnp.float32)
    attn = jax.nn.softmax(logits * (d // h) ** -0.5, axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", attn, v[:, :, 0]).reshape(b, n, d)
    return self.out(y)


class FeedForward(nnx.Module):
  """Linear -> GELU -> Linear, the transformer MLP."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = dense(dim, hidden, ("embed", "mlp"), **kw)
    self.fc2 = dense(hidden, dim, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class BidirectionalBlock(nnx.Module):
  """One pre-LN fusion block: each modality attends to the other, then its own FFN.

  Both directions read the *input* streams, so neither modality sees the other's update from
  the same block: the block is symmetric in its two inputs.
  """

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout_rate: float, *,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    hidden = int(dim * mlp_ratio)
    self.dropout_rate = dropout_rate
    self.norm_v, self.norm_a = layer_norm(dim, rngs=rngs), layer_norm(dim, rngs=rngs)
    self.v_from_a = CrossAttention(dim, num_heads, **kw)
    self.a_from_v = CrossAttention(dim, num_heads, **kw)
    self.norm_v2, self.norm_a2 = layer_norm(dim, rngs=rngs), layer_norm(dim, rngs=rngs)
    self.ffn_v = FeedForward(dim, hidden, **kw)
    self.ffn_a = FeedForward(dim, hidden, **kw)

  def __call__(self, v: jax.Array, a: jax.Array, *, rngs: nnx.Rngs | None = None):
    dt = v.dtype
    nv, na = self.norm_v(v).astype(dt), self.norm_a(a).astype(dt)
    v = v + dropout(self.v_from_a(nv, na), self.dropout_rate, rngs)
    a = a + dropout(self.a_from_v(na, nv), self.dropout_rate, rngs)
    v = v + dropout(self.ffn_v(self.norm_v2(v).astype(dt)), self.dropout_rate, rngs)
    a = a + dropout(self.ffn_a(self.norm_a2(a).astype(dt)), self.dropout_rate, rngs)
    return v, a

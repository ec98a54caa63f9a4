"""Building blocks of the Swin Transformer (see `mfer_jax.models.swin`).

Each layer computes what its namesake in timm 1.0.31 (``timm/models/swin_transformer.py``)
computes, so that timm checkpoints import with transposes only. Differences in form, not in
result:

* Activations are NHWC and windows are kept as ``[B, num_windows, N, C]`` (timm folds the
  windows into the batch) so the shift mask broadcasts without reshapes.
* The relative-position index and the shift mask are numpy constants built from static shapes
  at trace time (cached), not buffers or params: they never enter the state or a checkpoint.
* All matmuls go through `mfer_jax.models.matmul.einsum`: float32, or bf16-in / f32-out in
  both passes with a low-precision ``dtype``, in layouts XLA:CPU runs fast.
* LayerNorm, softmax and GELU always run in float32.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfer_jax import sharding
from mfer_jax.models.matmul import einsum

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which the pretrained weights were trained with.
MASK_VALUE = -100.0  # timm's value for cross-region pairs in shifted windows (not -inf).

# timm's trunc_normal_(std=.02) truncates at absolute +-2, i.e. +-100 std.
_trunc_normal = nnx.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


def _param(init, names: Sequence[str | None], key, shape, dtype) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(init, tuple(names))(key, shape, dtype))


# ----------------------------------------------------------------------------- basic layers


class Dense(nnx.Module):
  """``y = x @ kernel + bias`` over the last axis; kernel is [in, out] (torch weight.T)."""

  def __init__(self, din: int, dout: int, names: tuple[str | None, str | None], *,
               use_bias: bool = True, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.kernel = _param(_trunc_normal, names, rngs.params(), (din, dout), param_dtype)
    self.bias = (_param(_zeros, names[1:], rngs.params(), (dout,), param_dtype)
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    y = einsum("mi,io->mo", x.reshape(-1, kernel.shape[0]), kernel, self.dtype)
    y = y.reshape(*x.shape[:-1], kernel.shape[1])
    return y if self.bias is None else y + self.bias[...]


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in float32 (two-pass variance, like torch)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    del rngs  # ones/zeros need no randomness; the argument keeps constructors uniform
    self.scale = nnx.Param(nnx.with_partitioning(_ones, ("embed",))(None, (dim,), param_dtype))
    self.bias = nnx.Param(nnx.with_partitioning(_zeros, ("embed",))(None, (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    var = jnp.mean(jnp.square(xc), -1, keepdims=True)
    y = xc * jax.lax.rsqrt(var + LN_EPS)
    return y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


def drop_path(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Stochastic depth: zeroes whole examples of a residual branch, rescales the rest.

  Active only when ``rngs`` is given (training); ``None`` is the deterministic path.
  """
  if rngs is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rngs.dropout(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (mask.astype(x.dtype) / keep)


# ----------------------------------------------------------------------------- window constants


@functools.lru_cache(maxsize=None)
def relative_position_index(window: tuple[int, int]) -> np.ndarray:
  """Index into the (2Wh-1)(2Ww-1) bias table for every (query, key) pair: [N, N] int32."""
  wh, ww = window
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]: query minus key
  return ((rel[0] + wh - 1) * (2 * ww - 1) + rel[1] + ww - 1).astype(np.int32)


@functools.lru_cache(maxsize=None)
def shift_attention_mask(padded: tuple[int, int], window: tuple[int, int],
                         shift: tuple[int, int]) -> np.ndarray | None:
  """Additive mask [num_windows, N, N] for shifted windows, or None without a shift.

  After the cyclic roll, a window at the bottom/right edge holds tokens from up to four image
  regions that were not neighbours; pairs from different regions get `MASK_VALUE`. The regions
  are labelled on the padded grid exactly as timm does.
  """
  if not any(shift):
    return None
  labels = np.zeros(padded, np.int32)
  bounds = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window, shift)]
  for i, (h0, h1) in enumerate(bounds[0]):
    for j, (w0, w1) in enumerate(bounds[1]):
      labels[h0:h1, w0:w1] = i * 3 + j
  win = partition_windows(labels[None, :, :, None], window)[0, :, :, 0]  # [nW, N]
  return np.where(win[:, :, None] != win[:, None, :], MASK_VALUE, 0.0).astype(np.float32)


def partition_windows(x, window: tuple[int, int]):
  """[B, H, W, C] -> [B, num_windows, Wh*Ww, C], windows in row-major order (numpy or jax)."""
  b, h, w, c = x.shape
  wh, ww = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def merge_windows(x: jax.Array, window: tuple[int, int], size: tuple[int, int]) -> jax.Array:
  """Inverse of `partition_windows` for a padded grid of ``size``."""
  b, _, _, c = x.shape
  (h, w), (wh, ww) = size, window
  x = x.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


# ----------------------------------------------------------------------------- Swin layers


class WindowAttention(nnx.Module):
  """Multi-head self-attention inside each window, with a learned relative-position bias."""

  def __init__(self, dim: int, num_heads: int, window: tuple[int, int], *, qkv_bias: bool,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.num_heads = num_heads
    self.window = window
    self.dtype = dtype
    table = ((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)
    # Replicated: it is tiny and its heads dimension rarely divides a mesh axis.
    self.relative_position_bias_table = _param(_trunc_normal, (None, None), rngs.params(),
                                               table, param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.qkv = Dense(dim, 3 * dim, ("embed", "heads"), use_bias=qkv_bias, **kw)
    self.proj = Dense(dim, dim, ("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
    """x: [B, num_windows, N, C]; mask: [num_windows, N, N] or None. Returns the same shape."""
    b, nw, n, c = x.shape
    h = self.num_heads
    # Heads next to the batch dims, as timm's permute: every attention dot (and its
    # gradients) then has leading batch dims, the layout XLA:CPU's bf16 dots support.
    qkv = self.qkv(x).reshape(b, nw, n, 3, h, c // h).transpose(3, 0, 1, 4, 2, 5)
    q, k, v = qkv[0] * (c // h) ** -0.5, qkv[1], qkv[2]
    attn = einsum("bwhnd,bwhmd->bwhnm", q, k, self.dtype).astype(jnp.float32)
    index = relative_position_index(self.window).reshape(-1)
    bias = self.relative_position_bias_table[...][index].reshape(n, n, h).transpose(2, 0, 1)
    attn = attn + bias.astype(jnp.float32)
    if mask is not None:
      attn = attn + mask[:, None]
    attn = jax.nn.softmax(attn, axis=-1)
    out = einsum("bwhnm,bwhmd->bwhnd", attn, v, self.dtype)
    return self.proj(out.transpose(0, 1, 3, 2, 4).reshape(b, nw, n, c))


class Mlp(nnx.Module):
  """fc1 -> exact (erf) GELU -> fc2, as timm's Mlp with nn.GELU."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = Dense(dim, hidden, ("embed", "mlp"), **kw)
    self.fc2 = Dense(hidden, dim, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x).astype(jnp.float32), approximate=False))


class SwinBlock(nnx.Module):
  """Pre-LN block: (shifted) window attention, then MLP, each with drop path and a residual.

  Args:
    resolution: token grid (H, W) of this block's input.
    window, shift: already clamped to the resolution (see `swin.stage_windows`).
  """

  def __init__(self, dim: int, num_heads: int, resolution: tuple[int, int],
               window: tuple[int, int], shift: tuple[int, int], *, mlp_ratio: float,
               qkv_bias: bool, drop_path: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.resolution = resolution
    self.window = window
    self.shift = shift
    self.drop_path = drop_path
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.norm1 = LayerNorm(dim, **kw)
    self.attn = WindowAttention(dim, num_heads, window, qkv_bias=qkv_bias, dtype=dtype, **kw)
    self.norm2 = LayerNorm(dim, **kw)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, **kw)

  def _attend(self, x: jax.Array) -> jax.Array:
    _, h, w, _ = x.shape
    (wh, ww), (sh, sw) = self.window, self.shift
    if sh or sw:
      x = jnp.roll(x, (-sh, -sw), axis=(1, 2))
    # timm pads after the roll, so padded tokens sit at the bottom/right of the rolled grid.
    ph, pw = -h % wh, -w % ww
    if ph or pw:
      x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    size = (h + ph, w + pw)
    mask = shift_attention_mask(size, self.window, self.shift)
    x = merge_windows(self.attn(partition_windows(x, self.window), mask), self.window, size)
    x = x[:, :h, :w]
    if sh or sw:
      x = jnp.roll(x, (sh, sw), axis=(1, 2))
    return x

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = x + drop_path(self._attend(self.norm1(x)), self.drop_path, rngs)
    x = sharding.constrain(x, ("batch", None, None, "embed"))
    x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, rngs)
    return sharding.constrain(x, ("batch", None, None, "embed"))


class PatchMerging(nnx.Module):
  """2x2 neighbourhood -> one token: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_dim].

  The 4C channels are ordered (w-offset, h-offset, C), i.e. x[0::2, 0::2], x[1::2, 0::2],
  x[0::2, 1::2], x[1::2, 1::2] — timm 1.x's reshape/permute, which is also the concatenation
  order of the original Microsoft code, so both checkpoints import unchanged.
  """

  def __init__(self, dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.norm = LayerNorm(4 * dim, rngs=rngs, param_dtype=param_dtype)
    self.reduction = Dense(4 * dim, out_dim, (None, "embed"), use_bias=False, rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if h % 2 or w % 2:
      x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
      h, w = h + h % 2, w + w % 2
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    return self.reduction(self.norm(x.reshape(b, h // 2, w // 2, 4 * c)))


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> embed_dim, then LayerNorm (timm's Conv2d + norm).

  The kernel is stored [p, p, in_chans, embed] (torch's conv weight transposed (2, 3, 1, 0));
  a stride-p convolution is a reshape and one matmul.
  """

  def __init__(self, patch: int, in_chans: int, dim: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.patch = patch
    self.dtype = dtype
    # timm leaves this conv at torch's default init: U(+-1/sqrt(fan_in)), kernel and bias.
    bound = 1.0 / np.sqrt(patch * patch * in_chans)
    init = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)  # noqa: E731
    self.kernel = _param(init, (None, None, None, "embed"), rngs.params(),
                         (patch, patch, in_chans, dim), param_dtype)
    self.bias = _param(init, ("embed",), rngs.params(), (dim,), param_dtype)
    self.norm = LayerNorm(dim, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    p = self.patch
    x = x.reshape(b, h // p, p, w // p, p, c)
    x = einsum("bhpwqc,pqco->bhwo", x, self.kernel[...], self.dtype) + self.bias[...]
    return self.norm(x)

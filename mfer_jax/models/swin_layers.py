"""Swin-specific layers (see `mfer_jax.models.swin`); the generic ones come from `layers`.

Each layer computes what its namesake in timm 1.0.31 (``timm/models/swin_transformer.py``)
computes, so that timm checkpoints import with transposes only. Differences in form, not in
result:

* Activations are NHWC and windows are kept as ``[B, num_windows, N, C]`` (timm folds the
  windows into the batch) so the shift mask broadcasts without reshapes.
* The relative-position index and the shift mask are numpy constants built from static shapes
  at trace time (cached), not buffers or params: they never enter the state or a checkpoint.
* Matmuls, LayerNorm, MLP and attention are `mfer_jax.models.layers` primitives, so they
  follow the model's `layers.Precision` (LayerNorm, softmax and GELU always float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfer_jax import sharding
from mfer_jax.models import layers
from mfer_jax.models.layers import FLOAT32, Precision

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which the pretrained weights were trained with.
MASK_VALUE = -100.0  # timm's value for cross-region pairs in shifted windows (not -inf).


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


class WindowAttention(layers.MultiHeadAttention):
  """Multi-head self-attention inside each window, plus a learned relative-position bias.

  Params: ``qkv`` and ``proj`` (from `layers.MultiHeadAttention`) and
  ``relative_position_bias_table`` [(2Wh-1)(2Ww-1), heads], as in timm.
  """

  def __init__(self, dim: int, num_heads: int, window: tuple[int, int], *, qkv_bias: bool,
               precision: Precision = FLOAT32, rngs: nnx.Rngs):
    super().__init__(dim, num_heads, qkv_bias=qkv_bias, precision=precision, rngs=rngs)
    self.window = window
    table = ((2 * window[0] - 1) * (2 * window[1] - 1), num_heads)
    # Replicated: it is tiny and its heads dimension rarely divides a mesh axis.
    self.relative_position_bias_table = layers.param(layers.trunc_normal, (None, None),
                                                     rngs.params(), table, precision.param)

  def __call__(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
    """x: [B, num_windows, N, C]; mask: [num_windows, N, N] or None. Returns the same shape."""
    n, h = x.shape[2], self.num_heads
    index = relative_position_index(self.window).reshape(-1)
    bias = self.relative_position_bias_table[...][index].reshape(n, n, h).transpose(2, 0, 1)
    bias = bias.astype(jnp.float32)  # [heads, N, N]
    if mask is not None:
      bias = bias + mask[:, None]    # [num_windows, heads, N, N]
    return super().__call__(x, bias=bias)


class SwinBlock(nnx.Module):
  """Pre-LN block: (shifted) window attention, then MLP, each with drop path and a residual.

  Args:
    resolution: token grid (H, W) of this block's input.
    window, shift: already clamped to the resolution (see `swin.stage_windows`).
  """

  def __init__(self, dim: int, num_heads: int, resolution: tuple[int, int],
               window: tuple[int, int], shift: tuple[int, int], *, mlp_ratio: float,
               qkv_bias: bool, drop_path: float, precision: Precision = FLOAT32,
               rngs: nnx.Rngs):
    self.resolution = resolution
    self.window = window
    self.shift = shift
    self.drop_path = drop_path
    kw = dict(eps=LN_EPS, param_dtype=precision.param)
    self.norm1 = layers.LayerNorm(dim, **kw)
    self.attn = WindowAttention(dim, num_heads, window, qkv_bias=qkv_bias,
                                precision=precision, rngs=rngs)
    self.norm2 = layers.LayerNorm(dim, **kw)
    self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), precision=precision, rngs=rngs)

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
    x = x + layers.drop_path(self._attend(self.norm1(x)), self.drop_path, rngs)
    x = sharding.constrain(x, ("batch", None, None, "embed"))
    x = x + layers.drop_path(self.mlp(self.norm2(x)), self.drop_path, rngs)
    return sharding.constrain(x, ("batch", None, None, "embed"))


class PatchMerging(nnx.Module):
  """2x2 neighbourhood -> one token: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_dim].

  The 4C channels are ordered (w-offset, h-offset, C), i.e. x[0::2, 0::2], x[1::2, 0::2],
  x[0::2, 1::2], x[1::2, 1::2] — timm 1.x's reshape/permute, which is also the concatenation
  order of the original Microsoft code, so both checkpoints import unchanged.
  """

  def __init__(self, dim: int, out_dim: int, *, precision: Precision = FLOAT32,
               rngs: nnx.Rngs):
    self.norm = layers.LayerNorm(4 * dim, eps=LN_EPS, param_dtype=precision.param)
    self.reduction = layers.Dense(4 * dim, out_dim, (None, "embed"), use_bias=False,
                                  precision=precision, rngs=rngs)

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

  def __init__(self, patch: int, in_chans: int, dim: int, *, precision: Precision = FLOAT32,
               rngs: nnx.Rngs):
    self.patch = patch
    self.precision = precision
    # timm leaves this conv at torch's default init: U(+-1/sqrt(fan_in)), kernel and bias.
    bound = 1.0 / np.sqrt(patch * patch * in_chans)
    init = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)  # noqa: E731
    self.kernel = layers.param(init, (None, None, None, "embed"), rngs.params(),
                               (patch, patch, in_chans, dim), precision.param)
    self.bias = layers.param(init, ("embed",), rngs.params(), (dim,), precision.param)
    self.norm = layers.LayerNorm(dim, eps=LN_EPS, param_dtype=precision.param)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    p = self.patch
    x = x.reshape(b, h // p, p, w // p, p, c)
    x = layers.einsum("bhpwqc,pqco->bhwo", x, self.kernel[...], self.precision)
    return self.norm(x + self.bias[...].astype(jnp.float32))

"""Stand-in for `mfer_jax.models.layers` until that layer library lands on main (issue #12).

The foundation encoders (`vit`, `wav2vec2`) are written against the API of ``layers.py``:
`Precision`, `einsum`, `param`, `Dense`, `LayerNorm`, `dropout`, `drop_path`, `Mlp`
(gelu / gelu_tanh / quick_gelu), `dot_product_attention`, `MultiHeadAttention` and `remat`,
with the same names, signatures and numerics. When ``layers.py`` lands, the encoders switch
with one import line (``from mfer_jax.models import layers``) and this file is deleted.
Nothing else in the library should import it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfer_jax.models import matmul

COMPUTE_DTYPES = ("float32", "bfloat16")
MATMUL_PATHS = ("xla", "cpu_amx", "auto")
REMAT_POLICIES = ("none", "block", "dots_saveable")

# timm's trunc_normal_(std=.02) truncates at absolute +-2, i.e. +-100 std.
trunc_normal = nnx.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()

Names = Sequence[str | None]


@dataclasses.dataclass(frozen=True)
class Precision:
  """How every matmul computes: operand dtype (f32 accumulation), param dtype, matmul path."""

  compute_dtype: str = "float32"
  param_dtype: str = "float32"
  matmul: str = "xla"

  def __post_init__(self):
    for key in ("compute_dtype", "param_dtype"):
      if getattr(self, key) not in COMPUTE_DTYPES:
        raise ValueError(f"model.precision.{key}={getattr(self, key)!r}: choose one of "
                         f"{', '.join(COMPUTE_DTYPES)}")
    if self.matmul not in ("xla", "cpu_amx"):
      raise ValueError(f"matmul={self.matmul!r}: choose xla or cpu_amx")

  @classmethod
  def resolve(cls, compute_dtype: str = "float32", param_dtype: str = "float32",
              matmul: str = "auto", backend: str | None = None) -> "Precision":
    if matmul not in MATMUL_PATHS:
      raise ValueError(f"model.precision.matmul={matmul!r}: choose one of "
                       f"{', '.join(MATMUL_PATHS)}")
    if matmul == "auto":
      backend = jax.default_backend() if backend is None else backend
      matmul = "cpu_amx" if backend == "cpu" else "xla"
    return cls(compute_dtype=compute_dtype, param_dtype=param_dtype, matmul=matmul)

  @property
  def compute(self) -> np.dtype:
    return jnp.dtype(self.compute_dtype)

  @property
  def param(self) -> np.dtype:
    return jnp.dtype(self.param_dtype)


FLOAT32 = Precision()


def einsum(spec: str, a: jax.Array, b: jax.Array, precision: Precision = FLOAT32) -> jax.Array:
  """``jnp.einsum(spec, a, b)`` with operands in the compute dtype, accumulated in float32."""
  dtype = precision.compute
  if precision.matmul == "cpu_amx" and dtype != jnp.float32:
    return matmul.einsum(spec, a, b, dtype)
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def param(init: Callable, names: Names, key: jax.Array | None, shape: Sequence[int],
          dtype) -> nnx.Param:
  """An ``nnx.Param`` initialised by ``init`` and carrying logical axis ``names``."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  return nnx.Param(nnx.with_partitioning(init, tuple(names))(key, tuple(shape), dtype))


class Dense(nnx.Module):
  """``y = x @ kernel + bias`` over the last axis; the kernel is [in, out] (torch weight.T)."""

  def __init__(self, din: int, dout: int, names: tuple[str | None, str | None] = (None, None),
               *, use_bias: bool = True, precision: Precision = FLOAT32,
               kernel_init: Callable = trunc_normal, bias_init: Callable = zeros,
               rngs: nnx.Rngs):
    self.precision = precision
    self.kernel = param(kernel_init, names, rngs.params(), (din, dout), precision.param)
    self.bias = (param(bias_init, names[1:], rngs.params(), (dout,), precision.param)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    y = einsum("mi,io->mo", x.reshape(-1, kernel.shape[0]), kernel, self.precision)
    y = y.reshape(*x.shape[:-1], kernel.shape[1])
    return y if self.bias is None else y + self.bias[...].astype(jnp.float32)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed and returned in float32 (two-pass, as torch)."""

  def __init__(self, dim: int, *, eps: float = 1e-5, names: tuple[str | None] = ("embed",),
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = float(eps)
    self.scale = param(ones, names, None, (dim,), param_dtype)
    self.bias = param(zeros, names, None, (dim,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    xc = x - x.mean(-1, keepdims=True)
    var = jnp.mean(jnp.square(xc), -1, keepdims=True)
    y = xc * jax.lax.rsqrt(var + self.eps)
    return y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout of single elements, active only when ``rngs`` is given (training)."""
  if rngs is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def drop_path(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Stochastic depth over whole examples (dim 0); active only when ``rngs`` is given."""
  if rngs is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rngs.dropout(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (mask.astype(x.dtype) / keep)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation, ``x * sigmoid(1.702 x)``."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
}


class Mlp(nnx.Module):
  """The transformer feed-forward: ``fc2(act(fc1(x)))``, as timm's Mlp."""

  def __init__(self, dim: int, hidden: int, *, out_dim: int | None = None,
               activation: str = "gelu", precision: Precision = FLOAT32, rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    self.activation = activation
    self.fc1 = Dense(dim, hidden, ("embed", "mlp"), precision=precision, rngs=rngs)
    self.fc2 = Dense(hidden, out_dim or dim, ("mlp", "embed"), precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | np.ndarray | None = None,
                          precision: Precision = FLOAT32) -> jax.Array:
  """Softmax attention; q [..., heads, n, d] (already scaled), k/v [..., heads, m, d]."""
  lead = q.shape[:-3]
  h, n, _ = q.shape[-3:]
  m = k.shape[-2]
  flat = lambda t: t.reshape(-1, *t.shape[-3:])  # noqa: E731
  logits = einsum("bhnd,bhmd->bhnm", flat(q), flat(k), precision).reshape(*lead, h, n, m)
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1)
  out = einsum("bhnm,bhmd->bhnd", weights.reshape(-1, h, n, m), flat(v), precision)
  return out.reshape(*lead, h, n, v.shape[-1])


class MultiHeadAttention(nnx.Module):
  """Multi-head self-attention with a fused ``qkv`` and ``proj`` (timm's Attention names)."""

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True,
               precision: Precision = FLOAT32, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.precision = precision
    self.qkv = Dense(dim, 3 * dim, ("embed", "heads"), use_bias=qkv_bias, precision=precision,
                     rngs=rngs)
    self.proj = Dense(dim, dim, ("heads", "embed"), precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array, *, bias: jax.Array | np.ndarray | None = None) -> jax.Array:
    *lead, n, width = x.shape
    h = self.num_heads
    nl = len(lead)
    y = self.qkv(x).reshape(*lead, n, 3, h, width // h)
    q, k, v = y.transpose(nl + 1, *range(nl), nl + 2, nl, nl + 3)
    q = q * q.shape[-1] ** -0.5
    out = dot_product_attention(q, k, v, bias=bias, precision=self.precision)
    out = jnp.swapaxes(out, -3, -2)
    return self.proj(out.reshape(*out.shape[:-2], math.prod(out.shape[-2:])))


_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def check_remat(policy: str) -> str:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"model.remat={policy!r}: choose one of {', '.join(REMAT_POLICIES)}")
  return policy


def remat(fn: Callable, policy: str) -> Callable:
  """``fn(module, *args)`` under ``jax.checkpoint`` with a named policy ('none': unchanged)."""
  if check_remat(policy) == "none":
    return fn
  return nnx.remat(fn, policy=_POLICIES[policy])

"""The layer library every model part is built from, and the precision policy it follows.

Encoders (Swin, ViT / DINOv2 / MAE / CLIP, wav2vec 2.0 / HuBERT), the fusion module and
temporal heads build on these primitives only, so one config switch changes the numerics of
the whole model and nothing else decides them.

**Precision policy** (`Precision`, from ``config.model.precision``):

* ``compute_dtype``: dtype of matmul *operands*. Products always accumulate in float32
  (``preferred_element_type``) and come back float32, so the residual stream, LayerNorm,
  softmax and activations are float32 whatever the setting (big_vision's ``dtype_mm``).
  ``bfloat16`` halves the bytes of what a matmul reads and of what autodiff keeps for the
  backward pass, and runs on tensor cores, the MXU, or AMX.
* ``param_dtype``: storage dtype of params (and so of gradients and updates).
* ``matmul``: how a product is computed.

  - ``xla``: plain ``jnp.einsum`` with float32 accumulation and JAX's own autodiff; XLA picks
    layouts and fusions. The portable path for GPU and TPU. In the backward pass the
    cotangent is float32, so with bf16 operands JAX transposes each product into a float32
    dot (TF32 on Ampere+ GPUs, one bf16 pass at default precision on TPU).
  - ``cpu_amx``: a hand-written VJP (`mfer_jax.models.matmul`) that also keeps the backward
    dots bf16-in / f32-out and fixes operand layouts behind optimisation barriers, so that
    XLA:CPU runs every dot on its AMX (YNNPACK) kernels. Used only with a bf16 compute dtype;
    in float32 both paths are the same plain einsum.
  - ``auto``: ``cpu_amx`` when ``jax.default_backend()`` is ``cpu``, ``xla`` elsewhere,
    resolved once when the `Precision` is built.

**Parameters** carry logical axis names (``embed``, ``heads``, ``mlp``, ...; see
`mfer_jax.sharding`), and are initialised as timm initialises its transformers: kernels
truncated-normal(std 0.02, cut at +-2 absolute), biases zero, LayerNorm scale one.

**Randomness**: dropout and drop path run only when an ``nnx.Rngs`` with a ``dropout``
stream is passed (training); ``None`` is the deterministic path. No layer holds RNG state.

**Rematerialisation**: `remat` wraps a block's call in ``jax.checkpoint`` (via ``nnx.remat``)
with one of `REMAT_POLICIES`; models apply it per transformer block.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfer_jax import errors
from mfer_jax.constants import DTYPES, MATMUL_PATHS, REMAT_POLICIES
from mfer_jax.models import matmul

# timm's trunc_normal_(std=.02) truncates at absolute +-2, i.e. +-100 std.
trunc_normal = nnx.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()

Names = Sequence[str | None]


class LayerConfigError(errors.UsageError, ValueError):
  """A ``model.precision`` or ``model.remat`` value that does not exist; the message names
  the key and the choices."""


# ----------------------------------------------------------------------------- precision


@dataclasses.dataclass(frozen=True)
class Precision:
  """How every matmul of a model computes; build it with `Precision.resolve`.

  Frozen and hashable: it is static model structure (part of the graph definition), so a
  change recompiles instead of silently reusing a program.

  Attributes:
    compute_dtype: matmul operand dtype, "float32" or "bfloat16" (accumulation is float32).
    param_dtype: param storage dtype, "float32" or "bfloat16".
    matmul: the resolved path, "xla" or "cpu_amx" (never "auto").
  """

  compute_dtype: str = "float32"
  param_dtype: str = "float32"
  matmul: str = "xla"

  def __post_init__(self):
    for key in ("compute_dtype", "param_dtype"):
      if getattr(self, key) not in DTYPES:
        raise LayerConfigError(f"model.precision.{key}={getattr(self, key)!r}: choose one of "
                             f"{', '.join(DTYPES)}")
    if self.matmul not in ("xla", "cpu_amx"):
      raise LayerConfigError(f"model.precision.matmul={self.matmul!r}: choose one of "
                           f"{', '.join(MATMUL_PATHS)} (build with Precision.resolve)")

  @classmethod
  def resolve(cls, compute_dtype: str = "float32", param_dtype: str = "float32",
              matmul: str = "auto", backend: str | None = None) -> "Precision":
    """Validates the settings and resolves ``matmul="auto"`` for ``backend``.

    Args:
      compute_dtype: "float32" or "bfloat16".
      param_dtype: "float32" or "bfloat16".
      matmul: "xla", "cpu_amx" or "auto".
      backend: platform the model will run on; default ``jax.default_backend()``.

    Raises:
      LayerConfigError: for a value that is not one of the choices.
    """
    if matmul not in MATMUL_PATHS:
      raise LayerConfigError(f"model.precision.matmul={matmul!r}: choose one of "
                           f"{', '.join(MATMUL_PATHS)}")
    if matmul == "auto":
      backend = jax.default_backend() if backend is None else backend
      matmul = "cpu_amx" if backend == "cpu" else "xla"
    return cls(compute_dtype=compute_dtype, param_dtype=param_dtype, matmul=matmul)

  @classmethod
  def from_config(cls, cfg, backend: str | None = None) -> "Precision":
    """`resolve` from ``config.model.precision`` (compute_dtype, param_dtype, matmul)."""
    return cls.resolve(cfg.compute_dtype, cfg.param_dtype, cfg.matmul, backend)

  @property
  def compute(self) -> np.dtype:
    return jnp.dtype(self.compute_dtype)

  @property
  def param(self) -> np.dtype:
    return jnp.dtype(self.param_dtype)


FLOAT32 = Precision()


def einsum(spec: str, a: jax.Array, b: jax.Array, precision: Precision = FLOAT32) -> jax.Array:
  """``jnp.einsum(spec, a, b)`` with operands in the compute dtype, accumulated in float32.

  Args:
    spec: ``"ab,bc->ac"`` style, no ellipsis or repeated indices; every index of an operand
      must appear in the other operand or in the output (dense layers and attention).
    a: first operand, any float dtype; its gradient comes back in its dtype.
    b: second operand, likewise.
    precision: compute dtype and matmul path.

  Returns:
    The product, float32.

  Raises:
    ValueError: for a spec that sums an index within one operand (the cpu_amx VJP cannot
      express it, so neither path accepts it and a model runs on both).
  """
  matmul.check_spec(spec)
  dtype = precision.compute
  if precision.matmul == "cpu_amx" and dtype != jnp.float32:
    return matmul.cpu_amx_einsum(spec, a, b, dtype)
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def param(init: Callable, names: Names, key: jax.Array | None, shape: Sequence[int],
          dtype) -> nnx.Param:
  """An ``nnx.Param`` initialised by ``init`` and carrying logical axis ``names``."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  return nnx.Param(nnx.with_partitioning(init, tuple(names))(key, tuple(shape), dtype))


# ----------------------------------------------------------------------------- basic layers


class Dense(nnx.Module):
  """``y = x @ kernel + bias`` over the last axis; the kernel is [in, out] (torch weight.T).

  Args:
    din, dout: input and output widths.
    names: logical axis names of the kernel (in, out); the bias takes the output name.
    use_bias: whether there is a bias.
    precision: matmul policy.
    kernel_init, bias_init: initialisers (default timm's: truncated normal 0.02, zeros).
    rngs: needs a ``params`` stream.
  """

  def __init__(self, din: int, dout: int, names: tuple[str | None, str | None] = (None, None),
               *, use_bias: bool = True, precision: Precision = FLOAT32,
               kernel_init: Callable = trunc_normal, bias_init: Callable = zeros,
               rngs: nnx.Rngs):
    self.precision = precision
    self.kernel = param(kernel_init, names, rngs.params(), (din, dout), precision.param)
    self.bias = (param(bias_init, names[1:], rngs.params(), (dout,), precision.param)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., din] -> float32 [..., dout]."""
    kernel = self.kernel[...]
    # A 2-D product: the layout every backend (and the cpu_amx VJP) handles best.
    y = einsum("mi,io->mo", x.reshape(-1, kernel.shape[0]), kernel, self.precision)
    y = y.reshape(*x.shape[:-1], kernel.shape[1])
    return y if self.bias is None else y + self.bias[...].astype(jnp.float32)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed and returned in float32 (two-pass, as torch).

  Args:
    dim: normalised width.
    eps: variance epsilon (1e-5 is torch's default, which timm's Swin and ViT use; CLIP and
      DINOv2 use 1e-5 and 1e-6; wav2vec 2.0 1e-5).
    names: logical axis name of scale and bias.
    param_dtype: storage dtype of scale and bias.
  """

  def __init__(self, dim: int, *, eps: float = 1e-5, names: tuple[str | None] = ("embed",),
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # ones/zeros need no randomness; accepted so constructors stay uniform
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
  """Stochastic depth: zeroes whole examples (dim 0) of a residual branch, rescales the rest.

  Active only when ``rngs`` is given (training); ``None`` is the deterministic path.
  """
  if rngs is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rngs.dropout(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (mask.astype(x.dtype) / keep)


class LayerScale(nnx.Module):
  """Per-channel scale of a residual branch, ``x * gamma`` (CaiT, DINOv2; timm's LayerScale).

  Args:
    dim: width.
    init_value: initial value of every ``gamma`` entry (DINOv2: 1e-5).
    names: logical axis name of ``gamma``.
    param_dtype: storage dtype of ``gamma``.
  """

  def __init__(self, dim: int, init_value: float, *, names: tuple[str | None] = ("embed",),
               param_dtype=jnp.float32):
    init = lambda key, shape, dt: jnp.full(shape, init_value, dt)  # noqa: E731
    self.gamma = param(init, names, None, (dim,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., dim] -> float32 [..., dim]."""
    return x * self.gamma[...].astype(jnp.float32)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation, ``x * sigmoid(1.702 x)``."""
  return x * jax.nn.sigmoid(1.702 * x)


# name -> function; all run in float32.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),   # torch nn.GELU(), timm, DINOv2
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GELU(approximate='tanh')
    "quick_gelu": quick_gelu,                                # OpenAI CLIP
}


class Mlp(nnx.Module):
  """The transformer feed-forward: ``fc2(act(fc1(x)))``, as timm's Mlp.

  Args:
    dim: input width (and output width unless ``out_dim`` is given).
    hidden: hidden width.
    out_dim: output width (default ``dim``).
    activation: a key of `ACTIVATIONS`.
    precision: matmul policy.
    rngs: needs a ``params`` stream.
  """

  def __init__(self, dim: int, hidden: int, *, out_dim: int | None = None,
               activation: str = "gelu", precision: Precision = FLOAT32, rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    self.activation = activation
    self.fc1 = Dense(dim, hidden, ("embed", "mlp"), precision=precision, rngs=rngs)
    self.fc2 = Dense(hidden, out_dim or dim, ("mlp", "embed"), precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


# ----------------------------------------------------------------------------- attention


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | np.ndarray | None = None,
                          precision: Precision = FLOAT32) -> jax.Array:
  """Softmax attention over keys; heads sit next to the batch dims.

  Args:
    q: [..., heads, n, d] queries, already scaled (e.g. by ``d ** -0.5``).
    k: [..., heads, m, d] keys.
    v: [..., heads, m, dv] values.
    bias: additive float bias broadcastable to [..., heads, n, m] (relative positions, masks:
      use a large negative value such as -1e9, not -inf, for excluded pairs), or None.
    precision: matmul policy; the logits and softmax are float32 whatever it says.

  Returns:
    float32 [..., heads, n, dv].
  """
  lead = q.shape[:-3]
  h, n, d = q.shape[-3:]
  m = k.shape[-2]
  # One flat batch dim: the (batch, heads, tokens, dim) layout every dot of the forward and
  # backward pass can run in without transposes (required by XLA:CPU bf16 dots).
  flat = lambda t: t.reshape(-1, *t.shape[-3:])  # noqa: E731
  logits = einsum("bhnd,bhmd->bhnm", flat(q), flat(k), precision)
  logits = logits.reshape(*lead, h, n, m)
  if bias is not None:
    logits = logits + jnp.asarray(bias, jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1)
  out = einsum("bhnm,bhmd->bhnd", weights.reshape(-1, h, n, m), flat(v), precision)
  return out.reshape(*lead, h, n, v.shape[-1])


class MultiHeadAttention(nnx.Module):
  """Multi-head attention, self (fused ``qkv``) or cross (``q`` from x, ``kv`` from context).

  Param names follow timm's Attention (``qkv``, ``proj``), so ViT-family checkpoints import
  with transposes only; cross-attention splits the fused projection into ``q`` and ``kv``.
  Queries are scaled before the product, as in timm.

  Args:
    dim: query (and output) width; ``num_heads`` must divide it.
    num_heads: heads.
    cross: cross-attention (keys and values from ``context``) instead of self-attention.
    kv_dim: width of ``context`` (cross only; default ``dim``).
    qkv_bias: whether the input projections have biases.
    precision: matmul policy.
    rngs: needs a ``params`` stream.
  """

  def __init__(self, dim: int, num_heads: int, *, cross: bool = False,
               kv_dim: int | None = None, qkv_bias: bool = True,
               precision: Precision = FLOAT32, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.precision = precision
    kw = dict(use_bias=qkv_bias, precision=precision, rngs=rngs)
    if cross:
      self.q = Dense(dim, dim, ("embed", "heads"), **kw)
      self.kv = Dense(kv_dim or dim, 2 * dim, ("embed", "heads"), **kw)
    else:
      self.qkv = Dense(dim, 3 * dim, ("embed", "heads"), **kw)
    self.proj = Dense(dim, dim, ("heads", "embed"), precision=precision, rngs=rngs)

  def _heads(self, y: jax.Array, parts: int) -> jax.Array:
    """[..., n, parts * dim] -> [parts, ..., heads, n, head_dim] (timm's permute)."""
    *lead, n, width = y.shape
    h = self.num_heads
    y = y.reshape(*lead, n, parts, h, width // (parts * h))
    nl = len(lead)
    return y.transpose(nl + 1, *range(nl), nl + 2, nl, nl + 3)

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               bias: jax.Array | np.ndarray | None = None) -> jax.Array:
    """Attends.

    Args:
      x: [..., n, dim] queries (and keys/values for self-attention).
      context: [..., m, kv_dim] keys/values source (cross-attention only).
      bias: additive bias broadcastable to [..., heads, n, m], or None.

    Returns:
      float32 [..., n, dim].
    """
    if hasattr(self, "qkv"):
      if context is not None:
        raise ValueError("self-attention takes no context; build with cross=True")
      q, k, v = self._heads(self.qkv(x), 3)
    else:
      if context is None:
        raise ValueError("cross-attention needs a context")
      q, = self._heads(self.q(x), 1)
      k, v = self._heads(self.kv(context), 2)
    q = q * q.shape[-1] ** -0.5
    out = dot_product_attention(q, k, v, bias=bias, precision=self.precision)
    # [..., heads, n, d] -> [..., n, heads * d]
    out = jnp.swapaxes(out, -3, -2)
    return self.proj(out.reshape(*out.shape[:-2], math.prod(out.shape[-2:])))


# ----------------------------------------------------------------------------- remat

_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def check_remat(policy: str) -> str:
  """Validates a ``model.remat`` value."""
  if policy not in REMAT_POLICIES:
    raise LayerConfigError(f"model.remat={policy!r}: choose one of {', '.join(REMAT_POLICIES)}")
  return policy


def remat(fn: Callable, policy: str) -> Callable:
  """``fn(module, *args)`` with its activations rematerialised under a named policy.

  Policies (``model.remat``):
    none           keep every activation for the backward pass (fastest, most memory);
    block          keep only the block's inputs and recompute the block in the backward
                   pass (least memory, about one extra forward pass);
    dots_saveable  keep matmul outputs, recompute the elementwise work between them.

  ``jax.checkpoint`` alone is not enough on XLA:CPU: the CPU compiler removes the
  optimisation barriers that keep the recomputation apart and then schedules it right after
  the forward pass, so the activations live as long as without remat (measured in
  docs/scaling.md). The recomputation therefore also takes a data dependency on the block's
  output cotangent (`_tied_checkpoint`): it cannot start before the backward pass reaches the
  block, on any backend. That makes CPU memory figures (the planner's) honest and costs one
  scalar add per saved residual.

  An ``nnx.Rngs`` argument is replaced by a fresh one seeded from one key drawn from it, with
  or without remat, so the random numbers a block sees do not depend on the policy.

  Args:
    fn: a function whose first argument is an ``nnx.Module`` holding only params, e.g.
      ``SwinBlock.__call__``; other arguments are arrays, None or ``nnx.Rngs``.
    policy: one of `REMAT_POLICIES`.

  Returns:
    A function with ``fn``'s signature.
  """
  check_remat(policy)

  def call(module, *args):
    keys = [a.dropout() if isinstance(a, nnx.Rngs) else None for a in args]
    arrays = [None if isinstance(a, nnx.Rngs) else a for a in args]
    graphdef, state = nnx.split(module)

    def pure(state, arrays, keys):
      full = [a if k is None else nnx.Rngs(dropout=k) for a, k in zip(arrays, keys)]
      return fn(nnx.merge(graphdef, state), *full)

    if policy == "none":
      return pure(state, arrays, keys)
    return _tied_checkpoint(pure, _POLICIES[policy])(state, arrays, keys)

  return call


def _tied_checkpoint(f: Callable, policy) -> Callable:
  """``jax.checkpoint(f, policy)`` whose backward recomputation waits for the cotangent."""
  checkpointed = jax.checkpoint(f, policy=policy)

  @jax.custom_vjp
  def tied(*args):
    return checkpointed(*args)

  def fwd(*args):
    # The vjp function's leaves are exactly the residuals the policy saves.
    return jax.vjp(checkpointed, *args)

  def bwd(vjp_fn, ct):
    # x * 0 is not folded for floats (NaN semantics), so this zero depends on the cotangent.
    zero = jax.tree.leaves(ct)[0].ravel()[0].astype(jnp.float32) * 0.0

    def tie(r):
      return r + zero.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.floating) else r

    return jax.tree.map(tie, vjp_fn)(ct)

  tied.defvjp(fwd, bwd)
  return tied

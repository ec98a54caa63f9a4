"""The ``cpu_amx`` matmul path: bf16-in / f32-out in both passes, in layouts XLA:CPU runs on AMX.

An implementation detail of `mfer_jax.models.layers.einsum`, which chooses it when
``model.precision.matmul`` resolves to ``cpu_amx`` and the compute dtype is bfloat16. Models
never call it directly.

Why it exists: with bf16 operands both passes should keep bf16 operands and float32
accumulation (``preferred_element_type``), which is what runs on AMX; JAX's own transpose of a
mixed dot takes the float32 cotangent and so emits float32 matmuls. The hand-written VJP also
fixes the layout of every dot: XLA:CPU's fast YNNPACK kernels take a left operand that
contracts over its trailing dims, and a bf16 dot that does not fit is upcast to float32 and run
by a slow generic kernel, or fails at run time ("Unsupported element type for DotThunk: BF16 x
BF16 = F32"). Gradients such as ``dW = x^T g`` or the attention ``dK = dS^T Q`` are such dots,
so `_dot` transposes an operand explicitly (choosing the cheaper one) behind an optimisation
barrier that stops XLA from folding the transpose back into the dot. Those barriers also stop
GPU and TPU compilers from choosing layouts, which is why the portable ``xla`` path has none
(docs/scaling.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def check_spec(spec: str) -> None:
  """Raises ValueError unless every index of an operand is in the other operand or the output.

  An index summed within one operand would make its gradient a broadcast, not a dot.
  """
  ins, out = spec.split("->")
  sa, sb = ins.split(",")
  for s, other in ((sa, sb), (sb, sa)):
    lost = [c for c in s if c not in other and c not in out]
    if lost:
      raise ValueError(f"einsum {spec!r}: index {lost[0]!r} is summed within one operand")


def cpu_amx_einsum(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  """``einsum(spec, a, b)`` with ``dtype`` operands and float32 results, in both passes.

  Args:
    spec: as `mfer_jax.models.layers.einsum` (checked there).
    a, b: operands of any float dtype; their gradients come back in their dtypes.
    dtype: the low-precision operand dtype (bfloat16).

  Returns:
    The product in float32.
  """
  return _einsum(spec, jnp.dtype(dtype), a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _einsum(spec, dtype, a, b):
  return _dot(spec, a.astype(dtype), b.astype(dtype))


def _einsum_fwd(spec, dtype, a, b):
  a_low, b_low = a.astype(dtype), b.astype(dtype)
  # Zero-size tags carry the primal dtypes: residuals must be arrays.
  tags = (jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))
  return _dot(spec, a_low, b_low), (a_low, b_low, tags)


def _einsum_bwd(spec, dtype, res, g):
  a_low, b_low, (a_tag, b_tag) = res
  ins, out = spec.split("->")
  sa, sb = ins.split(",")
  g_low = g.astype(dtype)
  da = _dot(f"{out},{sb}->{sa}", g_low, b_low)
  db = _dot(f"{out},{sa}->{sb}", g_low, a_low)
  return da.astype(a_tag.dtype), db.astype(b_tag.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def _dot(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """One dot_general in canonical layout, operands transposed only where needed.

  Tries both operand orders and takes the one that moves the fewest elements: the left
  operand must be (batch, free, contracted), the right (batch, contracted, free) or
  (batch, free, contracted), and the result is transposed if the requested order differs.
  """
  ins, out = spec.split("->")
  sx, sy = ins.split(",")
  size = {c: d for s, v in ((sx, x), (sy, y)) for c, d in zip(s, v.shape)}
  numel = lambda idx: math.prod(size[c] for c in idx)  # noqa: E731
  batch = [c for c in out if c in sx and c in sy]
  best = None
  for (l, sl), (r, sr) in (((x, sx), (y, sy)), ((y, sy), (x, sx))):
    contract = [c for c in sl if c in sr and c not in out]
    free_l = [c for c in out if c in sl and c not in sr]
    free_r = [c for c in out if c in sr and c not in sl]
    want_l = batch + free_l + contract
    nt = batch + free_r + contract
    want_r = nt if list(sr) == nt else batch + contract + free_r
    natural = batch + free_l + free_r
    cost = ((numel(sl) if list(sl) != want_l else 0) + (numel(sr) if list(sr) != want_r else 0)
            + (numel(out) if natural != list(out) else 0))
    if best is None or cost < best[0]:
      best = (cost, l, sl, want_l, r, sr, want_r, natural, len(contract))
  _, l, sl, want_l, r, sr, want_r, natural, nc = best
  l, r = _transpose(l, sl, want_l), _transpose(r, sr, want_r)
  nb = len(batch)
  contract_l = tuple(range(len(want_l) - nc, len(want_l)))
  contract_r = tuple(want_r.index(c) for c in want_l[len(want_l) - nc:])
  res = lax.dot_general(l, r, ((contract_l, contract_r), (tuple(range(nb)), tuple(range(nb)))),
                        preferred_element_type=jnp.float32)
  return res.transpose([natural.index(c) for c in out])


def _transpose(v: jax.Array, have, want) -> jax.Array:
  if list(have) == list(want):
    return v
  # The barrier keeps XLA from folding the transpose back into the dot's dimension numbers,
  # which would recreate the slow layout.
  return lax.optimization_barrier(v.transpose([have.index(c) for c in want]))

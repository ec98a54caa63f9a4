"""Device mesh, logical-axis rules, and how params and activations are placed on the mesh.

Every param carries logical axis names (``nnx.with_partitioning(init, ('embed', 'mlp'))``) and
the residual streams are constrained with `constrain`. One rules table, from the config, maps
logical names to mesh axes, so the same model runs data-parallel on a laptop, FSDP on a TPU
pod, or tensor-parallel over ``model``, by editing the config only.

Logical names used by the model:
  batch        the example dimension of activations
  embed        model width (Swin stage width, fusion width)
  mlp          feed-forward hidden width
  heads        fused attention projections (heads * head_dim)
  classes      classifier outputs
A name missing from the rules, or ``None``, means replicated along that dimension.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

# Data-parallel over ('data', 'fsdp'); params sharded over 'fsdp' (ZeRO-3 style) and 'model'.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("classes", None),
)

Rules = Sequence[tuple[str, Any]]


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axes: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh over all (or the given) devices; one ``-1`` entry takes the remainder.

  Axis types are Auto, so jit partitions GSPMD-style from in/out shardings and constraints
  (``jax.make_mesh`` defaults to Explicit; docs/sharding.md).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {tuple(shape)} does not match axes {tuple(axes)}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one -1 entry")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot fill mesh shape {tuple(shape)}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, "
                     f"but {len(devices)} are available; use -1 for the data axis")
  return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                       devices=devices)


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """Maps logical axis names to a PartitionSpec; unknown names are replicated.

  With ``mesh`` and ``shape``, mesh axes that do not divide the dimension are dropped (so tiny
  test models and odd widths still place, replicated, instead of failing to compile), and a
  mesh axis is used at most once per array.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    kept = []
    for ax in axes:
      if ax in used:
        continue
      size = mesh.shape[ax] if mesh is not None else 1
      done = math.prod(mesh.shape[a] for a in kept) if mesh is not None else 1
      if shape is not None and shape[i] % (done * size):
        continue
      kept.append(ax)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def _var_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
  meta = var.get_metadata()
  return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for an nnx.State (or any pytree of Variables / arrays).

  Variables with logical names follow the rules; everything else (optimizer scalars, RNG
  keys, unannotated arrays) is replicated, with ``P()`` rather than left unspecified.
  """

  def one(x):
    if isinstance(x, nnx.Variable):
      names = _var_names(x)
      value = x.get_value() if hasattr(x, "get_value") else x.value
      spec = (logical_to_spec(names, rules, mesh, np.shape(value)) if names else P())
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


class _Active(threading.local):
  mesh: Mesh | None = None
  rules: Rules = ()


_active = _Active()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
  """Activates ``mesh`` and ``rules`` for `constrain` while tracing model code."""
  old = (_active.mesh, _active.rules)
  _active.mesh, _active.rules = mesh, tuple(rules)
  try:
    yield
  finally:
    _active.mesh, _active.rules = old


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Constrains an activation to its logical placement; a no-op outside `use_rules`."""
  if _active.mesh is None:
    return x
  spec = logical_to_spec(names, _active.rules, _active.mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(_active.mesh, spec))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch-major array: dim 0 over the batch axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))

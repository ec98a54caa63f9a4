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
import dataclasses
import math
import threading
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mfer_jax import console, errors

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


class ShardingError(errors.UsageError, ValueError):
  """Params stay replicated beyond ``mesh.max_replicated_fraction``; names the largest."""


@dataclasses.dataclass(frozen=True)
class ReplicationReport:
  """Params that no mesh axis of size > 1 shards, under a given mesh.

  Attributes:
    total_bytes: bytes of all params (global, unsharded).
    replicated: (param path, bytes) of every fully replicated param, largest first.
  """

  total_bytes: int
  replicated: tuple[tuple[str, int], ...]

  @property
  def replicated_bytes(self) -> int:
    return sum(b for _, b in self.replicated)

  @property
  def fraction(self) -> float:
    return self.replicated_bytes / max(self.total_bytes, 1)

  def summary(self, top: int = 5) -> str:
    largest = ", ".join(f"{p} ({b / 2**20:.2f} MiB)" for p, b in self.replicated[:top])
    return (f"{len(self.replicated)} params ({self.fraction:.1%} of "
            f"{self.total_bytes / 2**20:.1f} MiB) stay replicated on every device"
            + (f"; largest: {largest}" if largest else ""))


def replication_report(params: Any, shardings: Any, mesh: Mesh) -> ReplicationReport:
  """Which params `logical_to_spec` left replicated (their mesh axes did not divide them,
  or their logical names map to no axis of size > 1).

  Args:
    params: the (abstract) params, an nnx.State or pytree of arrays / ShapeDtypeStructs.
    shardings: the matching tree of NamedShardings.
    mesh: the mesh they are placed on.
  """
  big_axes = {a for a, n in mesh.shape.items() if n > 1}
  total, replicated = 0, []
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for (path, leaf), sh in zip(leaves, jax.tree.leaves(shardings)):
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    used = {a for entry in sh.spec if entry
            for a in ((entry,) if isinstance(entry, str) else entry)}
    if not used & big_axes:
      replicated.append((_path_name(path), nbytes))
  replicated.sort(key=lambda x: -x[1])
  return ReplicationReport(total, tuple(replicated))


def _path_name(path) -> str:
  """'layers/0/blocks/1/attn/qkv/kernel' from a pytree key path (Variable wrappers dropped)."""
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return "/".join(p for p in parts if p not in ("value", ".value"))


def replicated_fraction_limit(mesh: Mesh, configured: float) -> float | None:
  """``mesh.max_replicated_fraction``: a value >= 0 is the limit; -1 (auto) is 0.1 when
  the mesh has fsdp > 1, else no limit (None)."""
  if configured >= 0:
    return configured
  return 0.1 if mesh.shape.get("fsdp", 1) > 1 else None


def check_replication(params: Any, shardings: Any, mesh: Mesh,
                      max_fraction: float = -1.0) -> ReplicationReport:
  """Logs the params that stay replicated under an fsdp or model mesh, and enforces the limit.

  Raises:
    ShardingError: if the replicated share of param bytes exceeds the limit
      (`replicated_fraction_limit`); the message names the largest offenders and the fix.
  """
  report = replication_report(params, shardings, mesh)
  if mesh.shape.get("fsdp", 1) == 1 and mesh.shape.get("model", 1) == 1:
    return report  # data-parallel: every param is replicated by design
  console.say(f"Sharding: {report.summary()}.")
  limit = replicated_fraction_limit(mesh, max_fraction)
  if limit is not None and report.fraction > limit:
    raise ShardingError(
        f"mesh {dict(mesh.shape)}: {report.summary()}; that is more than "
        f"mesh.max_replicated_fraction={limit}. Pick mesh sizes that divide these widths, map "
        "their logical axes in mesh.rules, or raise the limit.")
  return report


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

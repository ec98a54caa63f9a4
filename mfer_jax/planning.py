"""Memory and FLOPs of the real train step per device, before renting hardware.

`plan_step` builds the train step exactly as training does (model, optimizer, shardings from
the config's rules, donated state) on N CPU devices, lowers and compiles it ahead of time
with abstract inputs, and never runs it. What it reports, per device:

* params, optimizer state and batch bytes: exact, from each array's sharding;
* temporaries (activations kept for the backward pass, gradients, workspace): XLA's buffer
  assignment of the compiled program. It is XLA:CPU's, an estimate for GPU and TPU, whose
  compilers fuse and schedule differently;
* FLOPs per step: XLA's cost analysis of the compiled per-device program.

`fit_table` turns plans into a table for the accelerators of `mfer_jax.accelerators`: whether
the step fits, the largest per-device batch that fits with and without remat, and the step
time at 40% MFU. ``python -m mfer_jax.tools.plan`` is the command-line front end.

Matmul precision ``auto`` is resolved to ``xla``: the plan is for an accelerator, not for the
CPU it is compiled on.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from mfer_jax import accelerators, errors, sharding
from mfer_jax.constants import REMAT_POLICIES
from mfer_jax.media.audio_features import FeatureParams
from mfer_jax.models import encoders
from mfer_jax.models import model as model_lib
from mfer_jax.models.layers import Precision
from mfer_jax.training import optimizer, state as state_lib, step as step_lib

MFU_TARGET = 0.4
# Compile options of planning compiles: buffer assignment and cost analysis are done on the
# optimised HLO, before LLVM code generation, which these make cheap (the program never runs).
_PLAN_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                          "xla_llvm_disable_expensive_passes": True}


class PlanError(errors.UsageError, ValueError):
  """A mesh, device count or batch the planner cannot use; one line naming the flag."""


def use_cpu_devices(count: int) -> list[jax.Device]:
  """``count`` CPU devices: asks JAX for them when its backend has not started yet, else uses
  the CPU devices the process already has (tests run with 8).

  Raises:
    PlanError: if fewer than ``count`` CPU devices are available.
  """
  if count < 1:
    raise PlanError(f"--devices={count}: give a positive number of devices")
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:
    pass  # the backend is already up; use its devices
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise PlanError(f"--devices={count}: this process has only {len(devices)} CPU devices; run "
                    "the planner in a fresh process (python -m mfer_jax.tools.plan)")
  return devices[:count]


def parse_mesh(text: str) -> tuple[int, ...]:
  """'(-1,1,1)' or '-1,1,1' -> (-1, 1, 1).

  Raises:
    PlanError: for anything else.
  """
  body = text.strip().strip("()[]")
  try:
    shape = tuple(int(v) for v in body.split(",") if v.strip())
  except ValueError:
    shape = ()
  if len(shape) != len(sharding.MESH_AXES) or any(s == 0 or s < -1 for s in shape):
    raise PlanError(f"--mesh={text}: expected {len(sharding.MESH_AXES)} sizes over "
                    f"{sharding.MESH_AXES} such as '(-1,1,1)' (data-parallel) or '(1,8,1)' "
                    "(FSDP over 8); -1 takes the remaining devices")
  return shape


def make_plan_mesh(shape: Sequence[int], devices: Sequence[jax.Device]) -> Mesh:
  """`sharding.make_mesh` with its errors as one-line `PlanError`s naming ``--mesh``."""
  try:
    return sharding.make_mesh(shape, sharding.MESH_AXES, devices)
  except ValueError as e:
    raise PlanError(f"--mesh={tuple(shape)} with --devices={len(devices)}: {e}") from e


def data_parallel_size(mesh: Mesh) -> int:
  """Devices that split the batch (the 'data' and 'fsdp' axes)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(global_batch: int, mesh: Mesh) -> int:
  """The per-device batch of ``global_batch`` on ``mesh``.

  Raises:
    PlanError: if the batch does not split evenly over the data axes.
  """
  n = data_parallel_size(mesh)
  if global_batch < 1 or global_batch % n:
    raise PlanError(f"--batch_size={global_batch} does not split over the {n} data-parallel "
                    f"devices of mesh {dict(mesh.shape)}; use a multiple of {n}")
  return global_batch // n


def planning_precision(model_cfg: ConfigDict) -> Precision:
  """The model's precision as an accelerator runs it (``auto`` -> ``xla``)."""
  return Precision.from_config(model_cfg.precision, backend="accelerator")


def abstract_batch(config: ConfigDict, global_batch: int, mesh: Mesh) -> dict:
  """ShapeDtypeStructs of one train batch, as the pipeline makes it, sharded like training.

  The log-mel window size comes from the default `FeatureParams` (the model resizes it to the
  audio encoder's input on device, so it hardly matters). With ``data.features_dir`` the
  batch holds the cached float32 encoder features instead, as the pipeline then makes it. With
  clips (``data.sequence.length`` T > 1) ``global_batch`` counts clips: every field gains a
  time axis of T and the batch a ``present`` mask, as in `mfer_jax.data.pipeline`.
  """
  features = FeatureParams()
  face = config.data.face_size
  shapes = {"face": ((face, face, 3), jnp.uint8),
            "mel": ((features.n_mels, features.window_frames), jnp.uint8),
            "has_face": ((), jnp.bool_), "label": ((), jnp.int32), "mask": ((), jnp.bool_)}
  if config.data.features_dir:
    shapes["face"] = ((encoders.width(model_lib.image_arch(config.model)),), jnp.float32)
    shapes["mel"] = ((encoders.width(model_lib.audio_arch(config.model)),), jnp.float32)
  length = int(config.data.sequence.length)
  time_axis = (length,) if length > 1 else ()
  if time_axis:
    shapes["present"] = ((), jnp.bool_)
  rules = config.mesh.rules
  return {k: jax.ShapeDtypeStruct(
      (global_batch, *time_axis, *shape), dtype,
      sharding=sharding.batch_sharding(mesh, rules, 1 + len(time_axis) + len(shape)))
          for k, (shape, dtype) in shapes.items()}


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs or arrays (exact)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      itemsize = 8  # a threefry key: two uint32
    else:
      itemsize = np.dtype(leaf.dtype).itemsize
    total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
  return total


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """Per-device memory and FLOPs of one compiled train step.

  Attributes:
    mesh_shape: {axis: size}.
    global_batch: examples per step.
    per_device_batch: examples per data-parallel device.
    remat: the remat policy compiled.
    precision: the resolved precision compiled.
    param_bytes, opt_bytes, batch_bytes: exact per-device bytes from the shardings.
    ema_bytes: the EMA copy of the params (``train.ema_decay`` > 0), sharded like them; 0
      without one.
    temp_bytes: XLA:CPU buffer assignment's temporaries per device.
    other_bytes: outputs that do not alias the donated state (metrics), per device.
    flops: FLOPs per step per device (XLA cost analysis).
    compile_seconds: wall time of lowering and compiling.
    replication: params that stay replicated under this mesh.
  """

  mesh_shape: dict[str, int]
  global_batch: int
  per_device_batch: int
  remat: str
  precision: Precision
  param_bytes: int
  opt_bytes: int
  batch_bytes: int
  temp_bytes: int
  other_bytes: int
  flops: float
  compile_seconds: float
  replication: sharding.ReplicationReport
  ema_bytes: int = 0

  @property
  def total_bytes(self) -> int:
    """Peak bytes per device: state, batch, temporaries and non-aliased outputs."""
    return (self.param_bytes + self.opt_bytes + self.ema_bytes + self.batch_bytes
            + self.temp_bytes + self.other_bytes)


def plan_step(config: ConfigDict, mesh: Mesh, global_batch: int, *, remat: str | None = None,
              precision: Precision | None = None) -> StepPlan:
  """Compiles (never runs) the train step of ``config`` on ``mesh`` and measures it.

  Args:
    config: a full config (model, train, mesh rules, data.face_size).
    mesh: the (CPU) device mesh to compile for.
    global_batch: examples per step.
    remat: overrides ``config.model.remat``.
    precision: overrides the config's precision (default `planning_precision`).

  Raises:
    PlanError: for a batch that does not split over the mesh's data axes.
  """
  per_device = check_batch(global_batch, mesh)
  config = config.copy_and_resolve_references()
  if remat is not None:
    config.model.remat = remat
  precision = precision or planning_precision(config.model)
  t0 = time.perf_counter()
  spec = state_lib.ModelSpec(config.model, precision=precision,
                             from_features=bool(config.data.features_dir))
  tx, schedule = optimizer.make_optimizer(config.train, 1000)
  # The step compiled is training's own, so it carries the EMA when the config keeps one.
  state_sh = state_lib.state_shardings(spec, tx, mesh, config.mesh.rules,
                                       ema=state_lib.uses_ema(config.train))
  state = state_lib.abstract_state(state_sh, spec, tx)
  batch = abstract_batch(config, global_batch, mesh)
  step = step_lib.make_train_step(spec, tx, schedule, config, mesh, state_sh,
                                  jax.tree.map(lambda x: x.sharding, batch),
                                  np.ones(config.model.num_classes, np.float32))
  compiled = step.lower(state, batch).compile(_PLAN_COMPILER_OPTIONS)
  seconds = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state_bytes = per_device_bytes(state)
  return StepPlan(
      mesh_shape=dict(mesh.shape), global_batch=global_batch, per_device_batch=per_device,
      remat=config.model.remat, precision=precision,
      param_bytes=per_device_bytes(state.params), opt_bytes=per_device_bytes(state.opt_state),
      batch_bytes=per_device_bytes(batch), temp_bytes=int(memory.temp_size_in_bytes),
      other_bytes=max(int(memory.output_size_in_bytes) - state_bytes, 0),
      flops=float(cost.get("flops", 0.0)), compile_seconds=seconds,
      replication=sharding.replication_report(spec.abstract_params, state_sh.params, mesh),
      ema_bytes=0 if state.ema_params is None else per_device_bytes(state.ema_params))


# ----------------------------------------------------------------------------- batch search


class BatchModel:
  """Per-device bytes and FLOPs as functions of the per-device batch, for one remat policy.

  Compiled plans are exact and cached. Between them, bytes and FLOPs are affine in the batch
  (fitted through the two smallest compiled batches), which is how activation memory and
  work grow; with ``exact=True`` every batch the search asks about is compiled instead.
  """

  def __init__(self, plan: Callable[[int], StepPlan], first: int, exact: bool = False):
    self._plan, self.exact = plan, exact
    self.plans: dict[int, StepPlan] = {}
    self.get(first)
    self.get(2 * first)

  def get(self, per_device: int) -> StepPlan:
    if per_device not in self.plans:
      self.plans[per_device] = self._plan(per_device)
    return self.plans[per_device]

  def _affine(self, attr: str, per_device: int) -> float:
    (b0, p0), (b1, p1) = sorted(self.plans.items())[:2]
    v0, v1 = getattr(p0, attr), getattr(p1, attr)
    return v0 + (v1 - v0) * (per_device - b0) / (b1 - b0)

  def total_bytes(self, per_device: int) -> float:
    if per_device in self.plans or self.exact:
      return self.get(per_device).total_bytes
    return self._affine("total_bytes", per_device)

  def flops(self, per_device: int) -> float:
    if per_device in self.plans:
      return self.plans[per_device].flops
    return self._affine("flops", per_device)


def largest_batch(total_bytes: Callable[[int], float], budget: float,
                  limit: int = 1 << 16) -> int:
  """The largest per-device batch whose bytes fit ``budget`` (0 if not even 1), by doubling
  then bisection; ``total_bytes`` must grow with the batch."""
  if total_bytes(1) > budget:
    return 0
  lo, hi = 1, 2
  while hi <= limit and total_bytes(hi) <= budget:
    lo, hi = hi, hi * 2
  if hi > limit:
    return lo
  while hi - lo > 1:  # invariant: lo fits, hi does not
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if total_bytes(mid) <= budget else (lo, mid)
  return lo


@dataclasses.dataclass(frozen=True)
class Fit:
  """One row of the accelerator table.

  Attributes:
    accelerator: the table entry.
    fits: whether the planned step (its batch and remat) fits.
    largest: {remat policy: largest per-device batch that fits (0: not even 1)}.
    step_seconds: the planned step's time at `MFU_TARGET` MFU: model FLOPs (those of the
      step without remat; recomputation is not useful work) over 40% of the bf16 peak.
  """

  accelerator: accelerators.Accelerator
  fits: bool
  largest: dict[str, int]
  step_seconds: float


def fit_table(planned: StepPlan, models: dict[str, BatchModel],
              accels: Sequence[accelerators.Accelerator], headroom: float = 0.9) -> list[Fit]:
  """Fit, largest batches and step time for each accelerator.

  Args:
    planned: the plan of the step as configured.
    models: {remat policy: its BatchModel}; must include "none" (for the model FLOPs).
    accels: accelerators to tabulate.
    headroom: usable fraction of device memory (runtime, fragmentation, and the gap between
      XLA:CPU's estimate and the accelerator compiler's).
  """
  model_flops = models["none"].flops(planned.per_device_batch)
  rows = []
  for acc in accels:
    budget = headroom * acc.memory_bytes
    rows.append(Fit(
        accelerator=acc, fits=planned.total_bytes <= budget,
        largest={r: largest_batch(m.total_bytes, budget) for r, m in models.items()},
        step_seconds=model_flops / (MFU_TARGET * acc.peak_bf16_flops)))
  return rows


def check_remat(policy: str) -> str:
  if policy not in REMAT_POLICIES:
    raise PlanError(f"--remat={policy}: choose one of {', '.join(REMAT_POLICIES)}")
  return policy

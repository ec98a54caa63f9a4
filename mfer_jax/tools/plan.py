r"""Memory and FLOPs of a config's train step per device, and which accelerators it fits.

  python -m mfer_jax.tools.plan --config=configs/abaw.py --devices=8 --mesh='(-1,1,1)'
  python -m mfer_jax.tools.plan --config=configs/abaw.py:dtype=bfloat16 --devices=8 \
      --mesh='(1,8,1)' --batch_size=128 --remat=block --accelerators=v5e,h100

The tool makes N CPU devices itself (no XLA flags needed) and compiles the real train step
for them ahead of time, without running it. It prints, per device: params, optimizer state
and batch bytes (exact, from the shardings), temporaries from XLA's buffer assignment (an
XLA:CPU estimate: GPU and TPU compilers fuse differently), and FLOPs per step from XLA's cost
analysis. Then, for each accelerator of mfer_jax/accelerators.py: whether the step fits, the
largest per-device batch that fits without and with remat, and the step time at 40% MFU.

Largest batches come from a bisection over the per-device batch. Memory and FLOPs are
compiled at the planned batch and at twice it, and are affine in the batch in between and
beyond; --exact compiles every batch the bisection tries instead (slower, exact). Precision
``auto`` is planned as ``xla``, the path an accelerator runs. docs/scaling.md explains the
figures and their limits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

from absl import flags
from ml_collections import config_flags

from mfer_jax import accelerators, cli, console, errors, planning

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config to plan, e.g. configs/abaw.py.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Devices to plan for (CPU devices are made).")
_MESH = flags.DEFINE_string("mesh", "", "Mesh sizes over (data, fsdp, model), e.g. '(-1,1,1)' "
                            "or '(1,8,1)'; default the config's mesh.shape.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch; 0 = the config's data.batch_size.")
_REMAT = flags.DEFINE_string("remat", "", "Remat policy of the planned step (none, block, "
                             "dots_saveable); default the config's model.remat.")
_ACCELERATORS = flags.DEFINE_list("accelerators", [a.name for a in accelerators.ACCELERATORS],
                                  "Accelerators to tabulate.")
_REMAT_TABLE = flags.DEFINE_list("remat_table", [], "Remat policies of the largest-batch "
                                 "columns; default none and block (or the planned policy).")
_EXACT = flags.DEFINE_boolean("exact", False, "Compile every batch the bisection tries.")
_HEADROOM = flags.DEFINE_float("headroom", 0.9, "Usable fraction of device memory.")
_JSON = flags.DEFINE_string("json", "", "Also write the plan as JSON to this file.")

MiB, GiB = 2**20, 2**30


def _size(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def _flops(n: float) -> str:
  return f"{n / 1e12:.3f} TFLOP" if n >= 1e11 else f"{n / 1e9:.3f} GFLOP"


def _accelerators() -> list[accelerators.Accelerator]:
  unknown = [n for n in _ACCELERATORS.value if n not in accelerators.BY_NAME]
  if unknown:
    raise errors.UsageError(f"--accelerators: unknown {', '.join(unknown)}; choose from "
                            f"{', '.join(accelerators.BY_NAME)}")
  return [accelerators.BY_NAME[n] for n in _ACCELERATORS.value]


def report(plan: planning.StepPlan, rows: list[planning.Fit], models, config_name: str,
           devices: int, headroom: float, exact: bool) -> str:
  """The plan as text: per-device figures, then the accelerator table (markdown)."""
  p = plan
  mesh = " ".join(f"{k}={v}" for k, v in p.mesh_shape.items())
  prec = p.precision
  compiled = sorted(next(iter(models.values())).plans)
  lines = [
      f"Train step of {config_name} on {devices} devices, mesh {mesh}",
      f"global batch {p.global_batch} ({p.per_device_batch} per device), precision: compute "
      f"{prec.compute_dtype}, params {prec.param_dtype}, matmul {prec.matmul}; remat {p.remat}",
      "",
      "per device",
      f"  params           {_size(p.param_bytes):>11}  exact, from the shardings",
      f"  optimizer state  {_size(p.opt_bytes):>11}  exact",
      *([f"  EMA of params    {_size(p.ema_bytes):>11}  exact (train.ema_decay)"]
        if p.ema_bytes else []),
      f"  batch            {_size(p.batch_bytes):>11}  exact",
      f"  temporaries      {_size(p.temp_bytes):>11}  XLA:CPU buffer assignment (an estimate "
      "for GPU/TPU)",
      f"  total            {_size(p.total_bytes):>11}",
      f"FLOPs per step: {_flops(p.flops)} per device, {_flops(p.flops * devices)} in all "
      f"(XLA cost analysis{', incl. remat recomputation' if p.remat != 'none' else ''})",
  ]
  if p.mesh_shape.get("fsdp", 1) > 1 or p.mesh_shape.get("model", 1) > 1:
    lines.append(f"sharding: {p.replication.summary(top=3)}")
  policies = list(models)
  lines += [
      "",
      f"| accelerator | memory | fits at {p.per_device_batch}/device | largest batch/device, "
      + " | ".join(f"remat {r}" for r in policies) + " | step at 40% MFU |",
      "|---|---|---|" + "---|" * len(policies) + "---|",
  ]
  for row in rows:
    acc = row.accelerator
    lines.append(f"| {acc.label} | {acc.memory_bytes / GiB:.0f} GiB | "
                 f"{'yes' if row.fits else 'no'} | "
                 + " | ".join(str(row.largest[r]) for r in policies)
                 + f" | {row.step_seconds * 1000:.0f} ms |")
  how = ("every tried batch compiled" if exact else
         f"compiled at {compiled[0]} and {compiled[1]} per device, affine in between and beyond")
  lines += ["", f"fits: total <= {headroom:.0%} of device memory. Largest batch: bisection, "
            f"{how}. Step time: model FLOPs (no remat) at 40% of the bf16 peak."]
  return "\n".join(lines)


def _plan_json(plan: planning.StepPlan, rows: list[planning.Fit], models) -> dict:
  return {
      "mesh": plan.mesh_shape, "global_batch": plan.global_batch,
      "per_device_batch": plan.per_device_batch, "remat": plan.remat,
      "precision": dataclasses.asdict(plan.precision),
      "per_device_bytes": {"params": plan.param_bytes, "optimizer": plan.opt_bytes,
                           "ema_params": plan.ema_bytes,
                           "batch": plan.batch_bytes, "temporaries_xla_cpu": plan.temp_bytes,
                           "other_outputs": plan.other_bytes, "total": plan.total_bytes},
      "flops_per_device": plan.flops,
      "model_flops_per_device": models["none"].flops(plan.per_device_batch),
      "replicated_param_fraction": plan.replication.fraction,
      "accelerators": {r.accelerator.name: {"fits": r.fits, "largest_per_device_batch": r.largest,
                                            "step_seconds_at_40pct_mfu": r.step_seconds}
                       for r in rows},
      "compiled": {remat: {b: {"total_bytes": p.total_bytes, "flops": p.flops,
                               "compile_seconds": p.compile_seconds}
                           for b, p in m.plans.items()} for remat, m in models.items()},
  }


def main() -> None:
  if _CONFIG.value is None:
    raise errors.UsageError("--config is required, e.g. --config=configs/abaw.py")
  if not 0 < _HEADROOM.value <= 1:
    raise errors.UsageError(f"--headroom={_HEADROOM.value}: give a fraction in (0, 1]")
  config = _CONFIG.value
  accels = _accelerators()
  devices = planning.use_cpu_devices(_DEVICES.value)
  shape = planning.parse_mesh(_MESH.value) if _MESH.value else tuple(config.mesh.shape)
  mesh = planning.make_plan_mesh(shape, devices)
  global_batch = _BATCH.value or config.data.batch_size
  per_device = planning.check_batch(global_batch, mesh)
  planned_remat = planning.check_remat(_REMAT.value or config.model.remat)
  policies = [planning.check_remat(r) for r in _REMAT_TABLE.value] or [
      "none", "block" if planned_remat == "none" else planned_remat]
  # The planned step's policy is compiled anyway, and "none" gives the model FLOPs.
  policies = list(dict.fromkeys(["none", *policies, planned_remat]))
  dp = planning.data_parallel_size(mesh)

  def compile_at(remat):
    def plan(b):
      console.say(f"compiling the train step for {b} per device (global {b * dp}), "
                  f"remat {remat} ...")
      p = planning.plan_step(config, mesh, b * dp, remat=remat)
      console.say(f"  {p.compile_seconds:.0f} s: {_size(p.total_bytes)} per device")
      return p
    return plan

  models = {r: planning.BatchModel(compile_at(r), per_device, exact=_EXACT.value)
            for r in policies}
  planned = models[planned_remat].get(per_device)
  rows = planning.fit_table(planned, models, accels, headroom=_HEADROOM.value)
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  print(report(planned, rows, models, name, len(devices), _HEADROOM.value, _EXACT.value))
  if _JSON.value:
    out = os.path.abspath(_JSON.value)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(out), delete=False,
                                     suffix=".tmp") as f:
      json.dump(_plan_json(planned, rows, models), f, indent=1)
    os.replace(f.name, out)


if __name__ == "__main__":
  cli.run(main)

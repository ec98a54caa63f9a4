"""Where a training step's time goes: FLOPs, MFU, waiting for input, and profiler traces.

What every logged row of ``metrics.jsonl`` (and TensorBoard) gets from here:

  step_time_s              wall time per step over the logging window
  data_wait_s              of which the loop waited for the next batch (reading, decoding,
                           host-to-device); with JAX's asynchronous dispatch the device may
                           still be busy with the previous step then, so this bounds the
                           input stall from above
  compute_s                the rest: dispatching the step and waiting for its results
  data_wait_fraction       data_wait_s / step_time_s; above `INPUT_BOUND_FRACTION` the run
                           is input-bound and the progress bar says so once
  tflops_per_device        model TFLOP per step per device, from XLA's cost analysis of the
                           compiled step (with remat, of the same step without it, so that
                           recomputation does not count as useful work)
  tflops_per_s_per_device  achieved model TFLOP/s per device
  mfu                      model FLOPs utilisation against the device's peak dense bf16
                           FLOP/s (`mfer_jax.accelerators`); only when the device kind is
                           in that table (not on CPU)
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import jax

from mfer_jax import accelerators, errors

INPUT_BOUND_FRACTION = 0.1


def cost_flops(stage: Any) -> float:
  """FLOPs from XLA's cost analysis of a ``Lowered`` or ``Compiled`` stage (0 if absent).

  A compiled SPMD program reports per-device FLOPs; a lowered (unpartitioned) one reports the
  whole step's.
  """
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


# Logged metrics that measure wall time: they differ between two runs of the same config
# (everything else in a metrics.jsonl row is bitwise reproducible on one machine).
WALL_CLOCK_METRICS = ("step_time_s", "data_wait_s", "compute_s", "data_wait_fraction",
                      "tflops_per_s_per_device", "mfu", "examples_per_second")


class StepTimer:
  """Accumulates data wait and step count over a logging window and turns them into rows.

  Args:
    flops_per_device: model FLOPs of one step on one device (0: unknown).
    device_kind: ``jax.Device.device_kind`` of the run's devices.
  """

  def __init__(self, flops_per_device: float, device_kind: str):
    self.flops = flops_per_device
    self.accelerator = accelerators.for_device_kind(device_kind)
    self.reset()

  def reset(self) -> None:
    """Starts a new window now (after evaluation or compilation, which are not steps)."""
    self.t0 = time.monotonic()
    self.wait = 0.0
    self.steps = 0

  def add_wait(self, seconds: float) -> None:
    self.wait += seconds

  def add_step(self) -> None:
    self.steps += 1

  def row(self) -> dict[str, float]:
    """Metrics of the window so far (see the module docstring); then `reset`."""
    elapsed = max(time.monotonic() - self.t0, 1e-9)
    steps = max(self.steps, 1)
    step_time = elapsed / steps
    out = {"step_time_s": step_time, "data_wait_s": self.wait / steps,
           "compute_s": max(elapsed - self.wait, 0.0) / steps,
           "data_wait_fraction": self.wait / elapsed}
    if self.flops:
      out["tflops_per_device"] = self.flops / 1e12
      out["tflops_per_s_per_device"] = self.flops / step_time / 1e12
      if self.accelerator is not None:
        out["mfu"] = self.flops / step_time / self.accelerator.peak_bf16_flops
    self.reset()
    return out


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """``train.profile_steps``: "A:B" -> (A, B); "" -> None.

  Raises:
    errors.UsageError: unless 0 <= A < B.
  """
  if not spec:
    return None
  try:
    a, b = (int(v) for v in spec.split(":"))
  except ValueError:
    a = b = -1
  if not 0 <= a < b:
    raise errors.UsageError(f"train.profile_steps={spec!r}: expected 'A:B' with 0 <= A < B, "
                            "e.g. '10:15' traces the five steps from step 10")
  return a, b


class ProfileWindow:
  """A ``jax.profiler`` trace of steps A..B-1 (``train.profile_steps="A:B"``).

  Steps are counted like the state's step (0-based, before the update). The trace goes to
  ``<workdir>/profile`` (TensorBoard's profile plugin and Perfetto read it). A resumed run
  traces only the part of the window it has not passed yet.
  """

  def __init__(self, spec: str, workdir: str | pathlib.Path):
    self.window = parse_profile_steps(spec)
    self.directory = pathlib.Path(workdir) / "profile"
    self.active = False

  def before_step(self, step: int) -> None:
    if self.window and not self.active and self.window[0] <= step < self.window[1]:
      jax.profiler.start_trace(str(self.directory))
      self.active = True

  def after_step(self, step: int, outputs: Any) -> None:
    """Stops after step B-1, once its outputs exist (so the trace holds the whole step)."""
    if self.active and step + 1 >= self.window[1]:
      self.stop(outputs)

  def stop(self, outputs: Any = None) -> None:
    if self.active:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False

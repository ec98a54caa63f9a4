"""Accelerators we plan for: memory per device and peak dense bf16 FLOP/s, from vendor sheets.

Used by the planner (`mfer_jax.planning`: does a step fit, how long at 40% MFU), the training
loop (MFU when the run's device kind is known) and ``bench/accelerator.py``. A "device" is
what JAX calls one: a GPU, or a TPU chip (v4 and v5p chips run as one megacore device).

Peak figures are dense (no 2:4 sparsity) bf16 matrix throughput. MFU is always relative to
the bf16 peak, also for float32 runs, so figures compare across precisions (PaLM's
convention).
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One accelerator model.

  Attributes:
    name: short name used on the command line (``--accelerators=v5e,h100``).
    label: readable name for tables.
    memory_bytes: memory of one JAX device.
    peak_bf16_flops: peak dense bf16 FLOP/s of one JAX device.
    kinds: lower-case substrings of ``jax.Device.device_kind`` that identify it.
  """

  name: str
  label: str
  memory_bytes: int
  peak_bf16_flops: float
  kinds: tuple[str, ...]


ACCELERATORS: tuple[Accelerator, ...] = (
    # NVIDIA H100 SXM5 datasheet: 80 GB HBM3; BF16 Tensor Core 1,979 TFLOPS with sparsity,
    # i.e. 989 dense. (The PCIe card: 756 dense; planned as the SXM part.)
    Accelerator("h100", "H100 80GB", 80 * GiB, 989e12, ("h100",)),
    # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity); 40 or
    # 80 GB HBM2e.
    Accelerator("a100-80", "A100 80GB", 80 * GiB, 312e12, ("a100-sxm4-80gb", "a100 80gb")),
    Accelerator("a100-40", "A100 40GB", 40 * GiB, 312e12, ("a100",)),
    # Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/<version>):
    # v4: 275 TFLOPS bf16 and 32 GiB HBM2 per chip.
    Accelerator("v4", "TPU v4", 32 * GiB, 275e12, ("tpu v4",)),
    # v5e: 197 TFLOPS bf16 and 16 GiB HBM2 per chip.
    Accelerator("v5e", "TPU v5e", 16 * GiB, 197e12, ("tpu v5 lite", "tpu v5e")),
    # v5p: 459 TFLOPS bf16 and 95 GiB HBM2e per chip.
    Accelerator("v5p", "TPU v5p", 95 * GiB, 459e12, ("tpu v5p", "tpu v5")),
    # v6e (Trillium): 918 TFLOPS bf16 and 32 GiB HBM per chip.
    Accelerator("v6e", "TPU v6e", 32 * GiB, 918e12, ("tpu v6 lite", "tpu v6e")),
)

BY_NAME = {a.name: a for a in ACCELERATORS}


def for_device_kind(kind: str) -> Accelerator | None:
  """The table entry for a ``jax.Device.device_kind`` string, or None (CPU, unknown GPUs).

  Entries are tried in table order, so the more specific patterns (A100 80GB before any
  A100, v5 lite before v5) win.
  """
  kind = kind.lower()
  for acc in ACCELERATORS:
    if any(k in kind for k in acc.kinds):
      return acc
  return None

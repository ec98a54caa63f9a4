"""The run layout of an ablation sweep: variants, their directories and completion markers.

A sweep directory holds one run per variant, ``<fusion>-<sampling>-seed<k>/`` for the frame
model and ``<fusion>-<sampling>-<temporal head>-seed<k>/`` with a temporal head (a normal
main.py workdir; the frame model keeps the name it had before the temporal axis existed, so
older sweeps resume). A run is finished when its completion marker (`MARKER`, written atomically
after the run's final evaluation) exists; it records the sweep spec the run was made with.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

from mfer_jax import constants, errors

MARKER = "ablate_done.json"
SWEEP_KEYS = ("fusion", "sampling", "temporal", "seed")
FUSION_ORDER = constants.FUSION_VARIANTS      # table order
SINGLE = constants.SINGLE_MODALITY_FUSIONS
FUSED = tuple(f for f in FUSION_ORDER if f not in SINGLE)
SAMPLING_ORDER = constants.SAMPLING_MODES
TEMPORAL_ORDER = constants.TEMPORAL_HEADS
DEFAULT_SWEEP = ("visual_only", "audio_only", "concat", "gated", "mfm",
                 "mfm_sigmoid_concat")
RUN_NAME = re.compile(
    r"^(?P<fusion>[a-z_]+)-(?P<sampling>[a-z]+)(?:-(?P<temporal>[a-z]+))?-seed(?P<seed>\d+)$")


class AblationError(errors.UserError, ValueError):
  """A sweep that cannot run as asked; the message says what to change."""


class AblationUsageError(AblationError, errors.UsageError):
  """A bad --config, --override or variant name (exit code 2, like any usage error)."""


@dataclasses.dataclass(frozen=True)
class Variant:
  fusion: str
  sampling: str
  seed: int
  temporal: str = "none"

  @property
  def name(self) -> str:
    head = "" if self.temporal == "none" else f"-{self.temporal}"
    return f"{self.fusion}-{self.sampling}{head}-seed{self.seed}"

  @property
  def arg(self) -> str:
    return (f"fusion={self.fusion},sampling={self.sampling},temporal={self.temporal},"
            f"seed={self.seed}")


@dataclasses.dataclass
class RunStatus:
  """What happened to one run: finished (already), ran, failed, pending or partial (dry run)."""

  variant: Variant
  workdir: pathlib.Path
  status: str
  detail: str = ""


def read_json(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None

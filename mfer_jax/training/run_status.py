"""How a run ended, as marker files in its workdir that scripts and `ablate` read.

``FINISHED.json``
  The training loop reached its last step, evaluated it and committed its checkpoint:
  ``{"step", "macro_f1", "accuracy", "eval": "eval/<step>.json", "time"}``. Exit code 0.
``PREEMPTED.json``
  SIGTERM or SIGINT stopped the loop after it saved a checkpoint: ``{"step", "signal",
  "time"}``. Exit code 143 (`mfer_jax.errors.EXIT_PREEMPTED`); rerun the same command.
neither
  Still running, failed (exit 1: the error line says why), or killed without warning
  (SIGKILL, a crash of the machine): rerun the same command to resume from the newest
  checkpoint.

A training run that starts removes both markers first. Only process 0 writes, atomically,
so a marker that exists is complete.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import jax

from mfer_jax import files

FINISHED = "FINISHED.json"
PREEMPTED = "PREEMPTED.json"


def _now() -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S")


def clear(workdir: str | os.PathLike) -> None:
  """Removes both markers (a run that starts or resumes is neither finished nor preempted)."""
  if jax.process_index() == 0:
    for name in (FINISHED, PREEMPTED):
      (pathlib.Path(workdir) / name).unlink(missing_ok=True)


def mark_finished(workdir: str | os.PathLike, step: int, result: dict[str, Any]) -> None:
  """Records that the run finished at ``step`` with final evaluation ``result``."""
  if jax.process_index() == 0:
    files.atomic_write_json(pathlib.Path(workdir) / FINISHED, {
        "step": int(step), "macro_f1": result["macro_f1"], "accuracy": result["accuracy"],
        "eval": f"eval/{int(step)}.json", "time": _now()})


def mark_preempted(workdir: str | os.PathLike, step: int, signal_name: str) -> None:
  """Records that ``signal_name`` stopped the run after its checkpoint of ``step``."""
  if jax.process_index() == 0:
    files.atomic_write_json(pathlib.Path(workdir) / PREEMPTED, {
        "step": int(step), "signal": signal_name, "time": _now()})


def _read(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def finished(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The FINISHED marker's contents, or None if the run has not finished."""
  return _read(pathlib.Path(workdir) / FINISHED)


def preempted(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The PREEMPTED marker's contents, or None."""
  return _read(pathlib.Path(workdir) / PREEMPTED)

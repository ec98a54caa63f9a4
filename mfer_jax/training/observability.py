"""What a run tells its user: metrics.jsonl, TensorBoard events and a console progress bar.

Only process 0 writes (the usual multi-host convention); other processes get no-op writers.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Mapping

import jax


class MetricsWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors to TensorBoard.

  Floats are written with ``repr`` precision (json's default), so a resumed run can be
  compared bit for bit with an uninterrupted one. On resume, lines for steps after the
  restored checkpoint are dropped first, so the file never holds a step twice.
  """

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0,
               enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def _truncate_after(self, step: int) -> None:
    if not self.path.exists():
      return
    kept = []
    for line in self.path.read_text().splitlines():
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError):
        continue  # a line cut by a kill mid-write
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(l + "\n" for l in kept))
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(f"{prefix}/{k}", v, step)

  def scalars(self, step: int, values: Mapping[str, float], prefix: str) -> None:
    """TensorBoard only (eval numbers live in eval/<step>.json)."""
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f"{prefix}/{k}", float(v), step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _py(v):
  try:
    return v.item()
  except AttributeError:
    return v


class ProgressBar:
  """A one-line progress bar with rate and ETA; plain lines when stderr is not a terminal."""

  def __init__(self, total: int, start: int = 0, enabled: bool | None = None):
    self.total, self.start = total, start
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.t0 = time.monotonic()
    self.tty = sys.stderr.isatty()
    self._warned: set[str] = set()

  def warn_once(self, key: str, message: str) -> None:
    """Prints ``warning: <message>`` on its own line, the first time ``key`` is seen."""
    if not self.enabled or key in self._warned:
      return
    self._warned.add(key)
    sys.stderr.write(("\n" if self.tty else "") + f"warning: {message}\n")
    sys.stderr.flush()

  def update(self, step: int, text: str = "") -> None:
    if not self.enabled:
      return
    done = step - self.start
    elapsed = time.monotonic() - self.t0
    rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = (self.total - step) / rate if rate else float("nan")
    frac = step / max(self.total, 1)
    bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
    msg = (f"[{bar}] {step}/{self.total} {rate:.2f} steps/s ETA {_hms(eta)} {text}")
    if self.tty:
      sys.stderr.write("\r" + msg[:200].ljust(120))
    else:
      sys.stderr.write(msg + "\n")
    sys.stderr.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      sys.stderr.write("\n")


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "--:--"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"

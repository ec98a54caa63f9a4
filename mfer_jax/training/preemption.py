"""SIGTERM and SIGINT as a request to stop cleanly, which the loop and the evaluator poll.

Schedulers send SIGTERM before killing a job (preemption; typically 30 s of grace), and Ctrl-C
sends SIGINT. Either sets a flag: the training loop checks it after every step and the
evaluator after every batch, so the run saves the checkpoint of its last finished step and
stops within one step or one eval batch, then exits 143 with a PREEMPTED marker
(`mfer_jax.training.run_status`). A second Ctrl-C raises KeyboardInterrupt at once, for a user
who would rather not wait for the save.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
  """Context manager: while active, SIGTERM/SIGINT set `requested` instead of killing.

  Outside the main thread (where Python cannot install signal handlers) it is inert: the
  flag stays False and signals keep their usual effect.

  Attributes:
    requested: a stop was asked for.
    signal_name: 'SIGTERM' or 'SIGINT' (the first one received), or None.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name: str | None = None
    self._old: dict[int, Any] = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt   # a second Ctrl-C: stop now, without saving
    self.requested = True
    self.signal_name = self.signal_name or signal.Signals(signum).name

  def __call__(self) -> bool:
    """True once a stop was requested (pass the object itself as a ``should_stop``)."""
    return self.requested

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old.clear()

"""Readable messages for the person running a job, from process 0 only.

absl logging stays at WARNING by default because Orbax and Grain log every file operation at
INFO; our own progress goes through `say`. ``--verbosity=0`` brings absl's INFO lines back.
"""

import sys
import time

import jax


def say(msg: str) -> None:
  """Prints a timestamped line to stderr on process 0."""
  if jax.process_index() == 0:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()

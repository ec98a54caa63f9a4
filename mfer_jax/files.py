"""Writing files so that an interrupted writer never leaves one that looks complete.

Every output of mfer-jax (records, indexes, metadata, configs, evals, predictions, reports,
converted weights) is written to a temporary name in the destination folder and renamed over
the final name when complete: a rename within one filesystem is atomic, so readers see the
old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any


def temporary_name(path: str | os.PathLike) -> pathlib.Path:
  """``dir/.name.<pid>.tmp``: hidden, per process, and in the destination's folder."""
  path = pathlib.Path(path)
  return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a temporary file and an atomic rename.

  The folder is created if missing.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temporary_name(path)
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> None:
  """Writes ``obj`` as indented JSON, atomically (``sort_keys=False`` keeps dict order)."""
  atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=sort_keys) + "\n")
                     .encode("utf-8"))

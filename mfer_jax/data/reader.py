"""Random access to one split's records, with errors that name the shard to rebuild.

`SplitReader` wraps Grain's ``ArrayRecordDataSource`` over a split's shards (record order =
shards concatenated, as `store.load_split` promises) and `records.decode_record`. Any failure
to read or decode a record is re-raised as `ShardReadError` naming the shard file, the record
inside it, and the fix (rebuilding with ``python -m data_prep.build``); without this, a bad
shard surfaces as a bare RuntimeError from the Riegeli reader deep inside a worker process.
"""

from __future__ import annotations

import bisect
from typing import Any

from array_record.python import array_record_module
import grain
import numpy as np

from mfer_jax import errors
from mfer_jax.data import records
from mfer_jax.data import store

_REBUILD = "rebuild the dataset with `python -m data_prep.build`"


class ShardReadError(errors.UserError, RuntimeError):
  """A shard that cannot be read or does not match the split index; names the file."""


class SplitReader:
  """Reads and decodes record ``i`` of a split; picklable into Grain worker processes.

  Construction opens every shard once to check that its record count matches the split
  index, so a truncated shard fails before training starts, naming the file.
  """

  def __init__(self, index: store.SplitIndex, face_size: int = 112):
    self.split = index.split
    self.face_size = int(face_size)
    self._paths = tuple(index.paths)
    counts = np.bincount(index.video_id, minlength=len(self._paths))
    if counts.shape[0] != len(self._paths) or counts.sum() != len(index):
      raise ShardReadError(f"split {index.split!r}: the index's video ids do not match its "
                           f"{len(self._paths)} shards; {_REBUILD}")
    for path, n in zip(self._paths, counts):
      _check_shard(path, int(n))
    # Record counts are known, so the data source need not reopen every shard (here and in
    # each worker) to count records: "path[start:end]" is its read-instruction syntax.
    self._source = grain.sources.ArrayRecordDataSource(
        [f"{p}[0:{n}]" for p, n in zip(self._paths, counts)])
    self._starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    self._label = np.asarray(index.label)
    self._frame = np.asarray(index.frame)

  def __len__(self) -> int:
    return self._starts[-1]

  def locate(self, i: int) -> tuple[str, int]:
    """(shard path, record number inside it) of split record ``i``."""
    shard = bisect.bisect_right(self._starts, i) - 1
    return self._paths[shard], i - self._starts[shard]

  def __getitem__(self, i: int) -> dict[str, Any]:
    """`records.decode_record` of split record ``i``.

    Raises:
      ShardReadError: if the record cannot be read or decoded, or disagrees with the index.
    """
    i = int(i)
    try:
      example = records.decode_record(self._source[i], self.face_size)
    except Exception as e:  # pylint: disable=broad-exception-caught
      path, j = self.locate(i)
      raise ShardReadError(f"cannot read record {j} of shard {path} (split {self.split!r} "
                           f"record {i}): {type(e).__name__}: {e}. The shard is truncated or "
                           f"corrupt; {_REBUILD}") from e
    if example["frame"] != self._frame[i] or example["label"] != self._label[i]:
      path, j = self.locate(i)
      raise ShardReadError(
          f"record {j} of shard {path} is frame {example['frame']} label {example['label']}, "
          f"but the {self.split} index says frame {self._frame[i]} label {self._label[i]}: "
          f"shards and index come from different builds; {_REBUILD}")
    return example


def _check_shard(path: str, expected: int) -> None:
  """Opens a shard and checks its record count (a truncated file reads as 0 records)."""
  try:
    reader = array_record_module.ArrayRecordReader(path)
    try:
      found = reader.num_records()
    finally:
      reader.close()
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ShardReadError(f"cannot open shard {path}: {type(e).__name__}: {e}; {_REBUILD}") from e
  if found != expected:
    raise ShardReadError(f"shard {path} holds {found} records but the split index expects "
                         f"{expected}: the file is truncated or stale; {_REBUILD}")

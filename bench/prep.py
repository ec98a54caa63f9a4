r"""Data-preparation throughput: frames/s per core and bytes per record, default settings.

  python -m bench.prep                                   # synthetic set in a temp dir
  python -m bench.prep --raw=/tmp/synth --workers=2      # reuse (or create) a raw set

Generates the synthetic Aff-Wild2 set (data_prep.synth; not timed) unless --raw already holds
it, then times `data_prep.build.build` on it with the default feature parameters. Reported:

- frames/s per core, the figure to quote (target >= 300, 10x real time at 30 fps): decoded
  video frames / CPU seconds. "work" counts the CPU time spent inside per-video work (decode,
  resample, mel, crops, records, shard); "all" also counts process start-up and imports, from
  getrusage of this process and its worker processes.
- wall-clock frames/s, which depends on the (shared, noisy) machine.
- bytes per record: shard bytes / records (budget 16 KB), and the uncompressed record size
  split into face JPEG, mel and header (ArrayRecord's default zstd shrinks the mel).
"""

from __future__ import annotations

import os
import pathlib
import resource
import sys
import tempfile

from absl import flags
from array_record.python import array_record_module

from data_prep import build
from mfer_jax import cli
from mfer_jax.data import records
from mfer_jax.data import store

_RAW = flags.DEFINE_string("raw", None, "synthetic raw set (created if missing); default: temp")
_VIDEOS = flags.DEFINE_integer("num_videos", 16, "synthetic videos (when generating)")
_SEED = flags.DEFINE_integer("seed", 0, "synthetic set seed")
_WORKERS = flags.DEFINE_integer("workers", 1, "builder worker processes")


def _cpu_seconds() -> float:
  total = 0.0
  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
    usage = resource.getrusage(who)
    total += usage.ru_utime + usage.ru_stime
  return total


def _record_parts(out: pathlib.Path, split: str) -> tuple[int, int, int, int]:
  """(records, record bytes, face bytes, mel bytes) of a split, from the records themselves."""
  n = size = face = mel = 0
  for path in store.load_split(out, split).paths:
    reader = array_record_module.ArrayRecordReader(path)
    for raw in reader.read_all():
      _, f, m = records.parse_record(raw)
      n, size, face, mel = n + 1, size + len(raw), face + len(f), mel + m.size
    reader.close()
  return n, size, face, mel


def main() -> None:
  from data_prep import synth  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    raw = pathlib.Path(_RAW.value or os.path.join(tmp, "raw"))
    print(f"$ python -m bench.prep {' '.join(sys.argv[1:])}")
    made = synth.generate(raw, num_videos=_VIDEOS.value, seed=_SEED.value, workers=2)
    print(f"synthetic set {raw}: {len(made['videos'])} videos "
          f"({len(made['generated'])} generated now, not timed)")
    out = pathlib.Path(tmp) / "prepared"
    cpu0 = _cpu_seconds()
    summary = build.build(raw, out, workers=_WORKERS.value, log=None)
    cpu_all = _cpu_seconds() - cpu0
    n = size = face = mel = 0
    for split in summary.num_records:
      a, b, c, d = _record_parts(out, split)
      n, size, face, mel = n + a, size + b, face + c, mel + d
    frames = summary.decoded_frames
    print(f"build: {len(summary.built)} videos, {frames} decoded frames, {n} records, "
          f"workers={_WORKERS.value}, {summary.wall_seconds:.1f} s wall")
    print(f"frames/s per core: {summary.frames_per_cpu_second:.0f} (work), "
          f"{frames / cpu_all:.0f} (all, incl. start-up and imports; {cpu_all:.1f} CPU s)")
    print(f"frames/s wall: {frames / summary.wall_seconds:.0f}")
    print(f"bytes/record: {summary.bytes_per_record:.0f} on disk (ArrayRecord compresses); "
          f"{size / n:.0f} uncompressed = face JPEG {face / n:.0f} + mel {mel / n:.0f} + "
          f"header {(size - face - mel) / n:.0f}; budget 16384")


if __name__ == "__main__":
  cli.run(main)

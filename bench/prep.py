r"""Data-preparation throughput: frames/s per core and bytes per record, default settings.

  python -m bench.prep                                   # synthetic set in a temp dir
  python -m bench.prep --raw=/tmp/synth --workers=2      # reuse (or create) a raw set
  python -m bench.prep --raw=/tmp/synth --route=tfds     # the TFDS builder instead

Run the two routes as separate commands (each in its own process), alternated, to compare
them. ``--route=tfds`` reports the same figures for ``data_prep.tfds_affwild2`` (one process:
TFDS builders have no worker pool), and the time training's first load of each split takes
to read the index features of every example (`mfer_jax.data.tfds_source`), then the cached
load.

Generates the synthetic Aff-Wild2 set (data_prep.synth; not timed) unless --raw already holds
it, then times `data_prep.build.build` on it with the default feature parameters. Reported:

- frames/s per core, the figure to quote (target >= 300, 10x real time at 30 fps): decoded
  video frames / CPU seconds. "work" counts the CPU time spent inside per-video work (decode,
  resample, mel, crops, records, shard); "all" also counts process start-up and imports, from
  getrusage of this process and its worker processes.
- wall-clock frames/s, which depends on the (shared, noisy) machine.
- bytes per record: shard bytes / records (budget 16 KB), and the uncompressed record size
  split into face JPEG, mel and header (ArrayRecord's default zstd shrinks the mel).
- per 100k records (one record per annotated valid frame, or per test frame): disk size and
  build wall time, the figures the README quotes.
"""

from __future__ import annotations

import os
import pathlib
import resource
import sys
import tempfile
import time

from absl import flags
from array_record.python import array_record_module

from data_prep import build
from mfer_jax import cli
from mfer_jax.data import records
from mfer_jax.data import store

_RAW = flags.DEFINE_string("raw", None, "synthetic raw set (created if missing); default: temp")
_VIDEOS = flags.DEFINE_integer("num_videos", 16, "synthetic videos (when generating)")
_SEED = flags.DEFINE_integer("seed", 0, "synthetic set seed")
_WORKERS = flags.DEFINE_integer("workers", 1, "builder worker processes (prepared route)")
_ROUTE = flags.DEFINE_enum("route", "prepared", ["prepared", "tfds"],
                           "data_prep.build's prepared directory, or the TFDS builder")


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


def _disk_bytes(directory: pathlib.Path, skip: str = "") -> int:
  return sum(p.stat().st_size for p in directory.rglob("*")
             if p.is_file() and not (skip and p.name.startswith(skip)))


def _per_100k(num_records: int, disk: int, wall: float, cpu: float) -> None:
  """The README's figures: disk, wall time (this shared machine's load included) and CPU time
  (what the build costs a free core) per 100k records."""
  scale = 1e5 / num_records
  print(f"per 100k records: {disk * scale / 2**30:.2f} GiB on disk, {wall * scale / 60:.1f} min "
        f"build wall, {cpu * scale / 60:.1f} CPU-min")


def _tfds_route(raw: pathlib.Path, tmp: str) -> None:
  """Builds with the TFDS builder, then times training's first and cached index loads."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from data_prep import tfds_affwild2  # pylint: disable=g-import-not-at-top
  from mfer_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

  data_dir = pathlib.Path(tmp) / "tfds"
  cpu0, wall = _cpu_seconds(), time.perf_counter()
  builder = tfds_affwild2.AffWild2Expr(data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu0
  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  n = sum(splits.values())
  # Decoded frames per media file, once (a _left/_right pair shares its media), as build's.
  frames = sum({v["media"]: v["num_frames"]
                for v in builder.info.metadata["videos"].values()}.values())
  disk = _disk_bytes(pathlib.Path(builder.data_dir), skip="mfer_jax.")
  print(f"tfds build: {splits} = {n} records, {wall:.1f} s wall, {cpu:.1f} CPU s "
        f"({frames / cpu:.0f} frames/s per core, start-up excluded)")
  print(f"bytes/record: {disk / n:.0f} on disk (dataset folder, TFDS's files included)")
  _per_100k(n, disk, wall, cpu)
  for attempt in ("first load (reads every example)", "cached load"):
    start = time.perf_counter()
    for split in splits:
      tfds_source.load_split(tfds_affwild2.AffWild2Expr.name, str(data_dir), split)
    took = time.perf_counter() - start
    print(f"training's index, {attempt}: {took:.1f} s for {n} records "
          f"({took / n * 1e5:.0f} s per 100k)")
  # The same scan through TFDS's generic decoding of whole examples, for comparison.
  source = tfds.data_source(tfds_affwild2.AffWild2Expr.name, split="train",
                            data_dir=str(data_dir))
  for name, scan in (("tfds_source.scan_features", tfds_source.scan_features),
                     ("TFDS decoding", lambda src: [src[i]["frame"] for i in range(len(src))])):
    start = time.perf_counter()
    scan(source)
    took = time.perf_counter() - start
    print(f"index scan of train with {name}: {len(source) / took:.0f} examples/s")


def main() -> None:
  from data_prep import synth  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    raw = pathlib.Path(_RAW.value or os.path.join(tmp, "raw"))
    print(f"$ python -m bench.prep {' '.join(sys.argv[1:])}")
    made = synth.generate(raw, num_videos=_VIDEOS.value, seed=_SEED.value, workers=2)
    print(f"synthetic set {raw}: {len(made['videos'])} videos "
          f"({len(made['generated'])} generated now, not timed)")
    if _ROUTE.value == "tfds":
      _tfds_route(raw, tmp)
      return
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
    _per_100k(n, _disk_bytes(out), summary.wall_seconds, cpu_all)


if __name__ == "__main__":
  cli.run(main)

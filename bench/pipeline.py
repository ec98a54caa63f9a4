r"""Training input-pipeline throughput: examples/s and examples per CPU-second, no model.

  python -m bench.pipeline                       # fake dataset, in-process (num_workers=0)
  python -m bench.pipeline --num_workers=2       # Grain worker processes
  python -m bench.pipeline --data_dir=/data/affwild2_prepared
  python -m bench.pipeline --source=tfds --tfds_data_dir=~/tensorflow_datasets

Runs the real train pipeline (dynamic resampling, default augmentation, batching) and
reports wall-clock throughput and throughput per CPU-second (CPU time of this process and its
worker processes). The machine is shared and noisy, so the per-CPU-second figure is the one to
quote: it is what one worker core sustains. Without --data_dir a fake dataset is written to a
temporary directory (mfer_jax/testing/fake_data.py: 112x112 JPEG faces, 64x100 log-mel windows).
"""

from __future__ import annotations

import os
import resource
import tempfile
import time

from absl import flags

from mfer_jax import cli
from mfer_jax.data import config as data_config
from mfer_jax.data import pipeline
from mfer_jax.data import sources
from mfer_jax.testing import fake_data

_DATA_DIR = flags.DEFINE_string("data_dir", None, "prepared dataset; default: a fake one")
_SOURCE = flags.DEFINE_enum("source", "prepared", list(sources.SOURCES),
                            "config.data.source: the prepared directory or a TFDS dataset")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "--source=tfds: TFDS data dir")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Grain worker processes")
_READ_THREADS = flags.DEFINE_integer("read_threads", 1, "batch-building threads per process")
_BATCH = flags.DEFINE_integer("batch_size", 64, "global batch size")
_STEPS = flags.DEFINE_integer("steps", 60, "batches to time (after warm-up)")
_WARMUP = flags.DEFINE_integer("warmup", 5, "batches before timing starts")
_VIDEOS = flags.DEFINE_integer("num_videos", 20, "fake dataset: train videos")
_FRAMES = flags.DEFINE_integer("frames_per_video", 200, "fake dataset: frames per video")


def _cpu_seconds() -> float:
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _run(data_dir: str) -> None:
  cfg = data_config.default_data_config()
  cfg.data_dir = data_dir
  cfg.source, cfg.tfds_data_dir = _SOURCE.value, _TFDS_DATA_DIR.value
  cfg.batch_size = _BATCH.value
  cfg.num_workers = _NUM_WORKERS.value
  cfg.read_threads = _READ_THREADS.value
  it = pipeline.make_train_iterator(cfg, sources.load_split(cfg, "train"),
                                    process_index=0, process_count=1)
  cpu0 = _cpu_seconds()   # includes worker start-up: an honest per-core figure
  for _ in range(_WARMUP.value):
    next(it)
  wall = time.perf_counter()
  for _ in range(_STEPS.value):
    next(it)
  wall = time.perf_counter() - wall
  it.close()              # joins the workers, so their CPU time is counted
  cpu = _cpu_seconds() - cpu0
  timed = _STEPS.value * _BATCH.value
  total = (_STEPS.value + _WARMUP.value) * _BATCH.value
  print(f"source={cfg.source} num_workers={_NUM_WORKERS.value} "
        f"read_threads={_READ_THREADS.value} "
        f"batch={_BATCH.value} steps={_STEPS.value}")
  print(f"wall: {timed / wall:.0f} examples/s")
  print(f"cpu:  {total / cpu:.0f} examples per CPU-second "
        f"({cpu:.1f} CPU-s for {total} examples, start-up included)")


def main() -> None:
  if _DATA_DIR.value or _SOURCE.value == "tfds":
    _run(_DATA_DIR.value or "")
    return
  with tempfile.TemporaryDirectory() as tmp:
    fake_data.make_fake_dataset(os.path.join(tmp, "data"), splits={"train": _VIDEOS.value},
                                frames_per_video=_FRAMES.value)
    _run(os.path.join(tmp, "data"))


if __name__ == "__main__":
  cli.run(main)

r"""End-to-end train-step benchmark of the full audio-visual model: examples/s, compile time,
peak memory.

  python -m bench.train                               # demo-size model (configs/demo.py)
  python -m bench.train --config=configs/abaw.py      # the paper's Swin-T/224 pair
  python -m bench.train --config=configs/abaw.py:dtype=bfloat16 --batch_size=16

Times the real jitted, donated train step (forward, backward, AdamW, NaN guard) on one fixed
batch from the real pipeline on a fake dataset, so input reading is not part of the figure
(bench/pipeline.py measures that). Reports the compile time of the first call, the median
step time over rounds, examples/s, and the process's peak resident memory. The machine is
shared and noisy: quote medians, and compare configurations measured in the same run.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from mfer_jax import cli, sharding
from mfer_jax.data import pipeline, store
from mfer_jax.training import optimizer, state as state_lib, step as step_lib
from mfer_jax.testing import fake_data

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config to benchmark.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (0: the config's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds; the median step time is reported.")


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
  config = _CONFIG.value
  if _BATCH.value:
    config.data.batch_size = _BATCH.value
  data_dir = tempfile.mkdtemp(prefix="bench_train_")
  fake_data.make_fake_dataset(data_dir, splits={"train": 4}, frames_per_video=64,
                              mel_shape=(64, 100), face_size=config.data.face_size, seed=0)
  config.data.data_dir = data_dir
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  spec = state_lib.ModelSpec(config.model)
  tx, schedule = optimizer.make_optimizer(config.train, 1000)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  it = pipeline.make_train_iterator(config.data, store.load_split(data_dir, "train"))
  batch = pipeline.to_global_batch({k: v for k, v in next(it).items()
                                    if k in step_lib.BATCH_KEYS}, mesh)
  it.close()
  step = step_lib.make_train_step(spec, tx, schedule, config, mesh, state_sh,
                                  jax.tree.map(lambda x: x.sharding, batch),
                                  np.ones(config.model.num_classes, np.float32))
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(_ROUNDS.value):
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t0) / _STEPS.value)
  med = statistics.median(times)
  n = config.data.batch_size
  print(f"model: image {config.model.image.variant} {tuple(config.model.image.img_size)}, "
        f"audio {config.model.audio.variant} {tuple(config.model.audio.img_size)}, "
        f"fusion {config.model.fusion.name}, precision {spec.precision}; batch {n} on "
        f"{jax.device_count()} {jax.default_backend()} device(s)")
  print(f"first call (compile + 1 step): {compile_s:.1f} s")
  print(f"step: median {med * 1000:.0f} ms over {_ROUNDS.value} rounds of {_STEPS.value} "
        f"({', '.join(f'{t * 1000:.0f}' for t in times)}) -> {n / med:.1f} examples/s")
  print(f"peak resident memory: {_peak_rss_gb():.2f} GB")


if __name__ == "__main__":
  cli.run(main)

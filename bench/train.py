r"""End-to-end train-step benchmark of the full audio-visual model: examples/s, compile time,
peak memory.

  python -m bench.train                               # demo-size model (configs/demo.py)
  python -m bench.train --config=configs/abaw.py      # the paper's Swin-T/224 pair
  python -m bench.train --config=configs/abaw.py:dtype=bfloat16 --batch_size=16
  python -m bench.train --temporal=none,transformer,tcn --frames=32   # frame vs temporal model
  python -m bench.train --config=configs/abaw.py:temporal=transformer --batch_size=1  # T=16

Times the real jitted, donated train step (forward, backward, AdamW, NaN guard) on one fixed
batch from the real pipeline on a fake dataset, so input reading is not part of the figure
(bench/pipeline.py measures that). Reports the compile time of the first call, the median
step time over rounds, examples/s, and the process's peak resident memory. The machine is
shared and noisy: quote medians, and compare configurations measured in the same run.

``--temporal=none,transformer,...`` compares heads at the same number of frames per batch
(``--frames``): 'none' is the frame model (batches of ``frames`` frames), a head trains on
``frames // clip_length`` clips of ``--clip_length`` frames. Every configuration is compiled
first, then the rounds alternate between them, so load changes hit all of them alike; the
figure is frames/s and its ratio to the frame model.
"""

from __future__ import annotations

import copy
import resource
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from mfer_jax import cli, config_lib, sharding
from mfer_jax.data import pipeline, store
from mfer_jax.models import layers
from mfer_jax.training import optimizer, state as state_lib, step as step_lib
from mfer_jax.testing import fake_data

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config to benchmark.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (0: the config's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds; the median step time is reported.")
_TEMPORAL = flags.DEFINE_list("temporal", [], "Temporal heads to compare at --frames frames "
                              "per batch (none = the frame model); empty: time --config as is.")
_FRAMES = flags.DEFINE_integer("frames", 32, "Frames per batch for --temporal.")
_CLIP = flags.DEFINE_integer("clip_length", 16, "Frames per clip for --temporal heads.")


def _precision(config) -> str:
  p = layers.Precision.from_config(config.model.precision)
  return (f"precision {p.compute_dtype} (params {p.param_dtype}, matmul {p.matmul}), "
          f"remat {config.model.remat}")


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _build(config, data_dir):
  """(jitted step, state, batch) of ``config`` on the fake dataset."""
  config.data.data_dir = data_dir
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  spec = state_lib.ModelSpec(config.model)
  tx, schedule = optimizer.make_optimizer(config.train, 1000)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  it = pipeline.make_train_iterator(config.data, store.load_split(data_dir, "train"))
  batch = pipeline.to_global_batch(step_lib.model_inputs(next(it)), mesh)
  it.close()
  step = step_lib.make_train_step(spec, tx, schedule, config, mesh, state_sh,
                                  jax.tree.map(lambda x: x.sharding, batch),
                                  np.ones(config.model.num_classes, np.float32))
  return step, state, batch


def _first_call(step, state, batch):
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return state, time.perf_counter() - t0


def _round(step, state, batch):
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  return state, (time.perf_counter() - t0) / _STEPS.value


def _frames(batch) -> int:
  return int(np.prod(batch["label"].shape))


def _compare_temporal(base, data_dir):
  runs = []
  for head in _TEMPORAL.value:
    config = copy.deepcopy(base)
    config.model.temporal.name = head
    clip = 1 if head == "none" else _CLIP.value
    config.data.sequence.length = clip
    config.data.batch_size = _FRAMES.value // clip
    step, state, batch = _build(config, data_dir)
    state, compile_s = _first_call(step, state, batch)
    runs.append({"head": head, "clip": clip, "step": step, "state": state, "batch": batch,
                 "compile": compile_s, "times": []})
  for _ in range(_ROUNDS.value):      # alternate: every configuration sees the same load
    for r in runs:
      r["state"], t = _round(r["step"], r["state"], r["batch"])
      r["times"].append(t)
  print(f"model: image {base.model.image.variant} {tuple(base.model.image.img_size)}, audio "
        f"{base.model.audio.variant} {tuple(base.model.audio.img_size)}, fusion "
        f"{base.model.fusion.name}, {_precision(base)}; {_FRAMES.value} frames per batch "
        f"on {jax.device_count()} {jax.default_backend()} device(s)")
  frame_rate = None
  for r in runs:
    med = statistics.median(r["times"])
    rate = _frames(r["batch"]) / med
    frame_rate = rate if r["head"] == "none" else frame_rate
    ratio = f", {rate / frame_rate:.2f}x the frame model" if frame_rate and r["head"] != "none" \
        else ""
    print(f"{r['head']:<12} T={r['clip']:<3} batch {r['batch']['label'].shape}: compile "
          f"{r['compile']:.1f} s, median step {med * 1000:.0f} ms "
          f"({', '.join(f'{t * 1000:.0f}' for t in r['times'])}) -> {rate:.1f} frames/s{ratio}")
  print(f"peak resident memory: {_peak_rss_gb():.2f} GB")


def main() -> None:
  config = _CONFIG.value
  if _BATCH.value:
    config.data.batch_size = _BATCH.value
  data_dir = tempfile.mkdtemp(prefix="bench_train_")
  fake_data.make_fake_dataset(data_dir, splits={"train": 4}, frames_per_video=64,
                              mel_shape=(64, 100), face_size=config.data.face_size, seed=0)
  if _TEMPORAL.value:
    _compare_temporal(config, data_dir)
    return
  step, state, batch = _build(config, data_dir)
  state, compile_s = _first_call(step, state, batch)
  times = []
  for _ in range(_ROUNDS.value):
    state, t = _round(step, state, batch)
    times.append(t)
  med = statistics.median(times)
  n = _frames(batch)
  print(f"model: image {config.model.image.variant} {tuple(config.model.image.img_size)}, "
        f"audio {config.model.audio.variant} {tuple(config.model.audio.img_size)}, "
        f"fusion {config.model.fusion.name}, temporal {config.model.temporal.name} "
        f"(T={config.data.sequence.length}), {_precision(config)}; batch "
        f"{tuple(batch['label'].shape)} ({n} frames) on {jax.device_count()} "
        f"{jax.default_backend()} device(s)")
  print(f"first call (compile + 1 step): {compile_s:.1f} s")
  print(f"step: median {med * 1000:.0f} ms over {_ROUNDS.value} rounds of {_STEPS.value} "
        f"({', '.join(f'{t * 1000:.0f}' for t in times)}) -> {n / med:.1f} frames/s")
  print(f"peak resident memory: {_peak_rss_gb():.2f} GB")


if __name__ == "__main__":
  cli.run(main)

r"""Foundation-encoder speed: extraction with our ViT-B/16 and wav2vec 2.0 base against timm /
transformers PyTorch inference, and training the fusion (+ temporal) head on cached features.

  python -m bench.foundation                          # everything, 5 alternating rounds
  python -m bench.foundation --only=vit --rounds=3    # the ViT-B/16 comparison only
  python -m bench.foundation --only=head

Each framework and dtype runs in its own process (a persistent worker started once, so JAX
compiles once); the driver asks the workers for timings in turn, round after round, so load
from other users of the machine spreads over all of them; we report medians and ratios to the
PyTorch fp32 worker of the same model. Both frameworks start from the same random weights
(the reference's init, imported through our converter's code path).

  vit   ViT-B/16 (timm vit_base_patch16_224), 224 px, batch --batch, pooled features
        (our jitted forward vs timm forward_features + pooling under inference_mode; bf16:
        our bf16-in / f32-out matmuls vs torch CPU autocast)
  w2v   wav2vec 2.0 base (transformers Wav2Vec2Model), one extraction chunk: 14 s of 16 kHz
        audio (10 s + 2 s of context on both sides), batch 1
  head  the demo-sized fusion head (configs/demo.py's MFM, dim 64) on cached 768-d image and
        audio features: the jitted train step on batch --head_batch, and the same step fed by
        the real feature pipeline (memory-mapped cache, Grain iterator) end to end; the
        temporal_* workers add the --head_temporal head (configs/demo.py:temporal=<head>) on
        clips of --head_clip frames, --head_batch frames per step, through the same clip
        pipeline as pixels (read_clip over the cache)

``--threads`` pins every worker to that many cores and sets torch's thread count. Results:
docs/performance.md.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from mfer_jax import cli

_ONLY = flags.DEFINE_list("only", ["vit", "w2v", "head"], "benchmarks to run")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "alternating timing rounds")
_STEPS = flags.DEFINE_integer("steps", 2, "calls per worker per round")
_THREADS = flags.DEFINE_integer("threads", 2, "CPU cores per worker")
_BATCH = flags.DEFINE_integer("batch", 16, "ViT images per call")
_HEAD_BATCH = flags.DEFINE_integer("head_batch", 512, "frames per head training step")
_HEAD_CLIP = flags.DEFINE_integer("head_clip", 16, "clip length T of the temporal_* workers")
_HEAD_TEMPORAL = flags.DEFINE_enum("head_temporal", "transformer", ["transformer", "tcn"],
                                   "temporal head of the temporal_* workers")
_SKIP = flags.DEFINE_list("skip", [], "workers to leave out, as bench:worker (e.g. "
                         "w2v:torch_bf16, whose autocast convolutions are very slow here)")
_WORKER = flags.DEFINE_string("worker", "", "internal: run as this worker")
_WEIGHTS = flags.DEFINE_string("weights", "", "internal: reference weights file")

WORKERS = {
    "vit": ("jax_f32", "jax_bf16", "torch_f32", "torch_bf16"),
    "w2v": ("jax_f32", "jax_bf16", "torch_f32", "torch_bf16"),
    "head": ("step", "pipeline", "temporal_step", "temporal_pipeline"),
}
W2V_SECONDS = 14.0


# ----------------------------------------------------------------------------- workers


def _vit_worker(framework: str, bf16: bool, weights: str):
  import numpy as np  # pylint: disable=g-import-not-at-top
  batch = _BATCH.value
  x = np.random.default_rng(0).normal(size=(batch, 224, 224, 3)).astype(np.float32)
  if framework == "torch":
    from mfer_jax.testing.timm_reference import timm, torch  # pylint: disable=g-import-not-at-top
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    model.load_state_dict(load_file(weights))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    def run():
      with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.forward_head(model.forward_features(xt), pre_logits=True)
    return run
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mfer_jax.models import encoders, vit  # pylint: disable=g-import-not-at-top
  from mfer_jax.models.layers import Precision  # pylint: disable=g-import-not-at-top
  cfg = vit.vit_config("vit_b16")
  prec = Precision.resolve(compute_dtype="bfloat16" if bf16 else "float32")
  model = nnx.eval_shape(lambda: vit.VisionTransformer(cfg, rngs=nnx.Rngs(0), precision=prec))
  encoders.load_pretrained(model, weights, cfg)
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[1])
  xj = jnp.asarray(x)
  return lambda: fn(state, xj).block_until_ready()


def _w2v_worker(framework: str, bf16: bool, weights: str):
  import numpy as np  # pylint: disable=g-import-not-at-top
  wave = np.random.default_rng(0).normal(scale=0.1, size=(1, int(W2V_SECONDS * 16000)))
  wave = wave.astype(np.float32)
  if framework == "torch":
    from mfer_jax.testing.hf_reference import torch, transformers  # pylint: disable=g-import-not-at-top
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config()).eval()
    model.load_state_dict(load_file(weights))
    wt = torch.from_numpy(wave)

    def run():
      with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(wt)
    return run
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mfer_jax.models import encoders, wav2vec2  # pylint: disable=g-import-not-at-top
  from mfer_jax.models.layers import Precision  # pylint: disable=g-import-not-at-top
  cfg = wav2vec2.wav2vec2_config("wav2vec2", "base")
  prec = Precision.resolve(compute_dtype="bfloat16" if bf16 else "float32")
  model = nnx.eval_shape(lambda: wav2vec2.Wav2Vec2Model(cfg, rngs=nnx.Rngs(0), precision=prec))
  encoders.load_pretrained(model, weights, cfg)
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  wj = jnp.asarray(wave)
  return lambda: fn(state, wj).block_until_ready()


def _head_worker(kind: str, cache_dir: str):
  """The demo-sized head on a synthetic 768-d feature cache: step alone, or fed end to end;
  ``temporal_*``: with the temporal head, on clips."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  absl_flags.FLAGS.mark_as_parsed()
  from mfer_jax import sharding  # pylint: disable=g-import-not-at-top
  from mfer_jax.data import pipeline, store  # pylint: disable=g-import-not-at-top
  from mfer_jax.training import optimizer, state as state_lib  # pylint: disable=g-import-not-at-top
  from mfer_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  config = _head_config(cache_dir, temporal=kind.startswith("temporal_"))
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  spec = state_lib.ModelSpec(config.model, from_features=True)
  tx, schedule = optimizer.make_optimizer(config.train, 10_000)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  index = store.load_split(config.data.data_dir, "train")
  it = pipeline.make_train_iterator(config.data, index)
  local = next(it)
  batch = pipeline.to_global_batch(step_lib.model_inputs(local), mesh)
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)
  step = step_lib.make_train_step(spec, tx, schedule, config, mesh, state_sh, batch_sh,
                                  np.ones(8, np.float32))
  holder = [state]

  def run_step():
    holder[0], m = step(holder[0], batch)
    m["loss"].block_until_ready()

  def run_pipeline():
    b = next(it)
    holder[0], m = step(holder[0], pipeline.to_global_batch(
        step_lib.model_inputs(b), mesh))
    m["loss"].block_until_ready()

  return run_step if kind.endswith("step") else run_pipeline


def _head_config(cache_dir: str, temporal: bool = False):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
  import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config(f"temporal={_HEAD_TEMPORAL.value},clip={_HEAD_CLIP.value}"
                      if temporal else None)
  c.data.data_dir = os.path.join(cache_dir, "data")
  c.data.features_dir = os.path.join(cache_dir, "features")
  # Batches count clips with a temporal head: the same frames per step either way.
  length = c.data.sequence.length
  if _HEAD_BATCH.value % length:
    raise ValueError(f"--head_batch={_HEAD_BATCH.value} is not a multiple of --head_clip={length}")
  c.data.batch_size = _HEAD_BATCH.value // length
  c.data.sampling.epoch_size = 0
  c.data.read_threads = 2
  c.model.image.update(family="vit", variant="vit_b16")
  c.model.audio.update(family="wav2vec2", variant="base")
  return c


def _make_head_cache(d: str) -> None:
  """A prepared split index and a 768-d float16 feature cache for 40 videos x 1500 frames."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mfer_jax import files  # pylint: disable=g-import-not-at-top
  from mfer_jax.data import records, store  # pylint: disable=g-import-not-at-top
  from mfer_jax.features import cache  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  data, feats = os.path.join(d, "data"), os.path.join(d, "features")
  os.makedirs(os.path.join(feats, "train"), exist_ok=True)
  os.makedirs(os.path.join(data, "train"), exist_ok=True)
  videos, n = [f"v{i:02d}" for i in range(40)], 1500
  label = rng.integers(0, 8, len(videos) * n).astype(np.int32)
  frame = np.tile(np.arange(1, n + 1, dtype=np.int32), len(videos))
  vid = np.repeat(np.arange(len(videos), dtype=np.int32), n)
  store.write_split_index(data, "train", label=label, frame=frame, video_id=vid,
                          has_face=np.ones(label.size, bool))
  for v in videos:
    store.shard_path(data, "train", v).parent.mkdir(parents=True, exist_ok=True)
    store.shard_path(data, "train", v).write_bytes(b"")
    for kind in ("image", "audio"):
      np.save(cache.array_path(feats, "train", v, kind),
              rng.normal(size=(n, 768)).astype(np.float16))
    np.save(cache.array_path(feats, "train", v, "frame"), np.arange(1, n + 1, dtype=np.int32))
  meta = {"schema_version": records.SCHEMA_VERSION, "features": {"face_size": 112},
          "splits": {"train": {"videos": videos, "num_records": int(label.size),
                               "class_counts": np.bincount(label, minlength=8).tolist()}},
          "videos": {}}
  files.atomic_write_json(os.path.join(data, store.METADATA), meta)
  files.atomic_write_json(os.path.join(feats, cache.METADATA), {
      "format": cache.FORMAT, "version": cache.VERSION, "dtype": "float16", "spec": {},
      "spec_hash": "", "weights": {}, "dims": {"image": 768, "audio": 768},
      "splits": {"train": {"videos": videos, "num_records": int(label.size)}}})


def _serve(run, unit: float) -> None:
  """Worker loop: on each line 'N', runs N calls and prints their mean seconds per call."""
  t = time.perf_counter()
  run()
  print(json.dumps({"warmup": time.perf_counter() - t, "unit": unit}), flush=True)
  for line in sys.stdin:
    steps = int(line)
    t = time.perf_counter()
    for _ in range(steps):
      run()
    print(json.dumps({"seconds": (time.perf_counter() - t) / steps}), flush=True)


def _worker_main() -> None:
  os.sched_setaffinity(0, set(range(_THREADS.value)))
  bench, name = _WORKER.value.split(":")
  if bench == "head":
    _serve(_head_worker(name, _WEIGHTS.value), _HEAD_BATCH.value)
    return
  framework, dtype = name.split("_")
  if framework == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(_THREADS.value)
  make = _vit_worker if bench == "vit" else _w2v_worker
  unit = _BATCH.value if bench == "vit" else W2V_SECONDS
  _serve(make(framework, dtype == "bf16", _WEIGHTS.value), unit)


# ----------------------------------------------------------------------------- driver


def _reference_weights(bench: str, d: str) -> str:
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(d, f"{bench}.safetensors")
  if bench == "vit":
    from mfer_jax.testing.timm_reference import timm, torch  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
  else:
    from mfer_jax.testing.hf_reference import torch, transformers  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config())
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  return path


def _start(bench: str, name: str, weights: str) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "bench.foundation", f"--worker={bench}:{name}",
         f"--weights={weights}", f"--threads={_THREADS.value}", f"--batch={_BATCH.value}",
         f"--head_batch={_HEAD_BATCH.value}", f"--head_clip={_HEAD_CLIP.value}",
         f"--head_temporal={_HEAD_TEMPORAL.value}"]
  return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          bufsize=1)


def _ask(proc: subprocess.Popen, line: str | None = None) -> dict:
  if line is not None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
  out = proc.stdout.readline()
  if not out:
    raise RuntimeError(f"worker {proc.args[3]} died")
  return json.loads(out)


def _run_bench(bench: str, d: str) -> list[str]:
  if bench == "head":
    _make_head_cache(d)
    weights = d
  else:
    weights = _reference_weights(bench, d)
  names = [n for n in WORKERS[bench] if f"{bench}:{n}" not in _SKIP.value]
  procs, units = {}, {}
  for name in names:   # one at a time: warm-ups do not compete
    procs[name] = _start(bench, name, weights)
    info = _ask(procs[name])
    units[name] = info["unit"]
    print(f"{bench} {name}: warm-up {info['warmup']:.1f} s", flush=True)
  times = {n: [] for n in names}
  try:
    for r in range(_ROUNDS.value):
      for name in names:
        times[name].append(_ask(procs[name], str(_STEPS.value))["seconds"])
      print(f"{bench} round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
            flush=True)
  finally:
    for p in procs.values():
      p.stdin.close()
      p.wait()
  what = {"vit": "img/s", "w2v": "audio s/s", "head": "frames/s"}[bench]
  # Ratios to PyTorch fp32 for the encoders; to the frame head's step for the heads.
  base_name = "torch_f32" if bench != "head" else "step"
  rows = [f"| {bench} worker | median s/call | {what} | vs {base_name} |", "|---|---|---|---|"]
  base = times.get(base_name)
  for name in names:
    med = statistics.median(times[name])
    ratio = f"{statistics.median(base) / med:.2f}x" if base else "-"
    rate = units[name] / med
    extra = f" ({rate / _THREADS.value:.0f} per core)" if bench == "head" else ""
    rows.append(f"| {name} | {med:.4f} | {rate:.1f}{extra} | {ratio} |")
  return rows


def main() -> None:
  if _WORKER.value:
    _worker_main()
    return
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  out = []
  with tempfile.TemporaryDirectory() as d:
    for bench in _ONLY.value:
      out += ["", f"**{bench}**", ""] + _run_bench(bench, d)
  print(f"\nbench.foundation: {_THREADS.value} threads per worker, {_ROUNDS.value} rounds x "
        f"{_STEPS.value} calls, ViT batch {_BATCH.value}, head batch {_HEAD_BATCH.value} "
        f"frames (temporal: {_HEAD_TEMPORAL.value}, T={_HEAD_CLIP.value}), "
        f"jax {jax.__version__}, torch {torch.__version__}, {datetime.date.today()}")
  print("\n".join(out))


if __name__ == "__main__":
  cli.run(main)

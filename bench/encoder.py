r"""Swin-T encoder speed: our JAX model against timm on the same CPU, in the same run.

  python -m bench.encoder                        # batch 16, 5 alternating repeats, 2 threads
  python -m bench.encoder --allocator=jemalloc   # both frameworks on a caching malloc
  python -m bench.encoder --only=jax_f32_train,timm_f32_train --repeats=3

Each configuration times a training step (forward, backward, AdamW; JAX jitted with donated
state) or an inference forward pass of Swin-T at 224x224 plus an 8-class linear head, both
frameworks starting from the same weights (timm's random init, imported). Drop path is on in
training for both. Repeats alternate between configurations so that load from other users of
the machine spreads over all of them; we report medians, img/s and ratios to timm fp32.

Configurations: jax_{f32,bf16amx,bf16xla}_{train,infer} (bf16: matmuls bf16-in / f32-out,
through the ``cpu_amx`` or the portable ``xla`` matmul path of `mfer_jax.models.layers`) and
timm_{f32,bf16}_{train,infer} (bf16: torch CPU autocast). ``--threads`` pins the process to that many cores (both frameworks) and sets
torch's thread count. Results and what each speed lever gave: docs/performance.md.
"""

from __future__ import annotations

import datetime
import functools
import os
import statistics
import sys
import tempfile
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mfer_jax import cli, errors
from mfer_jax.models import layers
from mfer_jax.models import swin
from mfer_jax.models import swin_import
from mfer_jax.testing.timm_reference import timm, torch

_BATCH = flags.DEFINE_integer("batch_size", 16, "images per step")
_REPEATS = flags.DEFINE_integer("repeats", 5, "alternating timing rounds")
_STEPS = flags.DEFINE_integer("steps", 2, "steps per configuration per round")
_THREADS = flags.DEFINE_integer("threads", 2, "CPU cores to use (affinity + torch threads)")
_ONLY = flags.DEFINE_list("only", [], "configurations to run (default: all)")
_PAUSE = flags.DEFINE_float("pause", 0.0, "seconds of idle before each timed configuration")
_ALLOCATOR = flags.DEFINE_enum(
    "allocator", "glibc", ["glibc", "jemalloc"],
    "malloc for the whole process (both frameworks); jemalloc needs libjemalloc2 (apt) and is "
    "configured to keep freed memory, so steps stop page-faulting their activations afresh")

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
# Never hand freed pages back to the OS: XLA:CPU frees and re-allocates every activation
# buffer each step, and with glibc (>32 MB buffers are mmap'ed) that is ~3 GB of page faults
# per Swin-T step, a quarter of the step time.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"

CONFIGS = ("jax_f32_train", "jax_bf16amx_train", "jax_bf16xla_train", "timm_f32_train",
           "timm_bf16_train", "jax_f32_infer", "jax_bf16amx_infer", "jax_bf16xla_infer",
           "timm_f32_infer", "timm_bf16_infer")
PRECISIONS = {"f32": layers.FLOAT32,
              "bf16amx": layers.Precision("bfloat16", matmul="cpu_amx"),
              "bf16xla": layers.Precision("bfloat16", matmul="xla")}
NUM_CLASSES = 8
LR, WD = 1e-4, 0.05


class _Net(nnx.Module):
  """Encoder plus a linear head: what the training step of the real model looks like."""

  def __init__(self, cfg, precision, rngs):
    self.encoder = swin.SwinTransformer(cfg, rngs=rngs, precision=precision)
    self.head = nnx.Linear(cfg.stage_dims[-1], NUM_CLASSES, rngs=rngs)

  def __call__(self, x, rngs=None):
    return self.head(self.encoder(x, rngs=rngs)[1])


def _jax_runners(weights: str, head: dict, precision: layers.Precision, batch: int):
  """(train_step, infer) closures over donated JAX state, weights from the timm checkpoint."""
  cfg = swin.swin_config("tiny")
  net = nnx.eval_shape(lambda: _Net(cfg, precision, nnx.Rngs(0)))
  swin_import.import_pretrained(net.encoder, weights)
  net.head.kernel.set_value(jnp.asarray(head["fc.weight"].T))
  net.head.bias.set_value(jnp.asarray(head["fc.bias"]))
  graphdef, params = nnx.split(net, nnx.Param)
  tx = optax.adamw(LR, weight_decay=WD)
  state = [params, tx.init(params)]

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, x, y, key):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(x, rngs=nnx.Rngs(dropout=key))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def infer(params, x):
    return nnx.merge(graphdef, params)(x)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 224, 224, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, batch))
  count = [0]

  def train():
    count[0] += 1
    state[0], state[1], loss = train_step(state[0], state[1], x, y, jax.random.key(count[0]))
    loss.block_until_ready()

  def inference():
    infer(state[0], x).block_until_ready()

  return train, inference


def _timm_runners(ref, bf16: bool, batch: int):
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(size=(batch, 3, 224, 224)).astype(np.float32))
  y = torch.from_numpy(rng.integers(0, NUM_CLASSES, batch))
  opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD)
  autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

  def train():
    ref.train()
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = torch.nn.functional.cross_entropy(ref(x), y)
    loss.backward()
    opt.step()

  def inference():
    ref.eval()
    with torch.inference_mode(), autocast():
      ref(x)

  return train, inference


def _table(times: dict[str, list[float]], cpu: dict[str, list[float]], batch: int) -> str:
  rows = ["| Configuration | median s/step | img/s | vs timm fp32 | median CPU s/step |",
          "|---|---|---|---|---|"]
  for name in CONFIGS:
    if name not in times:
      continue
    med = statistics.median(times[name])
    base = f"timm_f32_{name.rsplit('_', 1)[1]}"
    ratio = (f"{statistics.median(times[base]) / med:.2f}x" if base in times else "-")
    rows.append(f"| {name} | {med:.3f} | {batch / med:.2f} | {ratio} | "
                f"{statistics.median(cpu[name]):.2f} |")
  return "\n".join(rows)


def _reexec_with_allocator() -> None:
  """Restarts this process with the requested malloc; it must be loaded at process start."""
  if _ALLOCATOR.value == "glibc" or os.environ.get("LD_PRELOAD", "").endswith(JEMALLOC):
    return
  if not os.path.exists(JEMALLOC):
    raise errors.UserError(f"--allocator=jemalloc needs {JEMALLOC} (apt-get install libjemalloc2)")
  env = dict(os.environ, LD_PRELOAD=JEMALLOC, MALLOC_CONF=JEMALLOC_CONF)
  os.execve(sys.executable, [sys.executable, "-m", "bench.encoder", *sys.argv[1:]], env)


def main() -> None:
  _reexec_with_allocator()
  os.sched_setaffinity(0, set(range(_THREADS.value)))
  torch.set_num_threads(_THREADS.value)
  names = [n for n in CONFIGS if not _ONLY.value or n in _ONLY.value]
  batch = _BATCH.value

  torch.manual_seed(0)
  ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False,
                          num_classes=NUM_CLASSES)
  runners = {}
  with tempfile.TemporaryDirectory() as d:
    weights = os.path.join(d, "swin_tiny.safetensors")
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, weights)
    head = {k.removeprefix("head."): v.numpy() for k, v in ref.head.state_dict().items()}
    for dt_name, precision in PRECISIONS.items():
      if any(n.startswith(f"jax_{dt_name}_") for n in names):
        train, infer = _jax_runners(weights, head, precision, batch)
        runners[f"jax_{dt_name}_train"], runners[f"jax_{dt_name}_infer"] = train, infer
  for dt_name, bf16 in (("f32", False), ("bf16", True)):
    train, infer = _timm_runners(ref, bf16, batch)
    runners[f"timm_{dt_name}_train"], runners[f"timm_{dt_name}_infer"] = train, infer

  for name in names:  # compile / warm up; compile time is reported, not timed
    t = time.perf_counter()
    runners[name]()
    print(f"warm-up {name}: {time.perf_counter() - t:.1f} s", flush=True)
  # Wall time, and the process's CPU time over all its threads: on a shared machine the wall
  # time carries other users' load, while CPU seconds per step stay close to the work done.
  times, cpu = {n: [] for n in names}, {n: [] for n in names}
  for r in range(_REPEATS.value):
    for name in names:
      time.sleep(_PAUSE.value)
      t, c = time.perf_counter(), time.process_time()
      for _ in range(_STEPS.value):
        runners[name]()
      times[name].append((time.perf_counter() - t) / _STEPS.value)
      cpu[name].append((time.process_time() - c) / _STEPS.value)
    print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
  print(f"\nSwin-T 224, batch {batch}, {_THREADS.value} threads, {_REPEATS.value} rounds x "
        f"{_STEPS.value} steps, malloc {_ALLOCATOR.value}, jax {jax.__version__}, "
        f"torch {torch.__version__}, {datetime.date.today()}\n")
  print(_table(times, cpu, batch))


if __name__ == "__main__":
  cli.run(main)

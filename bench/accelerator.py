r"""The accelerator check: run it first on a GPU or TPU host (under 10 minutes).

  pip install -e '.[cuda,test]'     # or '.[tpu,test]'
  python -m bench.accelerator                     # configs/abaw.py on every local device
  python -m bench.accelerator --dry_run           # CPU, tiny model: checks the script itself

Stages, each in its own process (so peak device memory is per configuration):

1. tests on the accelerator: the timm parity tests, both matmul paths and remat
   (tests/test_swin.py, test_swin_import.py, test_layers.py), and with 8 or more devices the
   sharded == unsharded tests (test_model.py, test_training_step.py). float32 parity needs true
   float32 matmuls, so they run with ``JAX_DEFAULT_MATMUL_PRECISION=highest`` (GPUs default
   to TF32, TPUs to one bf16 pass);
2. the planner (``python -m mfer_jax.tools.plan``) for this host's devices and accelerator:
   its largest per-device batch without remat and its memory estimate;
3. the train step of the config at that batch in float32, and in bfloat16 through both
   matmul paths (``xla``, ``cpu_amx``): compile time, median step time, examples/s, MFU and
   peak device memory (``device.memory_stats()``), next to the planner's estimate.

The dry run does the same on CPU with the tiny test model, a few steps and one cheap test,
so that a test (tests/test_accelerator_check.py) keeps this script from rotting. Results
print as a table; ``--json`` also writes them. docs/scaling.md says how to read them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags
from ml_collections import ConfigDict

from mfer_jax import cli, errors

ROOT = pathlib.Path(__file__).resolve().parents[1]

_CONFIG = flags.DEFINE_string("config", "configs/abaw.py", "Config to time (a file path, with an "
                              "optional :variant argument).")
_DRY_RUN = flags.DEFINE_boolean("dry_run", False, "CPU, tiny model, few steps: test the script.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch; 0 = the planner's largest.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per configuration.")
_VARIANTS = flags.DEFINE_list("variants", ["float32", "bfloat16_xla", "bfloat16_cpu_amx"],
                              "Precision variants to time.")
_SKIP = flags.DEFINE_list("skip", [], "Stages to skip: tests, plan, time.")
_JSON = flags.DEFINE_string("json", "", "Write the results as JSON here too.")
# Internal: one timing run in a child process.
_CHILD = flags.DEFINE_string("child", "", "(internal) time one variant, print one JSON line.")

VARIANTS = {"float32": ("float32", "xla"), "bfloat16_xla": ("bfloat16", "xla"),
            "bfloat16_cpu_amx": ("bfloat16", "cpu_amx")}
TESTS = ["tests/test_swin.py", "tests/test_swin_import.py::test_swin_tiny_matches_timm",
         "tests/test_layers.py"]
SHARDED_TESTS = ["tests/test_model.py::test_sharded_forward_equals_unsharded",
                 "tests/test_training_step.py::test_sharded_step_matches_single_device"]
DRY_RUN_TESTS = ["tests/test_model.py::test_preprocessing_matches_numpy"]  # cheap: no torch
DRY_RUN_DEVICES = 2


def _say(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _env(dry_run: bool) -> dict[str, str]:
  """The environment of every child: the accelerator (or the dry run's CPU devices)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if dry_run:
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DRY_RUN_DEVICES}")
  else:
    # Let JAX pick the accelerator, even from a shell set up for CPU tests.
    if env.get("JAX_PLATFORMS") == "cpu":
      env.pop("JAX_PLATFORMS")
    env.pop("XLA_FLAGS", None)
  return env


def _get_config(path: pathlib.Path, arg: str | None) -> ConfigDict:
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _load_config(dry_run: bool) -> tuple[ConfigDict, str]:
  """(config, its name) for the timed step; the dry run uses the tiny test model."""
  if dry_run:
    path = ROOT / "tests" / "configs" / "tiny.py"
    config = _get_config(path, None)
    config.model.fusion.name = "visual_only"  # half the compile time, same code paths
    config.data.batch_size = 2 * DRY_RUN_DEVICES
    return config, f"{path.relative_to(ROOT)} (visual_only)"
  path, _, arg = _CONFIG.value.partition(":")
  return _get_config(ROOT / path, arg), _CONFIG.value


# ----------------------------------------------------------------------------- stage 1: tests


def run_tests(dry_run: bool, devices: int) -> dict:
  selected = DRY_RUN_TESTS if dry_run else TESTS + (SHARDED_TESTS if devices >= 8 else [])
  env = _env(dry_run)
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
  if not dry_run and devices < 8:
    _say(f"sharded == unsharded tests need 8 devices; this host has {devices}: not run")
  _say(f"tests: {' '.join(selected)}")
  t0 = time.monotonic()
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *selected], cwd=ROOT, env=env, capture_output=True, text=True)
  summary = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
  _say(f"tests: {summary} ({time.monotonic() - t0:.0f} s)")
  if out.returncode:
    print(out.stdout[-5000:], out.stderr[-2000:], sep="\n")
  return {"selected": selected, "passed": out.returncode == 0, "summary": summary}


# ----------------------------------------------------------------------------- stage 2: plan


def run_planner(config_arg: str, dry_run: bool, devices: int, accelerator) -> dict | None:
  """The planner's plan for this host: {largest per-device batch, estimated bytes}."""
  with tempfile.TemporaryDirectory() as tmp:
    out_json = pathlib.Path(tmp) / "plan.json"
    cmd = [sys.executable, "-m", "mfer_jax.tools.plan", f"--devices={devices}",
           "--mesh=(-1,1,1)", "--remat_table=none", f"--json={out_json}"]
    if dry_run:
      cmd += [f"--config={ROOT / 'tests' / 'configs' / 'tiny.py'}",
              "--config.model.fusion.name=visual_only",
              f"--batch_size={2 * devices}", "--accelerators=v5e"]
    else:
      cmd += [f"--config={config_arg}", "--accelerators=" + (accelerator.name if accelerator
                                                             else "h100")]
    env = _env(dry_run)
    env.pop("XLA_FLAGS", None)  # the planner makes its own CPU devices
    env["JAX_PLATFORMS"] = "cpu"
    _say(f"planner: {' '.join(cmd[1:])}")
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
      _say(f"planner failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
      return None
    plan = json.loads(out_json.read_text())
  name = next(iter(plan["accelerators"]))
  largest = plan["accelerators"][name]["largest_per_device_batch"]["none"]
  _say(f"planner ({time.monotonic() - t0:.0f} s): {_size(plan['per_device_bytes']['total'])} "
       f"per device at {plan['per_device_batch']}/device; largest batch without remat on "
       f"{name}: {largest}/device")
  return {"largest_per_device_batch": largest, "plan": plan}


# ----------------------------------------------------------------------------- stage 3: time


def time_variant(variant: str, batch_size: int, steps: int, dry_run: bool) -> dict:
  """Compiles and times one precision variant of the train step in this process."""
  from mfer_jax import accelerators, sharding  # pylint: disable=g-import-not-at-top
  from mfer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mfer_jax.training import optimizer, performance  # pylint: disable=g-import-not-at-top
  from mfer_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from mfer_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  from mfer_jax.media.audio_features import FeatureParams  # pylint: disable=g-import-not-at-top
  config, _ = _load_config(dry_run)
  compute, matmul = VARIANTS[variant]
  config.model.precision.update(compute_dtype=compute, matmul=matmul)
  mesh = sharding.make_mesh((-1, 1, 1))
  spec = state_lib.ModelSpec(config.model)
  tx, schedule = optimizer.make_optimizer(config.train, 1000)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  rng = np.random.default_rng(0)
  features = FeatureParams()
  face, mel = config.data.face_size, (features.n_mels, features.window_frames)
  local = {"face": rng.integers(0, 256, (batch_size, face, face, 3), np.uint8),
           "mel": rng.integers(0, 256, (batch_size, *mel), np.uint8),
           "has_face": rng.random(batch_size) < 0.9,
           "label": rng.integers(0, config.model.num_classes, batch_size).astype(np.int32),
           "mask": np.ones(batch_size, bool)}
  batch = pipeline.to_global_batch(local, mesh)
  step = step_lib.make_train_step(spec, tx, schedule, config, mesh, state_sh,
                                  jax.tree.map(lambda x: x.sharding, batch),
                                  np.ones(config.model.num_classes, np.float32))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  flops = performance.cost_flops(compiled)
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  device = jax.devices()[0]
  acc = accelerators.for_device_kind(device.device_kind)
  stats = device.memory_stats() or {}
  return {"variant": variant, "precision": str(spec.precision), "batch_size": batch_size,
          "compile_s": compile_s, "step_s": step_s, "examples_per_s": batch_size / step_s,
          "tflops_per_device": flops / 1e12,
          "mfu": flops / step_s / acc.peak_bf16_flops if acc else None,
          "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
          "loss_finite": bool(np.isfinite(float(metrics["loss"])))}


def _child(args: list[str], dry_run: bool) -> tuple[dict | None, str]:
  """Runs ``bench.accelerator --child...`` and returns (its JSON line, its stderr)."""
  cmd = [sys.executable, "-m", "bench.accelerator", f"--config={_CONFIG.value}", *args]
  cmd += ["--dry_run"] if dry_run else []
  out = subprocess.run(cmd, cwd=ROOT, env=_env(dry_run), capture_output=True, text=True)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    return None, out.stderr.strip()[-3000:] or f"exit code {out.returncode}"
  return json.loads(lines[-1]), out.stderr


def device_info(dry_run: bool) -> dict:
  """Backend, device count and kind, asked of a child: the parent must not hold the
  accelerator (a TPU admits one process; a GPU process preallocates most of its memory)."""
  info, err = _child(["--child=devices"], dry_run)
  if info is None:
    raise RuntimeError(f"cannot start JAX on this host: {err}")
  return info


def run_timings(batch_size: int, dry_run: bool) -> list[dict]:
  results = []
  for variant in _VARIANTS.value:
    batch = batch_size
    while True:
      _say(f"timing {variant} at batch {batch} ...")
      result, err = _child([f"--child={variant}", f"--batch_size={batch}",
                            f"--steps={_STEPS.value}"], dry_run)
      oom = result is None and ("RESOURCE_EXHAUSTED" in err or "out of memory" in err.lower())
      if oom and batch > 1:
        # The planner's estimate is XLA:CPU's; the accelerator's compiler may need more.
        _say(f"{variant}: out of memory at batch {batch}; retrying at half")
        batch //= 2
        continue
      break
    if result is None:
      _say(f"{variant} failed: {err}")
      result = {"variant": variant, "error": err}
    results.append(result)
  return results


def _size(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _table(results: list[dict], plan: dict | None) -> str:
  est = plan["plan"]["per_device_bytes"]["total"] if plan else None
  est_batch = plan["plan"]["per_device_batch"] if plan else None
  rows = ["| variant | compile | step | examples/s | MFU | peak device memory | planner "
          "estimate |", "|---|---|---|---|---|---|---|"]
  for r in results:
    if "error" in r:
      rows.append(f"| {r['variant']} | failed | | | | | |")
      continue
    mem = r["peak_bytes_in_use"]
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    mem = "n/a" if mem is None else _size(mem)
    planned = (f"{_size(est)} at {est_batch}/device (XLA:CPU, config precision)"
               if est else "-")
    rows.append(f"| {r['variant']} | {r['compile_s']:.1f} s | {r['step_s'] * 1000:.0f} ms | "
                f"{r['examples_per_s']:.1f} | {mfu} | {mem} | {planned} |")
  return "\n".join(rows)


def main() -> None:
  if _CHILD.value == "devices":
    print(json.dumps({"backend": jax.default_backend(), "count": jax.device_count(),
                      "kind": jax.devices()[0].device_kind}))
    return
  if _CHILD.value:
    print(json.dumps(time_variant(_CHILD.value, _BATCH.value, _STEPS.value, _DRY_RUN.value)))
    return
  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown:
    raise errors.UsageError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
  dry_run = _DRY_RUN.value
  from mfer_jax import accelerators  # pylint: disable=g-import-not-at-top
  info = device_info(dry_run)
  devices, kind, backend = info["count"], info["kind"], info["backend"]
  if backend == "cpu" and not dry_run:
    raise errors.UsageError("no GPU or TPU found: install the cuda or tpu extra (README), or "
                           "run --dry_run on CPU")
  accelerator = accelerators.for_device_kind(kind)
  _, config_name = _load_config(dry_run)
  _say(f"jax {jax.__version__} on {backend}: {devices} x {kind!r} "
       f"({accelerator.label if accelerator else 'not in mfer_jax/accelerators.py: no MFU'}); "
       f"config {config_name}")
  results = {"backend": backend, "devices": devices, "device_kind": kind,
             "config": config_name}
  if "tests" not in _SKIP.value:
    results["tests"] = run_tests(dry_run, devices)
  plan = None
  if "plan" not in _SKIP.value:
    plan = run_planner(_CONFIG.value, dry_run, devices, accelerator)
    results["plan"] = plan
  batch = _BATCH.value
  if not batch and not dry_run and plan and plan["largest_per_device_batch"]:
    batch = plan["largest_per_device_batch"] * devices
  batch = batch or 2 * devices
  if "time" not in _SKIP.value:
    if not dry_run and plan is None and not _BATCH.value:
      _say(f"no planner result: timing at batch {batch}")
    results["timings"] = run_timings(batch, dry_run)
    print()
    print(_table(results["timings"], plan))
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps(results, indent=1))
  ok = (results.get("tests", {}).get("passed", True)
        and all("error" not in r for r in results.get("timings", [])))
  return 0 if ok else 1


if __name__ == "__main__":
  cli.run(main)

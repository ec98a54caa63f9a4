"""Resume and multi-host: a SIGKILLed run resumed bitwise, two processes equal one, and the
EMA through checkpoint, resume, evaluation and prediction."""

import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from conftest import tiny_config
from mfer_jax import evaluation
from mfer_jax.prediction import predictor as predictor_lib
from mfer_jax.training import evaluator as evaluator_lib, loop
from training_helpers import ROOT, TINY, final_params, logged_losses, restore_state, run_main


@pytest.fixture(scope="module")
def reference_run(tiny_run):
  """The uninterrupted 12-step run on 8 devices (conftest's, trained in-process with the same
  config as the main.py runs below, so it is the same program)."""
  return tiny_run


def test_resume_after_sigkill_is_bitwise_identical(data_dir, reference_run, tmp_path):
  """Kill -9 right after the first checkpoint, rerun: same losses and same final params."""
  args = [f"--config={TINY}:{data_dir}"]
  run_dir = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args,
                           f"--workdir={run_dir}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = run_dir / "checkpoints" / "4"
  deadline = time.time() + 300
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  assert first.exists(), "the first checkpoint never appeared"
  killed_at = max(s for s, _ in logged_losses(run_dir))
  assert killed_at < 12, "the run finished before it could be killed"
  run_main(*args, f"--workdir={run_dir}")
  assert logged_losses(run_dir) == logged_losses(reference_run)
  ref, got = final_params(reference_run, 12), final_params(run_dir, 12)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_two_processes_match_one(data_dir, reference_run, tmp_path):
  """jax.distributed over two processes on 127.0.0.1 (gloo), 4 CPU devices each: the same
  8-device mesh and global batches as the single-process run, so the same losses up to the
  summation order of cross-process all-reduces."""
  port = portpicker.pick_unused_port()
  env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace(
      "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=4")}
  workdir = tmp_path / "two_hosts"
  procs = [subprocess.Popen(
      [sys.executable, str(ROOT / "main.py"), f"--config={TINY}:{data_dir}",
       f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  got, ref = logged_losses(workdir), logged_losses(reference_run)
  assert [s for s, _ in got] == [s for s, _ in ref]
  np.testing.assert_allclose([l for _, l in got], [l for _, l in ref], rtol=2e-5)
  evals, ref_evals = evaluation.read_evals(workdir), evaluation.read_evals(reference_run)
  assert [e["step"] for e in evals] == [e["step"] for e in ref_evals]
  # Each frame is evaluated exactly once across the two hosts.
  assert evals[-1]["num_examples"] == ref_evals[-1]["num_examples"]


def test_ema_is_checkpointed_resumed_bitwise_evaluated_and_predicted_with(data_dir, tmp_path):
  """With train.ema_decay, checkpoints hold the EMA; a run resumed from its first checkpoint
  ends with the same params and EMA bit for bit; the loop's evaluations are of the EMA (not
  of the raw params) and so are the Predictor's."""
  config = tiny_config(data_dir)
  config.train.ema_decay = 0.5
  full = tmp_path / "full"
  loop.train_and_evaluate(config, str(full))
  # A run that stopped after its step-4 checkpoint: only that checkpoint survives.
  resumed = tmp_path / "resumed"
  shutil.copytree(full, resumed)
  for stale in ("checkpoints/8", "checkpoints/12", "FINISHED.json"):
    shutil.rmtree(resumed / stale) if (resumed / stale).is_dir() else (resumed / stale).unlink()
  loop.train_and_evaluate(config, str(resumed))
  final, (mesh, spec, state_sh) = restore_state(full, config, 12)
  again, _ = restore_state(resumed, config, 12)
  for a, b in zip(jax.tree.leaves((final.params, final.ema_params)),
                  jax.tree.leaves((again.params, again.ema_params)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The step-12 evaluation JSON is the EMA's: its gate means (floats) match the EMA's and not
  # the raw params'.
  written = [e for e in evaluation.read_evals(full) if e["step"] == 12][0]
  ev = evaluator_lib.build_evaluators(config, mesh, spec, state_sh.params)["validation"]
  of_ema, of_raw = ev(final.ema_params), ev(final.params)
  np.testing.assert_allclose(np.asarray(list(of_ema["gate_mean"].values()), float),
                             np.asarray(list(written["gate_mean"].values()), float), atol=1e-6)
  assert of_raw["gate_mean"] != of_ema["gate_mean"]
  best = predictor_lib.Predictor(full, which="latest", batch_size=16)
  assert best.step == 12
  for a, b in zip(jax.tree.leaves(best._params), jax.tree.leaves(final.ema_params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

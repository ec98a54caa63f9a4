"""Training: steps, sharding parity, NaN guard, metrics vs scikit-learn, and the loop's errors."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest
from flax import nnx
from sklearn.metrics import f1_score

from conftest import tiny_config
from mfer_jax import evaluation, sharding
from mfer_jax.data import pipeline, store
from mfer_jax.training import checkpointing, loop, optimizer, state as state_lib
from mfer_jax.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.py"


@pytest.fixture(scope="module")
def data_dir(tiny_data_dir):
  return tiny_data_dir


def deterministic_config(data_dir):
  """The tiny config without dropout, drop path or modality dropout: exact comparisons."""
  config = tiny_config(data_dir)
  config.model.modality_dropout = 0.0
  config.model.fusion.dropout = 0.0
  for enc in (config.model.image, config.model.audio):
    enc.drop_path_rate = 0.0
  return config


def _pieces(config, mesh):
  spec = state_lib.ModelSpec(config.model)
  tx, schedule = optimizer.make_optimizer(config.train, 100)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  it = pipeline.make_train_iterator(config.data, store.load_split(config.data.data_dir, "train"))
  local = {k: v for k, v in next(it).items() if k in step_lib.BATCH_KEYS}
  it.close()
  batch = pipeline.to_global_batch(local, mesh)
  step = step_lib.make_train_step(spec, tx, schedule, config, mesh, state_sh,
                                  jax.tree.map(lambda x: x.sharding, batch), np.ones(8))
  return spec, state, state_sh, step, local


def test_loss_decreases_on_a_fixed_batch(data_dir):
  config = deterministic_config(data_dir)   # the same program as the accum=1 test below
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, state, _, step, local = _pieces(config, mesh)
  batch = pipeline.to_global_batch(local, mesh)
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 6
  assert losses[-1] < losses[0] * 0.9, losses


def test_sharded_step_matches_single_device(data_dir):
  config = tiny_config(data_dir)
  results = []
  for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices())):
    mesh = sharding.make_mesh(shape, devices=devices)
    _, state, _, step, local = _pieces(config, mesh)
    losses = []
    for _ in range(2):
      state, metrics = step(state, pipeline.to_global_batch(local, mesh))
      losses.append(float(metrics["loss"]))
    results.append((losses, jax.device_get(nnx.to_pure_dict(state.params))))
  (l1, p1), (l8, p8) = results
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_grad_accumulation_matches_full_batch(data_dir):
  config = deterministic_config(data_dir)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  out = []
  for accum in (1, 2):
    config.train.grad_accum_steps = accum
    _, state, _, step, local = _pieces(config, mesh)
    state, metrics = step(state, pipeline.to_global_batch(local, mesh))
    out.append((float(metrics["loss"]), jax.device_get(nnx.to_pure_dict(state.params))))
  assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_nan_guard_freezes_state_and_names_the_step(data_dir):
  config = tiny_config(data_dir)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, state, _, step, local = _pieces(config, mesh)
  batch = pipeline.to_global_batch(local, mesh)
  state, _ = step(state, batch)
  poisoned = jax.tree.map(lambda x: x, state.params)
  leaf = poisoned["fusion"]["head"]["bias"]
  leaf.set_value(leaf.get_value().at[0].set(jnp.nan))
  state = state.replace(params=poisoned)
  before = jax.device_get(nnx.to_pure_dict(state.params))
  state, metrics = step(state, batch)
  state, _ = step(state, batch)
  assert not np.isfinite(float(metrics["loss"]))
  assert int(state.bad_step) == 1 and int(state.step) == 1
  after = jax.device_get(nnx.to_pure_dict(state.params))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_loop_stops_on_nan_with_a_clear_message(data_dir, tmp_path, monkeypatch):
  # Same config (and so the same compiled step) as the shared tiny run; the NaN stops it at
  # the first check.
  config = tiny_config(data_dir)

  def poison(config, spec, state):
    del config, spec
    return state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))

  monkeypatch.setattr(loop.init_files, "apply_init_files", poison)
  with pytest.raises(loop.NonFiniteLossError, match=r"NaN/Inf at step 0.*last good checkpoint"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))


def test_macro_f1_matches_sklearn_with_absent_classes():
  rng = np.random.default_rng(0)
  labels = rng.choice([0, 1, 4, 5, 7], size=500)          # classes 2, 3, 6 absent
  preds = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 8, 500))
  preds[:3] = 6                                          # predicted but never true
  ours = evaluation.summarize(evaluation.confusion_matrix(labels, preds, 8))
  ref = f1_score(labels, preds, average="macro", labels=list(range(8)), zero_division=0)
  assert ours["macro_f1"] == pytest.approx(ref, abs=1e-12)
  ref_per_class = f1_score(labels, preds, average=None, labels=list(range(8)), zero_division=0)
  np.testing.assert_allclose(list(ours["per_class_f1"].values()), ref_per_class, atol=1e-12)


def test_device_eval_matches_sklearn(data_dir):
  """The on-device confusion accumulation over padded batches equals sklearn on the same
  predictions made one example at a time on the host."""
  config = tiny_config(data_dir)
  mesh = sharding.make_mesh((2, 2, 2))
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 10)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  index = store.load_split(config.data.data_dir, "validation")
  run = loop.Run(config, pathlib.Path("."), mesh, spec, tx, None, state, state_sh, 1, 1, None,
                 index, None)
  result = loop.evaluate(run, state.params)
  model = spec.merge(jax.device_get(state.params))
  labels, preds = [], []
  for b in pipeline.make_eval_pipeline(config.data, index, process_index=0, process_count=1):
    logits = model(b["face"], b["mel"], b["has_face"])["logits"]
    keep = b["mask"]
    labels += list(b["label"][keep])
    preds += list(np.asarray(logits).argmax(-1)[keep])
  assert result["num_examples"] == int((index.label >= 0).sum())
  ref = f1_score(labels, preds, average="macro", labels=list(range(8)), zero_division=0)
  assert result["macro_f1"] == pytest.approx(ref, abs=1e-9)


def _main(*args, check=True):
  proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def test_unknown_config_key_is_an_error(data_dir, tmp_path):
  proc = _main(f"--config={TINY}:{data_dir}", f"--workdir={tmp_path}",
               "--config.train.lerning_rate=0.1", check=False)
  assert proc.returncode != 0
  assert "lerning_rate" in proc.stderr


def test_missing_data_dir_says_how_to_prepare(tmp_path):
  proc = _main(f"--config={ROOT / 'configs' / 'abaw.py'}", f"--workdir={tmp_path / 'run'}",
               f"--config.data.data_dir={tmp_path / 'nowhere'}", check=False)
  assert proc.returncode == 1
  assert "python -m data_prep.build" in proc.stderr and "configs/demo.py" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_unreadable_init_file_names_the_key(data_dir, tmp_path):
  bad = tmp_path / "swin.safetensors"
  bad.write_bytes(b"not a checkpoint at all")
  proc = _main(f"--config={TINY}:{data_dir}", f"--workdir={tmp_path / 'run'}",
               f"--config.model.image.init_file={bad}", check=False)
  assert proc.returncode == 1
  assert "model.image.init_file" in proc.stderr and str(bad) in proc.stderr
  assert "Traceback" not in proc.stderr


def _losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in rows]


def _final_params(workdir, step):
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  restored = ckpt.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  return restored.state["params"]


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
  killed_at = max(s for s, _ in _losses(run_dir))
  assert killed_at < 12, "the run finished before it could be killed"
  _main(*args, f"--workdir={run_dir}")
  assert _losses(run_dir) == _losses(reference_run)
  ref, got = _final_params(reference_run, 12), _final_params(run_dir, 12)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_two_processes_match_one(data_dir, reference_run, tmp_path):
  """jax.distributed over two processes on 127.0.0.1 (gloo), 4 CPU devices each: the same
  8-device mesh and global batches as the single-process run, so the same losses up to the
  summation order of cross-process all-reduces."""
  port = portpicker.pick_unused_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
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
  got, ref = _losses(workdir), _losses(reference_run)
  assert [s for s, _ in got] == [s for s, _ in ref]
  np.testing.assert_allclose([l for _, l in got], [l for _, l in ref], rtol=2e-5)
  evals, ref_evals = evaluation.read_evals(workdir), evaluation.read_evals(reference_run)
  assert [e["step"] for e in evals] == [e["step"] for e in ref_evals]
  # Each frame is evaluated exactly once across the two hosts.
  assert evals[-1]["num_examples"] == ref_evals[-1]["num_examples"]


def test_rerunning_a_finished_run_reports_its_final_eval(data_dir, tiny_run):
  before = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
  result = loop.train_and_evaluate(tiny_config(data_dir), str(tiny_run))
  assert result == evaluation.read_evals(tiny_run)[-1] and result["step"] == 12
  assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == before


def test_ema_params_follow_the_formula_and_are_what_is_evaluated(data_dir):
  """ema_t = d_t ema_{t-1} + (1 - d_t) params_t with d_t = min(decay, (1 + t) / (10 + t)),
  starting from the initial params, computed here in numpy from the params of each step."""
  config = deterministic_config(data_dir)
  config.train.ema_decay = 0.6   # below (1 + t) / (10 + t) from t = 13: both branches of min
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, state, _, step, local = _pieces(config, mesh)
  batch = pipeline.to_global_batch(local, mesh)
  as_numpy = lambda tree: [np.asarray(x, np.float64) for x in
                           jax.tree.leaves(jax.device_get(nnx.to_pure_dict(tree)))]
  expected = as_numpy(state.params)
  for a, b in zip(as_numpy(state.ema_params), expected, strict=True):
    np.testing.assert_array_equal(a, b)
  for t in range(15):
    state, _ = step(state, batch)
    d = min(0.6, (1 + t) / (10 + t))
    expected = [d * e + (1 - d) * p for e, p in zip(expected, as_numpy(state.params))]
  ema = as_numpy(state.ema_params)
  for a, b in zip(ema, expected, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert any(not np.allclose(a, p) for a, p in zip(ema, as_numpy(state.params)))
  assert state_lib.eval_params(state) is state.ema_params

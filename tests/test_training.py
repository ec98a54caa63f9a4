"""Training: steps, sharding parity, NaN guard, metrics vs scikit-learn, evaluators, the
documented options against references, --mode=eval, and the loop's errors."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import portpicker
import pytest
from flax import nnx
from ml_collections import ConfigDict
from sklearn.metrics import f1_score

from conftest import tiny_config
from mfer_jax import config_lib, errors, evaluation, sharding
from mfer_jax.data import pipeline, reader, store
from mfer_jax.models import model as model_lib
from mfer_jax.models import swin_import
from mfer_jax.prediction import predictor as predictor_lib
from mfer_jax.training import checkpointing, evaluator as evaluator_lib, init_files, loop
from mfer_jax.training import losses, optimizer
from mfer_jax.training import state as state_lib
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


def test_device_eval_matches_sklearn_and_compiles_once(data_dir, monkeypatch):
  """The on-device confusion accumulation over padded batches equals sklearn on the same
  predictions made one example at a time on the host; an evaluator built once opens its
  shards once and traces its step once however often it evaluates."""
  config = tiny_config(data_dir)
  mesh = sharding.make_mesh((2, 2, 2))
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 10)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  readers = []
  real_init = reader.SplitReader.__init__

  def counting_init(self, *args, **kwargs):
    readers.append(1)   # each construction opens and checks every shard of the split
    real_init(self, *args, **kwargs)

  monkeypatch.setattr(reader.SplitReader, "__init__", counting_init)
  evaluators = evaluator_lib.build_evaluators(config, mesh, spec, state_sh.params)
  ev = evaluators["validation"]
  result = ev(state.params)
  index = store.load_split(config.data.data_dir, "validation")
  model = spec.merge(jax.device_get(state.params))
  labels, preds = [], []
  for b in pipeline.make_eval_pipeline(config.data, index, process_index=0, process_count=1):
    logits = model(b["face"], b["mel"], b["has_face"])["logits"]
    keep = b["mask"]
    labels += list(b["label"][keep])
    preds += list(np.asarray(logits).argmax(-1)[keep])
  assert result["num_examples"] == ev.num_examples == int((index.label >= 0).sum())
  ref = f1_score(labels, preds, average="macro", labels=list(range(8)), zero_division=0)
  assert result["macro_f1"] == pytest.approx(ref, abs=1e-9)
  # A second evaluation, of other params, reuses the pipeline and the compiled step.
  readers.clear()
  shifted = jax.tree.map(lambda p: p * 0.5, state.params)
  again = ev(shifted)
  assert ev.traces == 1 and not readers
  assert again["num_examples"] == result["num_examples"]
  assert again["confusion"] != result["confusion"]


def test_a_train_subset_evaluator_sees_a_fixed_evenly_spaced_subset(data_dir):
  config = tiny_config(data_dir)
  config.evals.train_subset = config_lib.evaluator("train", every_steps=3, max_examples=20)
  specs = evaluator_lib.specs_from_config(config)
  assert list(specs) == ["validation", "train_subset"]     # the primary comes first
  sub = specs["train_subset"]
  assert [s for s in range(1, 13) if sub.due(s, 6, 12)] == [3, 6, 9, 12]
  assert [s for s in range(1, 13) if specs["validation"].due(s, 6, 12)] == [6, 12]
  index = store.load_split(config.data.data_dir, "train")
  labelled = np.flatnonzero(index.label >= 0)
  pipe = pipeline.make_eval_pipeline(config.data, index, max_examples=20,
                                     process_index=0, process_count=1)
  seen = np.concatenate([b["index"][b["mask"]] for b in pipe])
  expected = labelled[np.linspace(0, labelled.size - 1, 20).round().astype(int)]
  np.testing.assert_array_equal(seen, expected)
  config.evals.train_subset.metrics = ("macro_f1", "loss")
  with pytest.raises(evaluator_lib.EvalConfigError, match="config.evals.train_subset.metrics"):
    evaluator_lib.specs_from_config(config)


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


def _restore(workdir, config, step):
  """The sharded train state of checkpoint ``step`` (EMA included when the config keeps one)."""
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 1)
  state_sh = state_lib.state_shardings(spec, tx, mesh, config.mesh.rules,
                                       ema=state_lib.uses_ema(config.train))
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    state = ckpt.restore_state_only(step, state_lib.abstract_state(state_sh, spec, tx))
  finally:
    ckpt.close()
  return state, (mesh, spec, state_sh)


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
  final, (mesh, spec, state_sh) = _restore(full, config, 12)
  again, _ = _restore(resumed, config, 12)
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


def test_bf16_first_moments_and_one_step_matches_float32(data_dir):
  """train.mu_dtype=bfloat16: Adam's first moments are bf16 (second moments stay float32),
  and two steps (the first has learning rate 0 in warmup) move the params as float32 does."""
  config = deterministic_config(data_dir)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  moved = {}
  for mu_dtype in ("float32", "bfloat16"):
    config.train.mu_dtype = mu_dtype
    _, state, _, step, local = _pieces(config, mesh)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    nu = optax.tree_utils.tree_get(state.opt_state, "nu")
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(mu_dtype)}
    assert {x.dtype for x in jax.tree.leaves(nu)} == {jnp.dtype(jnp.float32)}
    before = jax.device_get(nnx.to_pure_dict(state.params))
    batch = pipeline.to_global_batch(local, mesh)
    for _ in range(2):
      state, _ = step(state, batch)
    after = jax.device_get(nnx.to_pure_dict(state.params))
    moved[mu_dtype] = jax.tree.map(lambda a, b: a - b, after, before)
  total = 0.0
  for a, b in zip(jax.tree.leaves(moved["bfloat16"]), jax.tree.leaves(moved["float32"])):
    np.testing.assert_allclose(a, b, atol=1e-2 * np.abs(b).max() + 1e-9)
    total += float(np.abs(b).sum())
  assert total > 0


def test_step_runs_under_transfer_guard_and_refuses_implicit_copies(data_dir):
  """The step needs no implicit host<->device copy (the loop runs it under the guard); a numpy
  batch, which jit would silently copy, is refused."""
  config = deterministic_config(data_dir)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, state, _, step, local = _pieces(config, mesh)
  batch = pipeline.to_global_batch(local, mesh)
  with jax.transfer_guard("disallow"):
    state, metrics = step(state, batch)
    with pytest.raises(Exception, match="host-to-device transfer"):
      step(state, local)
  assert np.isfinite(float(metrics["loss"]))


# --- Documented options, each against an independent reference ------------------------------


def test_class_weights_follow_the_formula():
  """w_c = n_c^-p (p = 1 inverse, 1/2 inverse_sqrt), 0 for absent classes, scaled so that the
  mean weight over the labelled frames is 1; -1 frames do not count."""
  label = np.array([0] * 50 + [1] * 5 + [4] * 20 + [7] * 2 + [-1] * 9)
  counts = np.array([50, 5, 0, 0, 20, 0, 0, 2], np.float64)
  for mode, power in (("inverse", 1.0), ("inverse_sqrt", 0.5)):
    got = loop.class_loss_weights(ConfigDict({"class_weights": mode}), label, 8)
    raw = np.array([c ** -power if c else 0.0 for c in counts])
    expected = raw * counts.sum() / (raw * counts).sum()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[1] / got[0] == pytest.approx((50 / 5) ** power, rel=1e-6)
  np.testing.assert_array_equal(
      loop.class_loss_weights(ConfigDict({"class_weights": "none"}), label, 8), np.ones(8))
  with pytest.raises(errors.UsageError, match="train.class_weights='inverse_square'"):
    loop.class_loss_weights(ConfigDict({"class_weights": "inverse_square"}), label, 8)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_smoothed_loss_matches_optax_smooth_labels(smoothing):
  """The step's per-example loss (train.loss=cross_entropy) is CE(optax.smooth_labels(
  onehot(y)), logits), the cross-entropy computed here with numpy; weighted by class weight x
  mask as the step sums it."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 8)).astype(np.float32)
  labels = np.array([0, 1, 4, 4, 7, 2])
  weights = np.array([1.0, 2.5, 0.5, 0.5, 1.0, 0.0], np.float32)   # class weight x mask
  cfg = config_lib.base_config().train
  cfg.label_smoothing = smoothing
  loss = losses.make_loss(cfg, 8)(jnp.asarray(logits), jnp.asarray(labels))
  targets = np.asarray(optax.smooth_labels(jax.nn.one_hot(labels, 8), smoothing))
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -(targets * log_softmax).sum(-1)
  np.testing.assert_allclose(np.asarray(loss), ce, rtol=1e-5)
  assert float(jnp.sum(loss * weights)) == pytest.approx(float((weights * ce).sum()), rel=1e-5)


def test_adam_is_adam_with_l2_decay_on_matrices():
  """optimizer=adam: the authors' Adam with L2 decay added to the gradient of matrices (not
  of biases), against a numpy Adam; AdamW (decoupled decay) would differ."""
  cfg = config_lib.base_config().train
  cfg.update(optimizer="adam", learning_rate=0.05, warmup_steps=0, final_lr_ratio=1.0,
             weight_decay=0.1, b1=0.9, b2=0.999, grad_clip_norm=0.0)
  tx, _ = optimizer.make_optimizer(cfg, 10)
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
           for _ in range(3)]
  ref = jax.tree.map(np.asarray, params)
  m = jax.tree.map(np.zeros_like, ref)
  v = jax.tree.map(np.zeros_like, ref)
  opt_state = tx.init(params)
  for t, g in enumerate(grads, start=1):
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    for layer in ("kernel", "bias"):
      p, gi = ref["dense"][layer], np.asarray(g["dense"][layer], np.float64)
      if layer == "kernel":
        gi = gi + 0.1 * p
      m["dense"][layer] = 0.9 * m["dense"][layer] + 0.1 * gi
      v["dense"][layer] = 0.999 * v["dense"][layer] + 0.001 * gi ** 2
      m_hat = m["dense"][layer] / (1 - 0.9 ** t)
      v_hat = v["dense"][layer] / (1 - 0.999 ** t)
      ref["dense"][layer] = p - 0.05 * m_hat / (np.sqrt(v_hat) + 1e-8)
  for layer in ("kernel", "bias"):
    np.testing.assert_allclose(params["dense"][layer], ref["dense"][layer], rtol=1e-5,
                               atol=1e-6)


def test_init_file_loads_into_an_fsdp_sharded_state(data_dir, tmp_path):
  """model.image.init_file into a state sharded over an fsdp axis of 8 devices: the encoder
  holds the file's values exactly, every param keeps its sharding, and the EMA of the params
  starts from the loaded values."""
  config = tiny_config(data_dir)
  config.train.ema_decay = 0.9
  enc_cfg = model_lib.image_arch(config.model)   # a SwinConfig for the tiny config
  rng = np.random.default_rng(1)
  values = {p: rng.normal(size=s).astype(np.float32)
            for p, s in swin_import.expected_shapes(enc_cfg).items()}
  path = tmp_path / "image_encoder.safetensors"
  swin_import.save_params(str(path), values, enc_cfg)
  config.model.image.init_file = str(path)
  mesh = sharding.make_mesh((1, 8, 1))
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 10)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  loaded = init_files.apply_init_files(config, spec, state)
  encoder = nnx.state(spec.merge(loaded.params).image_encoder, nnx.Param)
  got = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(encoder)}
  assert set(got) == set(values)
  split = 0
  for p, value in got.items():
    np.testing.assert_array_equal(np.asarray(value), values[p])
    split += not value.sharding.is_fully_replicated
  assert split > 10   # the fsdp axis really splits the encoder's kernels
  same = jax.tree.map(lambda a, s: a.sharding == s, loaded.params, state_sh.params)
  assert all(jax.tree.leaves(same))
  for ema, param in zip(jax.tree.leaves(loaded.ema_params), jax.tree.leaves(loaded.params),
                        strict=True):
    assert ema.sharding == param.sharding
    np.testing.assert_array_equal(np.asarray(ema), np.asarray(param))


def test_eval_mode_needs_only_the_eval_split_and_writes_beside_its_checkpoint(
    data_dir, tiny_run, tmp_path):
  """--mode=eval evaluates the best checkpoint (by the primary eval's macro-F1) with no train
  split present, equals the training run's own evaluation of that step, writes
  checkpoints/<step>/eval_validation.json and leaves config.json and eval/ untouched."""
  data = tmp_path / "validation_only"
  shutil.copytree(data_dir, data)
  shutil.rmtree(data / "train")
  (data / "train.index.npz").unlink()
  run = tmp_path / "run"
  shutil.copytree(tiny_run, run)
  kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  result = loop.evaluate_workdir(tiny_config(data), str(run))
  best = max(evaluation.read_evals(tiny_run), key=lambda e: e["macro_f1"])
  assert result["step"] == best["step"]
  assert {k: v for k, v in result.items() if k != "path"} == best
  written = run / "checkpoints" / str(best["step"]) / "eval_validation.json"
  assert result["path"] == str(written) and json.loads(written.read_text()) == best
  assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p != written} == kept

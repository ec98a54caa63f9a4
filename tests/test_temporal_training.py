"""Temporal runs end to end: the window evaluator against scikit-learn on 1, 2 and 3 hosts,
a trained run that is preempted inside a window evaluation and resumed bit for bit,
``--mode=eval``, prediction windows, and a checkpoint of another mode.

Everything shares one tiny TCN config (T=4, hop 2, focal loss; the face encoder only, which
halves every compile: the audio path of clips is checked in test_temporal.py), one finished
4-step run (`tcn_run`) and one jitted forward over EVAL_BATCH windows (the run's
`predictor`), so the module compiles the train step, the window eval step and that forward
once each (the persistent compilation cache makes the repeats in the resumed run cheap).
"""

import json
import os
import pathlib
import shutil
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from sklearn.metrics import f1_score

from conftest import tiny_config
from mfer_jax import errors, evaluation, sharding
from mfer_jax.data import pipeline, store
from mfer_jax.prediction import predictor as predictor_lib
from mfer_jax.training import checkpointing, evaluator as evaluator_lib, loop, optimizer
from mfer_jax.training import performance, run_status, state as state_lib

# Eval batch (windows): divisible by 1, 2 and 3 simulated hosts and by the 8 devices.
EVAL_BATCH = 24


def temporal_config(data_dir, head="tcn"):
  config = tiny_config(data_dir)
  config.data.sequence.update(length=4, stride=1, hop=2)
  config.data.sampling.epoch_size = 16          # 2 steps of 8 clips (32 frames) per epoch
  config.data.eval_batch_size = EVAL_BATCH
  config.model.fusion.name = "visual_only"
  config.model.temporal.update(name=head, num_heads=4, num_layers=1, dilations=(1, 2))
  config.train.update(num_epochs=2, checkpoint_every_steps=2, loss="focal")
  return config                                 # evaluations at steps 2 and 4 (per epoch)


@pytest.fixture(scope="module")
def config(tiny_data_dir):
  return temporal_config(tiny_data_dir)


@pytest.fixture(scope="module")
def tcn_run(config, tmp_path_factory):
  """A finished 4-step temporal run, evaluated at steps 2 and 4, checkpoints 2 and 4."""
  workdir = tmp_path_factory.mktemp("tcn_run")
  result = loop.train_and_evaluate(config, str(workdir))
  return workdir, result


@pytest.fixture(scope="module")
def predictor(tcn_run, config):
  """The run's predictor; its device calls take EVAL_BATCH windows of T frames."""
  return predictor_lib.Predictor(tcn_run[0], batch_size=EVAL_BATCH * 4)


@pytest.fixture(scope="module")
def forward(predictor):
  """The model's logits for up to EVAL_BATCH windows (padded), one window per row, through
  the predictor's jitted forward (compiled once for the module)."""

  def run(params, face, mel, has_face, present):
    pad = EVAL_BATCH - face.shape[0]
    grow = lambda a: np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])  # noqa: E731
    # The predictor's own param shardings, so the call reuses its compiled program.
    params = jax.device_put(params, jax.tree.map(lambda x: x.sharding,
                                                 predictor._params))  # pylint: disable=protected-access
    logits, _ = predictor._forward_clips(   # pylint: disable=protected-access
        params, grow(face), grow(mel), grow(has_face), grow(present))
    return np.asarray(logits)[:face.shape[0]]

  return run


def test_window_evaluator_counts_every_valid_frame_once_and_matches_sklearn(config, predictor,
                                                                           forward):
  """The run's evaluator (built once, traced once) on global batches assembled from 1, 2 or
  3 simulated hosts' windows on 8 devices: every valid frame is scored once, and macro-F1
  equals scikit-learn's on a host-side average of the same windows' logits."""
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 10)
  state_sh = state_lib.state_shardings(spec, tx, mesh, config.mesh.rules)
  # The trained params (no second init to compile), on the run's mesh.
  params = jax.device_put(predictor._params, state_sh.params)  # pylint: disable=protected-access
  kernel = params["fusion"]["head"]["kernel"]
  kernel[...] = kernel[...] * 300          # spread the logits: frames get different classes
  evaluator = evaluator_lib.build_evaluators(config, mesh, spec, state_sh.params)["validation"]
  assert isinstance(evaluator, evaluator_lib.WindowEvaluator)
  result = evaluator(params)

  index = store.load_split(config.data.data_dir, "validation")
  valid = index.label >= 0
  assert evaluator.num_examples == result["num_examples"] == valid.sum()
  confusions = []
  for hosts in (1, 2, 3):
    pipes = [pipeline.make_eval_pipeline(config.data, index, process_index=p,
                                         process_count=hosts) for p in range(hosts)]
    acc = evaluator._empty_accumulator()   # pylint: disable=protected-access
    sums, counts = np.zeros((len(index), 8)), np.zeros(len(index), int)
    for host_batches in zip(*pipes):
      # What to_global_batch assembles from the hosts' blocks, in process order.
      local = {k: np.concatenate([b[k] for b in host_batches]) for k in host_batches[0]}
      acc = evaluator._accumulate(params, acc,   # pylint: disable=protected-access
                                  evaluator._global_batch(local))  # pylint: disable=protected-access
      m = local["mask"]
      np.add.at(counts, local["index"][m], 1)
      if hosts == 1:   # reference: one forward per window on the host, summed per frame
        logits = forward(params, local["face"], local["mel"], local["has_face"],
                         local["present"])
        np.add.at(sums, local["index"][m], logits[m])
    np.testing.assert_array_equal(counts > 0, valid)       # every valid frame is scored...
    np.testing.assert_array_equal(counts[valid], 2)        # ...by T / hop = 2 windows...
    confusion = evaluator._summarize(acc)["confusion"]     # pylint: disable=protected-access
    assert np.sum(confusion) == valid.sum()                # ...and counted once
    confusions.append(confusion)
    if hosts == 1:
      preds, labels = sums[valid].argmax(-1), index.label[valid]
  assert len(set(preds.tolist())) > 1
  ref_cm = np.zeros((8, 8), int)
  np.add.at(ref_cm, (labels, preds), 1)
  for confusion in confusions + [result["confusion"]]:
    np.testing.assert_array_equal(confusion, ref_cm)
  ref = f1_score(labels, preds, average="macro", labels=list(range(8)), zero_division=0)
  assert result["macro_f1"] == pytest.approx(ref, abs=1e-9)
  assert evaluator(params)["macro_f1"] == result["macro_f1"]
  assert evaluator.traces == 1                              # every evaluation reused it


def _train_rows(workdir):
  """metrics.jsonl without the wall-clock timings (the rest is bitwise reproducible)."""
  return [{k: v for k, v in r.items() if k not in performance.WALL_CLOCK_METRICS}
          for r in evaluation.read_metrics(workdir)]


def _params(workdir, step):
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    saved = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
  finally:
    ckpt.close()
  return jax.tree.leaves(saved["params"])


def test_a_temporal_run_preempted_in_a_window_evaluation_resumes_bit_for_bit(
    tcn_run, config, tmp_path, monkeypatch):
  """The run as it was after step 2, its evaluation not yet written: resumed, it evaluates
  step 2 first, and a SIGTERM during the second window batch stops it: nothing of the
  evaluation is written and the run is PREEMPTED (exit 143). The rerun evaluates step 2,
  trains on, finishes, and equals the uninterrupted run bit for bit: metrics, both
  evaluations, and the final params."""
  reference, final = tcn_run
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  for path in [*(workdir / "eval").glob("*.json"), workdir / run_status.FINISHED]:
    path.unlink()
  batches = []
  accumulate = evaluator_lib.Evaluator._accumulate   # pylint: disable=protected-access

  def accumulate_then_signal(self, params, acc, batch):
    batches.append(1)
    if len(batches) == 2:
      os.kill(os.getpid(), signal.SIGTERM)   # arrives while batch 2 is being evaluated
    return accumulate(self, params, acc, batch)

  monkeypatch.setattr(evaluator_lib.Evaluator, "_accumulate", accumulate_then_signal)
  with pytest.raises(errors.Preempted, match="SIGTERM after step 2 of 4") as e:
    loop.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()
  assert e.value.exit_code == errors.EXIT_PREEMPTED and len(batches) == 2
  assert not list((workdir / "eval").glob("*.json"))
  assert run_status.preempted(workdir)["step"] == 2 and not run_status.finished(workdir)

  result = loop.train_and_evaluate(config, str(workdir))
  assert result == final == evaluation.read_evals(reference)[-1]
  assert evaluation.read_evals(workdir) == evaluation.read_evals(reference)
  assert [e["step"] for e in evaluation.read_evals(workdir)] == [2, 4]
  rows = _train_rows(workdir)
  assert rows == _train_rows(reference) and [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert run_status.finished(workdir)["step"] == 4 and not run_status.preempted(workdir)
  for a, b in zip(_params(reference, 4), _params(workdir, 4), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mode_eval_of_a_temporal_run_redoes_its_best_evaluation(tcn_run, config):
  workdir, _ = tcn_run
  out = loop.evaluate_workdir(config, str(workdir))
  best = max(evaluation.read_evals(workdir), key=lambda e: e["macro_f1"])
  assert out["step"] == best["step"]
  assert {k: v for k, v in out.items() if k != "path"} == best
  assert pathlib.Path(out["path"]) == workdir / "checkpoints" / str(best["step"]) / \
      "eval_validation.json"


def test_temporal_prediction_scores_every_frame_from_its_windows(predictor, forward):
  assert predictor.sequence.length == 4 and predictor.sequence.window_hop == 2
  rng = np.random.default_rng(0)
  n = 11                                   # not a multiple of the window or the batch
  face = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
  mel = rng.integers(0, 256, (n, 16, 32), np.uint8)
  has_face = rng.random(n) < 0.7
  probs, gates = predictor.predict(face, mel, has_face)
  assert probs.shape == (n, 8) and gates.shape == (n, 2)
  # Reference: the windows of frames 1..n, T=4 hop 2, written out by hand; mean logits.
  windows = np.asarray([[-1, -1, 0, 1], [0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9],
                        [8, 9, 10, -1], [10, -1, -1, -1]])   # every frame in T / hop = 2
  p = windows >= 0
  take = np.maximum(windows, 0)
  logits = forward(predictor._params,   # pylint: disable=protected-access
                   np.where(p[..., None, None, None], face[take], 0),
                   np.where(p[..., None, None], mel[take], 0), has_face[take] & p, p)
  sums = np.zeros((n, 8))
  np.add.at(sums, windows[p], logits[p])
  mean = sums / np.bincount(windows[p])[:, None]
  ref = np.exp(mean - mean.max(-1, keepdims=True))
  np.testing.assert_allclose(probs, ref / ref.sum(-1, keepdims=True), atol=1e-5)


def test_a_checkpoint_of_another_mode_is_a_one_line_error(tcn_run, tmp_path, monkeypatch):
  """Predict and a resumed training run name the mismatch (a `UserError`: one line from
  every command, as test_errors checks for predict); the training run's config.json keeps
  the record of what was trained."""
  workdir, _ = tcn_run
  saved = json.loads((workdir / "config.json").read_text())
  for name, length, message in (
      ("none", 1, "temporal head 'tcn', but the config asks for frame mode"),
      ("transformer", 4, "temporal head 'tcn', but the config asks for temporal head "
                         "'transformer'")):
    other = tmp_path / name
    other.mkdir()
    (other / "checkpoints").symlink_to(workdir / "checkpoints")
    (other / "features.json").write_bytes((workdir / "features.json").read_bytes())
    edited = json.loads(json.dumps(saved))
    edited["model"]["temporal"]["name"] = name
    edited["data"]["sequence"].update(length=length, hop=0)
    (other / "config.json").write_text(json.dumps(edited))
    with pytest.raises(checkpointing.CheckpointMismatchError, match=message):
      predictor_lib.Predictor(other)
  # The reverse direction: a frame-mode training config resumed on the temporal run.
  resumed = tmp_path / "resumed"
  resumed.mkdir()
  shutil.copytree(workdir / "checkpoints", resumed / "checkpoints")
  (resumed / "config.json").write_text(json.dumps(saved))
  frame_config = tiny_config(saved["data"]["data_dir"])
  frame_config.model.fusion.name = "visual_only"
  # The initial values are never used (the restore decides), so skip compiling the init.
  monkeypatch.setattr(state_lib, "create_train_state", lambda config, spec, tx, mesh: (
      None, state_lib.state_shardings(spec, tx, mesh, config.mesh.rules)))
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match="temporal head 'tcn', but the config asks for frame mode"):
    loop.train_and_evaluate(frame_config, str(resumed))
  assert json.loads((resumed / "config.json").read_text()) == saved
  assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["2", "4"]

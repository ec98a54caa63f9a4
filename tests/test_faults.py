"""Faults: damaged checkpoints are moved aside and the run falls back, evaluation faults and
preemption lose no step, and a preempted run says so (exit 143, PREEMPTED marker).

Every test works on copies of the session's finished 12-step tiny run (`tiny_run`:
checkpoints 6, 8 and 12; evaluations at 6 and 12, the best at 6), so nothing here trains
from scratch and the resumed runs are compared bit for bit with it.
"""

import logging as std_logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from mfer_jax import errors, evaluation, sharding
from mfer_jax.data import pipeline, reader, store
from mfer_jax.prediction import predictor as predictor_lib
from mfer_jax.training import checkpointing, evaluator as evaluator_lib, loop, optimizer
from mfer_jax.training import performance, run_status, state as state_lib
from mfer_jax.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.py"

# A failed restore's leftover reads must not reach pytest's unraisable hook either (they are
# dropped by checkpointing._silence_failed_restore_leftovers, as they are for a command).
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _no_leftover_read_reports(caplog):
  """Nor asyncio's "exception was never retrieved" reports of them (a logged error)."""
  yield
  reports = [r.getMessage()[:200] for r in caplog.records if "never retrieved" in r.getMessage()]
  assert not reports, reports


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The array data files of a step (OCDBT). Each one is damaged, since which of them a
  restore reads varies from save to save."""
  return sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir())


def _truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _empty(step_dir: pathlib.Path) -> None:
  shutil.rmtree(step_dir)
  step_dir.mkdir()


# The damage a checkpoint step folder can suffer (a disk, a copy or a person cut it short).
DAMAGE = {
    "array_files_deleted": lambda s: [p.unlink() for p in _data_files(s)],
    "array_files_truncated": lambda s: [_truncate(p) for p in _data_files(s)],
    "manifest_deleted": lambda s: (s / "state" / "manifest.ocdbt").unlink(),
    "iterator_json_truncated": lambda s: _truncate(next((s / "data").glob("*.json"))),
    "folder_emptied": _empty,
}


def _copy_run(tiny_run, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(tiny_run, dst)
  return dst


def _names(run: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (run / "checkpoints").iterdir())


def _saved_state(run: pathlib.Path, step: int):
  """The raw saved train state of ``step`` (host arrays), read without any target."""
  ckpt = checkpointing.Checkpointer(run, async_save=False)
  try:
    return ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
  finally:
    ckpt.close()


def _assert_same_state(restored, saved) -> None:
  got = jax.tree.leaves(jax.tree.map(np.asarray, {
      "params": restored.params, "opt_state": restored.opt_state, "step": restored.step}))
  want = jax.tree.leaves({k: saved[k] for k in ("params", "opt_state", "step")})
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, np.asarray(b))


@pytest.fixture(scope="module")
def target(tiny_data_dir):
  """The tiny run's restore target on the default 8-device mesh, and a train iterator."""
  config = tiny_config(tiny_data_dir)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 12)
  shardings = state_lib.state_shardings(spec, tx, mesh, config.mesh.rules)
  return config, state_lib.abstract_state(shardings, spec, tx)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_restored(
    damage, tiny_run, target, tmp_path, capsys):
  config, abstract = target
  run = _copy_run(tiny_run, tmp_path / "run")
  DAMAGE[damage](run / "checkpoints" / "12")
  train_iter = pipeline.make_train_iterator(config.data,
                                            store.load_split(config.data.data_dir, "train"))
  ckpt = checkpointing.Checkpointer(run, async_save=False)
  try:
    restored = ckpt.restore_newest_good(abstract, train_iter)
  finally:
    ckpt.close()
  assert restored.step == 8 and train_iter.step == 8
  assert _names(run) == ["12.corrupt", "6", "8"]          # moved aside, never deleted
  _assert_same_state(restored.state, _saved_state(tiny_run, 8))
  warnings = [l for l in capsys.readouterr().err.splitlines() if "cannot be read" in l]
  assert len(warnings) == 1 and "step 12" in warnings[0] and "12.corrupt" in warnings[0]


def test_only_a_failed_restores_leftover_reads_are_silenced():
  """What Orbax leaves behind when one array read fails, and what must still be reported."""
  # A read coroutine of Orbax's that the garbage collector closes while it waits: its broad
  # ``except`` turns the GeneratorExit into another read error ("Exception ignored in").
  source = ("async def read(wait):\n  try:\n    await wait\n  except BaseException as e:\n"
            "    raise Exception('Encountered error while reading array index') from e\n")
  scope = {}
  exec(compile(source, os.path.join(os.sep, "site-packages", "orbax", "serialization.py"),
               "exec"), scope)   # pylint: disable=exec-used

  class Wait:
    def __await__(self):
      yield

  def closed(read):
    coro = read(Wait())
    coro.send(None)
    try:
      coro.close()
    except Exception as e:  # pylint: disable=broad-exception-caught
      return types.SimpleNamespace(object=coro, exc_value=e)
    raise AssertionError("the coroutine should raise when closed")

  leftover = checkpointing._is_failed_restore_leftover  # pylint: disable=protected-access
  assert leftover(closed(scope["read"]))
  assert leftover(types.SimpleNamespace(object=None, exc_value=RuntimeError("Event loop is closed")))
  # The same from a coroutine that is not Orbax's, or an Orbax error not caused by the close:
  # reported as usual.
  exec(source, scope)   # pylint: disable=exec-used
  assert not leftover(closed(scope["read"]))
  orbax_read = closed(scope["read"]).object
  assert not leftover(types.SimpleNamespace(object=orbax_read, exc_value=ValueError("bug")))
  # asyncio's "never retrieved" reports: a Task names Orbax's coroutine, a bare Future only
  # TensorStore's read error of the OCDBT file.
  logs = checkpointing._FailedRestoreLeftovers()  # pylint: disable=protected-access
  record = lambda msg, exc=None: std_logging.LogRecord(  # noqa: E731
      "asyncio", std_logging.ERROR, __file__, 0, msg, (), (type(exc), exc, None) if exc else None)
  assert not logs.filter(record("Task exception was never retrieved\nfuture: <Task finished "
                                "coro=<_read_array() at /x/orbax/checkpoint/a.py:1>>"))
  assert not logs.filter(record("Future exception was never retrieved\nfuture: <Future "
                                "finished exception=ValueError(...)>", ValueError(
                                    'OUT_OF_RANGE: Error reading "a/0" in OCDBT database')))
  gathered = Exception("Encountered error while reading array index: (slice(0, 4, 1),). See "
                       "full TensorStore details: ...")
  assert not logs.filter(record("_GatheringFuture exception was never retrieved\nfuture: "
                                "<_GatheringFuture finished exception=Exception(...)>", gathered))
  assert logs.filter(record("Future exception was never retrieved", ValueError("ours")))
  assert logs.filter(record("something else about orbax"))


def test_no_readable_checkpoint_stops_the_run_and_never_starts_over(tiny_run, target, tmp_path):
  _, abstract = target
  run = _copy_run(tiny_run, tmp_path / "run")
  # (Evaluation and prediction read no iterator state, so a damaged iterator JSON would not
  # stop them.)
  for step, damage in zip((12, 8, 6), ("manifest_deleted", "array_files_deleted",
                                       "folder_emptied")):
    DAMAGE[damage](run / "checkpoints" / str(step))
  for _ in range(2):   # the second time, only moved-aside folders are left: still an error
    ckpt = checkpointing.Checkpointer(run, async_save=False)
    with pytest.raises(checkpointing.CheckpointError, match="no readable checkpoint") as e:
      ckpt.restore_newest_good(abstract, None)
    ckpt.close()
    assert "6.corrupt, 8.corrupt, 12.corrupt" in str(e.value) and "\n" not in str(e.value)
    assert _names(run) == ["12.corrupt", "6.corrupt", "8.corrupt"]


def test_a_checkpoint_of_another_model_is_a_mismatch_not_damage(tiny_run, tiny_data_dir,
                                                                tmp_path):
  config = tiny_config(tiny_data_dir)
  config.model.fusion.dim = 48
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 12)
  abstract = state_lib.abstract_state(
      state_lib.state_shardings(spec, tx, mesh, config.mesh.rules), spec, tx)
  run = _copy_run(tiny_run, tmp_path / "run")
  ckpt = checkpointing.Checkpointer(run, async_save=False)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"step 12 .* does not match the config \(params\.fusion\.\S+ is "
                           r"\([\d, ]+\) there but \([\d, ]+\) in the config; \d+ arrays differ\): "
                           "use the config the run was trained with"):
    ckpt.restore_newest_good(abstract, None)
  ckpt.close()
  assert _names(run) == ["12", "6", "8"]


def test_prediction_falls_back_from_a_damaged_best_checkpoint_to_the_next_best(tiny_run,
                                                                              tmp_path):
  run = _copy_run(tiny_run, tmp_path / "run")
  evals = sorted(evaluation.read_evals(tiny_run), key=lambda e: -e["macro_f1"])
  # Steps 6 and 12 were evaluated (8 was only checkpointed, so it has no macro-F1).
  assert sorted(e["step"] for e in evals) == [6, 12] and evals[0]["macro_f1"] > evals[1]["macro_f1"]
  best, next_best = evals[0]["step"], evals[1]["step"]
  DAMAGE["array_files_truncated"](run / "checkpoints" / str(best))
  assert predictor_lib.Predictor(run).step == next_best
  assert _names(run) == sorted(["8", str(next_best), f"{best}.corrupt"])


class _FakeIterator:
  """Just what Grain's checkpoint handler needs from an iterator."""

  def get_state(self) -> bytes:
    return b'{"step": 0}'

  def set_state(self, state) -> None:
    del state


def test_the_best_checkpoint_is_kept_while_newer_ones_rotate(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, keep=2, async_save=False)
  for step, f1 in zip(range(1, 7), (0.1, 0.9, 0.2, 0.3, 0.4, None)):
    ckpt.save(step, {"w": jnp.full((3,), float(step))}, _FakeIterator(),
              metrics=None if f1 is None else {"macro_f1": f1})
  ckpt.wait()
  assert sorted(ckpt.manager.all_steps()) == [2, 5, 6]
  assert ckpt.best_step() == 2 and ckpt.latest_step() == 6
  ckpt.close()


def test_evaluation_faults_and_preemption_lose_no_step(tiny_run, tiny_data_dir, tmp_path,
                                                      monkeypatch):
  """One story on a copy of the finished run, whose steps 12 and 8 are damaged and whose
  validation shard has a corrupt record:

  1. the run falls back to step 6 and trains to 12; the eval of step 12 meets the damaged
     shard: the checkpoint of step 12 is saved first, and the error names the shard;
  2. rerun with the shard still damaged: it evaluates step 12 first and fails again without
     training a step;
  3. rerun with good data, SIGTERM during the second eval batch: the evaluation stops after
     that batch, nothing is written, the run is marked PREEMPTED (exit code 143);
  4. rerun: step 12 is evaluated, the run is FINISHED, and its metrics, evaluation and final
     state equal the uninterrupted run's bit for bit.
  """
  run = _copy_run(tiny_run, tmp_path / "run")
  DAMAGE["array_files_truncated"](run / "checkpoints" / "12")
  DAMAGE["iterator_json_truncated"](run / "checkpoints" / "8")
  (run / "eval" / "12.json").unlink()
  bad_data = tmp_path / "bad_data"
  shutil.copytree(tiny_data_dir, bad_data)
  victim = store.load_split(bad_data, "validation").paths[1]
  raw = bytearray(pathlib.Path(victim).read_bytes())
  raw[200:400] = bytes(b ^ 0xFF for b in raw[200:400])   # inside the first record's chunk
  pathlib.Path(victim).write_bytes(bytes(raw))

  # 1.
  with pytest.raises(reader.ShardReadError, match=f"record 0 of shard {victim}"):
    loop.train_and_evaluate(tiny_config(bad_data), str(run))
  assert _names(run) == ["12", "12.corrupt", "6", "8", "8.corrupt"]
  assert [r["step"] for r in evaluation.read_metrics(run)][-1] == 12
  assert not (run / "eval" / "12.json").exists() and not run_status.finished(run)

  # 2.
  def no_training(*args, **kwargs):
    raise AssertionError("a resumed run must evaluate its restored step before training")

  monkeypatch.setattr(step_lib, "make_train_step", no_training)
  with pytest.raises(reader.ShardReadError, match=victim):
    loop.train_and_evaluate(tiny_config(bad_data), str(run))

  # 3.
  batches = []
  accumulate = evaluator_lib.Evaluator._accumulate

  def accumulate_then_signal(self, params, acc, batch):
    batches.append(self.spec.name)
    if len(batches) == 2:
      os.kill(os.getpid(), signal.SIGTERM)   # arrives while batch 2 is being evaluated
    return accumulate(self, params, acc, batch)

  monkeypatch.setattr(evaluator_lib.Evaluator, "_accumulate", accumulate_then_signal)
  with pytest.raises(errors.Preempted, match="SIGTERM after step 12") as e:
    loop.train_and_evaluate(tiny_config(tiny_data_dir), str(run))
  assert e.value.exit_code == errors.EXIT_PREEMPTED == 143
  assert len(batches) == 2                     # no eval batch after the signal's
  assert not (run / "eval" / "12.json").exists()
  assert run_status.preempted(run)["step"] == 12 and not run_status.finished(run)
  monkeypatch.undo()

  # 4.
  result = loop.train_and_evaluate(tiny_config(tiny_data_dir), str(run))
  reference = evaluation.read_evals(tiny_run)[-1]
  assert result == reference == evaluation.read_evals(run)[-1]
  assert run_status.finished(run)["step"] == 12 and not run_status.preempted(run)
  timeless = lambda rows: [  # noqa: E731
      {k: v for k, v in r.items() if k not in performance.WALL_CLOCK_METRICS} for r in rows]
  assert timeless(evaluation.read_metrics(run)) == timeless(evaluation.read_metrics(tiny_run))
  ref, got = _saved_state(tiny_run, 12), _saved_state(run, 12)
  for a, b in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(got["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_saves_exits_143_and_marks_the_run_preempted(tiny_run, tiny_data_dir,
                                                             tmp_path):
  """main.py resumed from step 8 and sent SIGTERM as training starts: it saves step 9, writes
  PREEMPTED.json, prints one 'preempted:' line and no summary, and exits 143."""
  run = _copy_run(tiny_run, tmp_path / "run")
  shutil.rmtree(run / "checkpoints" / "12")
  (run / "eval" / "12.json").unlink()
  proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"),
                           f"--config={TINY}:{tiny_data_dir}", f"--workdir={run}"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if "Training steps 8..12" in line:
      proc.send_signal(signal.SIGTERM)
      break
  out, err = proc.communicate(timeout=600)
  err = "".join(seen) + err
  assert proc.returncode == 143, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  lines = [l for l in err.splitlines() if l.startswith(("preempted:", "error:"))]
  assert len(lines) == 1 and lines[0].startswith("preempted: SIGTERM after step 9 of 12")
  assert "macro-F1" not in out                  # the summary is for finished runs only
  marker = run_status.preempted(run)
  assert marker["step"] == 9 and marker["signal"] == "SIGTERM"
  assert not run_status.finished(run)
  assert "9" in _names(run)

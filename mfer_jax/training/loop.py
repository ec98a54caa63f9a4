"""The training loop: resume, step, log, evaluate, checkpoint, stop cleanly.

Each concern has its own module (state, step, checkpointing, observability, evaluation);
this file only orders them. Resume order: the workdir's latest checkpoint, else the config's
init files, else scratch.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from mfer_jax import console, errors, evaluation, files, sharding
from mfer_jax.data import pipeline, store
from mfer_jax.training import checkpointing, init_files, observability, optimizer, state as state_lib
from mfer_jax.training import step as step_lib


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """The loss or gradient became NaN/Inf; the message names the step and the last checkpoint."""


@dataclasses.dataclass
class Run:
  """Everything built once per run, shared by training and evaluation."""

  config: ConfigDict
  workdir: pathlib.Path
  mesh: Any
  spec: state_lib.ModelSpec
  tx: Any
  schedule: Any
  state: state_lib.TrainState
  state_sh: state_lib.TrainState
  total_steps: int
  steps_per_epoch: int
  train_iter: pipeline.TrainIterator
  eval_index: store.SplitIndex
  checkpointer: checkpointing.Checkpointer
  train_index: store.SplitIndex | None = None


def class_loss_weights(cfg: ConfigDict, label: np.ndarray, num_classes: int) -> np.ndarray:
  """Per-class loss weights from ``train.class_weights``, normalised to mean 1 over frames."""
  counts = np.bincount(label[label >= 0], minlength=num_classes).astype(np.float64)
  if cfg.class_weights == "none":
    return np.ones(num_classes, np.float32)
  power = {"inverse": 1.0, "inverse_sqrt": 0.5}.get(cfg.class_weights)
  if power is None:
    raise ValueError(f"train.class_weights={cfg.class_weights!r}: none | inverse | inverse_sqrt")
  w = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
  w = w / max((w * counts).sum() / max(counts.sum(), 1), 1e-12)
  return w.astype(np.float32)


def write_run_files(config: ConfigDict, workdir: pathlib.Path,
                    train_index: store.SplitIndex) -> None:
  """config.json, and features.json: the dataset's feature parameters, which prediction
  needs to build audio windows exactly as in training, even without the training data."""
  if jax.process_index() == 0:
    files.atomic_write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    files.atomic_write_json(workdir / "features.json", train_index.features)


def build_run(config: ConfigDict, workdir: str) -> Run:
  """Builds mesh, data, state (restored or initialised) and the checkpointer."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  train_index = store.load_split(config.data.data_dir, "train")
  write_run_files(config, workdir, train_index)
  eval_index = store.load_split(config.data.data_dir, config.train.eval_split)
  train_iter = pipeline.make_train_iterator(config.data, train_index)
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = config.train.num_epochs * steps_per_epoch
  if config.train.max_steps > 0:
    total_steps = min(total_steps, config.train.max_steps)
  tx, schedule = optimizer.make_optimizer(config.train, total_steps)
  spec = state_lib.ModelSpec(config.model)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                            async_save=config.train.async_checkpointing)
  latest = checkpointer.latest_step()
  if latest is not None:
    console.say(f"Resuming from {checkpointer.directory} step {latest}")
    state = checkpointer.restore(latest, state_lib.abstract_state(state_sh, spec, tx),
                                 train_iter)
  else:
    state = init_files.apply_init_files(config, spec, state)
  return Run(config, workdir, mesh, spec, tx, schedule, state, state_sh, total_steps,
             steps_per_epoch, train_iter, eval_index, checkpointer, train_index)


def evaluate(run: Run, params: Any, index: store.SplitIndex | None = None,
             max_examples: int = 0) -> dict[str, Any]:
  """macro-F1, per-class F1, accuracy, confusion and mean gates per class on one split
  (``max_examples`` > 0: on that many of its frames, evenly spaced)."""
  index = index or run.eval_index
  eval_pipe = pipeline.make_eval_pipeline(run.config.data, index, include_unlabelled=False,
                                          max_examples=max_examples)
  eval_step = None
  acc = step_lib.empty_eval_accumulator(run.config.model.num_classes, run.mesh)
  for local in eval_pipe:
    batch = pipeline.to_global_batch({k: local[k] for k in step_lib.BATCH_KEYS}, run.mesh)
    if eval_step is None:
      batch_sh = jax.tree.map(lambda x: x.sharding, batch)
      eval_step = step_lib.make_eval_step(run.spec, run.config, run.mesh, run.state_sh.params,
                                          batch_sh)
    acc = eval_step(params, acc, batch)
  acc = jax.device_get(acc)
  return evaluation.summarize(acc["confusion"], acc["gate_sum"])


def evaluate_with_train_subset(run: Run, params: Any) -> dict[str, Any]:
  """The eval split's evaluation, plus ``train_subset`` (macro-F1, accuracy, frames) on
  ``train.train_eval_examples`` train frames when that is > 0: the gap shows memorisation."""
  result = evaluate(run, params)
  n = int(run.config.train.train_eval_examples)
  if n > 0:
    on_train = evaluate(run, params, run.train_index, max_examples=n)
    result["train_subset"] = {k: on_train[k] for k in ("macro_f1", "accuracy", "num_examples")}
  return result


def _check_finite(state: state_lib.TrainState, run: Run) -> None:
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    last = run.checkpointer.latest_step()
    raise NonFiniteLossError(
        f"loss or gradient is NaN/Inf at step {bad}; training stopped and the parameters were "
        f"not updated from that step on. The last good checkpoint is "
        f"{'step ' + str(last) if last is not None else 'none'} in {run.checkpointer.directory}. "
        "Lower train.learning_rate, enable train.grad_clip_norm, or check the data.")


class _SigtermFlag:
  """Turns SIGTERM (preemption) into a flag the loop checks between steps."""

  def __init__(self):
    self.raised = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, Any] | None:
  """Trains ``config`` in ``workdir`` (resuming if possible) and returns the last eval."""
  run = build_run(config, workdir)
  cfg = config.train
  start = int(jax.device_get(run.state.step))
  if start >= run.total_steps:
    # A finished run (e.g. `make demo` twice): report its final evaluation, train nothing.
    run.checkpointer.close()
    run.train_iter.close()
    finished = [e for e in evaluation.read_evals(run.workdir) if e["step"] == start]
    console.say(f"{run.workdir} already finished its {run.total_steps} steps; "
                + ("its final evaluation:" if finished else "evaluating its final state."))
    return finished[-1] if finished else evaluate_with_train_subset(
        run, state_lib.eval_params(run.state))
  eval_every = cfg.eval_every_steps if cfg.eval_every_steps > 0 else run.steps_per_epoch
  label = np.asarray(store.load_split(config.data.data_dir, "train").label)
  weights = class_loss_weights(cfg, label, config.model.num_classes)
  writer = observability.MetricsWriter(run.workdir, resume_step=start)
  progress = observability.ProgressBar(run.total_steps, start)
  sigterm = _SigtermFlag()
  state, train_step, last_eval = run.state, None, None
  pending: list[dict[str, jax.Array]] = []
  t_log = time.monotonic()
  console.say(f"Training steps {start}..{run.total_steps} ({run.steps_per_epoch} per epoch) "
              f"on mesh {dict(run.mesh.shape)}, workdir {run.workdir}")
  try:
    for step in range(start, run.total_steps):
      local = next(run.train_iter)
      batch = pipeline.to_global_batch({k: local[k] for k in step_lib.BATCH_KEYS}, run.mesh)
      if train_step is None:
        batch_sh = jax.tree.map(lambda x: x.sharding, batch)
        train_step = step_lib.make_train_step(run.spec, run.tx, run.schedule, config, run.mesh,
                                              run.state_sh, batch_sh, weights)
      state, metrics = train_step(state, batch)
      pending.append(metrics)
      done = step + 1
      last = done == run.total_steps
      if done % cfg.log_every_steps == 0 or last or sigterm.raised:
        fetched = jax.device_get(pending)
        _check_finite(state, run)
        now = time.monotonic()
        row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]
               if k != "examples"}
        row["examples_per_second"] = sum(float(m["examples"]) for m in fetched) / (now - t_log)
        row["epoch"] = done / run.steps_per_epoch
        writer.write(done, row)
        progress.update(done, f"loss {row['loss']:.4f}")
        pending, t_log = [], now
      eval_metrics = None
      if done % eval_every == 0 or last:
        _check_finite(state, run)
        last_eval = evaluate_with_train_subset(run, state_lib.eval_params(state))
        if jax.process_index() == 0:
          evaluation.write_eval(run.workdir, done, last_eval)
        writer.scalars(done, {"macro_f1": last_eval["macro_f1"],
                              "accuracy": last_eval["accuracy"]}, "eval")
        on_train = last_eval.get("train_subset")
        console.say(f"step {done}: {cfg.eval_split} macro-F1 {last_eval['macro_f1']:.4f}"
                    + (f" (train subset {on_train['macro_f1']:.4f})" if on_train else ""))
        eval_metrics = {"macro_f1": last_eval["macro_f1"]}
        if config.data.sampling.adaptive_beta > 0:
          run.train_iter.set_class_f1(list(last_eval["per_class_f1"].values()))
        t_log = time.monotonic()
      if done % cfg.checkpoint_every_steps == 0 or eval_metrics or last or sigterm.raised:
        _check_finite(state, run)
        run.checkpointer.save(done, state, run.train_iter, metrics=eval_metrics,
                              force=sigterm.raised)
      if sigterm.raised:
        console.say(f"SIGTERM: saved a checkpoint at step {done} and stopped; rerun the same "
                    "command to resume.")
        break
  finally:
    progress.close()
    sigterm.restore()
    run.checkpointer.close()
    writer.close()
    run.train_iter.close()
  return last_eval


def evaluate_workdir(config: ConfigDict, workdir: str, which: str = "best") -> dict[str, Any]:
  """Evaluates a trained workdir's best (or latest) checkpoint and writes eval/<step>.json."""
  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"{ckpt_dir} not found: {workdir} has no checkpoint to evaluate; "
                            "train first with --mode=train")
  run = build_run(config, workdir)
  step = run.checkpointer.best_step() if which == "best" else None
  step = step if step is not None else run.checkpointer.latest_step()
  state = run.checkpointer.restore_state_only(
      step, state_lib.abstract_state(run.state_sh, run.spec, run.tx))
  result = evaluate(run, state_lib.eval_params(state))
  if jax.process_index() == 0:
    evaluation.write_eval(run.workdir, step, result)
  run.checkpointer.close()
  run.train_iter.close()
  return {"step": step, **result}

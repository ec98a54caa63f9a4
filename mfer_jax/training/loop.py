"""The training loop: resume, step, log, evaluate, checkpoint, stop cleanly.

Each concern has its own module (state, step, evaluator, checkpointing, preemption,
run_status, observability); this file only orders them.

* Resume order: the workdir's newest readable checkpoint (damaged ones are moved aside,
  `checkpointing`), else the config's init files, else scratch.
* A step that is evaluated is evaluated first, then checkpointed with the primary
  evaluator's macro-F1 (Orbax keeps the best). If its evaluation cannot finish (a damaged eval
  shard, a stop request), the step's checkpoint is saved first anyway, so no training is
  lost, and a resumed run evaluates that step before it trains on.
* SIGTERM/SIGINT (`preemption.StopRequest`): the loop saves the checkpoint of the last
  finished step, writes the PREEMPTED marker and raises `errors.Preempted` (exit 143) within
  one train step or one eval batch. A finished run writes the FINISHED marker
  (`run_status`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from mfer_jax import accelerators, config_lib, console, errors, evaluation, files, sharding
from mfer_jax.data import pipeline, sources
from mfer_jax.training import checkpointing, evaluator as evaluator_lib, init_files
from mfer_jax.training import observability, optimizer, performance, preemption, run_status
from mfer_jax.training import state as state_lib
from mfer_jax.training import step as step_lib


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """The loss or gradient became NaN/Inf; the message names the step and the last checkpoint."""


@dataclasses.dataclass
class Run:
  """Everything built once per training run."""

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
  class_weights: np.ndarray
  evaluators: dict[str, evaluator_lib.Evaluator]   # primary first
  checkpointer: checkpointing.Checkpointer

  @property
  def primary(self) -> str:
    return next(iter(self.evaluators))

  def close(self) -> None:
    self.checkpointer.close()
    self.train_iter.close()


def class_loss_weights(cfg: ConfigDict, label: np.ndarray, num_classes: int) -> np.ndarray:
  """Per-class loss weights from ``train.class_weights``, normalised to mean 1 over frames."""
  counts = np.bincount(label[label >= 0], minlength=num_classes).astype(np.float64)
  if cfg.class_weights == "none":
    return np.ones(num_classes, np.float32)
  power = {"inverse": 1.0, "inverse_sqrt": 0.5}.get(cfg.class_weights)
  if power is None:
    raise errors.UsageError(f"train.class_weights={cfg.class_weights!r}: choose none, inverse "
                            "or inverse_sqrt")
  w = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
  w = w / max((w * counts).sum() / max(counts.sum(), 1), 1e-12)
  return w.astype(np.float32)


def write_run_files(config: ConfigDict, workdir: pathlib.Path,
                    train_index: sources.SplitSource) -> None:
  """config.json, and features.json: the dataset's feature parameters, which prediction
  needs to build audio windows exactly as in training, even without the training data."""
  if jax.process_index() == 0:
    files.atomic_write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    files.atomic_write_json(workdir / "features.json", train_index.features)


def _check_feature_cache(config: ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses a cache made with other encoders, weights or parameters than the config names,
  or lacking a split the run reads, and keeps what made it beside the run (prediction checks
  the encoders against it)."""
  from mfer_jax.features import cache  # pylint: disable=g-import-not-at-top
  splits = ("train", *(e.split for e in evaluator_lib.specs_from_config(config).values()))
  meta = cache.check_config(config, splits)
  if jax.process_index() == 0:
    files.atomic_write_json(workdir / "feature_cache.json",
                            {k: meta[k] for k in ("spec", "spec_hash", "weights", "dims")})


def build_run(config: ConfigDict, workdir: str) -> Run:
  """Builds mesh, data, evaluators, state (restored or initialised) and the checkpointer."""
  config_lib.validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  train_index = sources.load_split(config.data, "train")
  if config.data.features_dir:   # refused before anything is built or compiled
    _check_feature_cache(config, workdir)
  weights = class_loss_weights(config.train, np.asarray(train_index.label),
                               config.model.num_classes)
  train_iter = pipeline.make_train_iterator(config.data, train_index)
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = config.train.num_epochs * steps_per_epoch
  if config.train.max_steps > 0:
    total_steps = min(total_steps, config.train.max_steps)
  tx, schedule = optimizer.make_optimizer(config.train, total_steps)
  spec = state_lib.ModelSpec(config.model, from_features=bool(config.data.features_dir))
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  # Every eval split is opened and checked now, not at the first evaluation.
  evaluators = evaluator_lib.build_evaluators(config, mesh, spec, state_sh.params)
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                            async_save=config.train.async_checkpointing)
  restored = checkpointer.restore_newest_good(state_lib.abstract_state(state_sh, spec, tx),
                                              train_iter)
  # After the restore: a resume with another model (another temporal head, say) stops with
  # CheckpointMismatchError and leaves the run's config.json as it was trained.
  write_run_files(config, workdir, train_index)
  if restored is not None:
    console.say(f"Resuming from {checkpointer.directory} step {restored.step}")
    state = restored.state
  else:
    state = init_files.apply_init_files(config, spec, state)
  return Run(config, workdir, mesh, spec, tx, schedule, state, state_sh, total_steps,
             steps_per_epoch, train_iter, weights, evaluators, checkpointer)


def compile_train_step(run: Run, state: state_lib.TrainState, batch: dict[str, jax.Array],
                       weights: np.ndarray) -> tuple[Any, float]:
  """Compiles the train step ahead of time for ``batch``'s shapes.

  Returns:
    (the compiled step, model FLOPs per step per device). With remat on, the FLOPs are those
    of the same step lowered without remat, so recomputation is not counted as useful work.
  """
  t0 = time.monotonic()
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)

  def build(spec, config):
    return step_lib.make_train_step(spec, run.tx, run.schedule, config, run.mesh, run.state_sh,
                                    batch_sh, weights)

  compiled = build(run.spec, run.config).lower(state, batch).compile()
  if run.config.model.remat == "none":
    flops = performance.cost_flops(compiled)
  else:
    plain = run.config.copy_and_resolve_references()
    plain.model.remat = "none"
    spec = state_lib.ModelSpec(plain.model, precision=run.spec.precision,
                               from_features=run.spec.from_features)
    flops = performance.cost_flops(build(spec, plain).lower(state, batch)) / jax.device_count()
  kind = jax.devices()[0].device_kind
  acc = accelerators.for_device_kind(kind)
  console.say(f"Compiled the train step in {time.monotonic() - t0:.1f} s: "
              f"{flops / 1e12:.3f} TFLOP per step per device; "
              + (f"MFU against {acc.label}'s {acc.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 peak"
                 if acc else f"no MFU ({kind!r} is not in mfer_jax/accelerators.py)"))
  return compiled, flops


def _check_finite(state: state_lib.TrainState, run: Run) -> None:
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    last = run.checkpointer.latest_step()
    raise NonFiniteLossError(
        f"loss or gradient is NaN/Inf at step {bad}; training stopped and the parameters were "
        f"not updated from that step on. The last good checkpoint is "
        f"{'step ' + str(last) if last is not None else 'none'} in {run.checkpointer.directory}. "
        "Lower train.learning_rate, enable train.grad_clip_norm, or check the data.")


def _read_eval(workdir: pathlib.Path, step: int, name: str | None) -> dict[str, Any] | None:
  """The eval JSON of ``step``, or None if missing or unreadable (then it is redone)."""
  try:
    result = json.loads((evaluation.eval_dir(workdir, name) / f"{step}.json").read_text())
    evaluation.check_eval(result, step)
    return result
  except (OSError, ValueError):
    return None


class _Stopped(Exception):
  """An evaluation was stopped by a stop request (internal to the loop)."""


def _evaluate(run: Run, state: state_lib.TrainState, step: int,
              names: list[str], writer: observability.MetricsWriter,
              stop: preemption.StopRequest) -> dict[str, Any] | None:
  """Runs the evaluators ``names`` at ``step`` and writes their JSONs.

  The primary evaluator's F1 feeds adaptive resampling. If an evaluation fails or is
  stopped, the step's checkpoint is saved before the error propagates (`_Stopped` for a
  stop), so the run resumes from this step, not from an older one.

  Returns:
    The primary evaluator's result with its step, if it ran.
  """
  primary_result = None
  for name in names:
    primary = name == run.primary
    try:
      result = run.evaluators[name](state_lib.eval_params(state), should_stop=stop)
      if result is None:
        raise _Stopped()
    except Exception:
      # Nothing is lost: the checkpoint comes first, the evaluation is redone on resume.
      if run.checkpointer.save_if_absent(step, state, run.train_iter):
        console.say(f"step {step}: saved a checkpoint before stopping; the {name} evaluation "
                    "of this step runs first when the run resumes")
      raise
    result = {"step": step, **result}
    if jax.process_index() == 0:
      evaluation.write_eval(run.workdir, step, result, None if primary else name)
    spec = run.evaluators[name].spec
    writer.scalars(step, {m: result[m] for m in spec.metrics}, f"eval/{name}")
    console.say(f"step {step}: {name} " + ", ".join(f"{m} {result[m]:.4f}" for m in spec.metrics))
    if primary:
      primary_result = result
      if run.config.data.sampling.adaptive_beta > 0:
        run.train_iter.set_class_f1(list(result["per_class_f1"].values()))
  return primary_result


def _preempt(run: Run, step: int, stop: preemption.StopRequest) -> errors.Preempted:
  """Waits for the checkpoint of ``step``, writes the PREEMPTED marker, returns the error."""
  run.checkpointer.wait()
  run_status.mark_preempted(run.workdir, step, stop.signal_name or "stop request")
  saved = (f"saved checkpoint {run.checkpointer.directory / str(step)}" if step > 0
           else "nothing trained yet")
  return errors.Preempted(f"{stop.signal_name} after step {step} of {run.total_steps}: "
                          f"{saved}; rerun the same command to resume")


def _finish(run: Run, step: int, result: dict[str, Any]) -> dict[str, Any]:
  run.checkpointer.wait()
  run_status.mark_finished(run.workdir, step, result)
  return result


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming if possible); returns the final evaluation.

  Raises:
    errors.Preempted: SIGTERM/SIGINT stopped the run after saving (exit 143).
    errors.UserError: data, checkpoint or NaN errors, each with its one-line message.
  """
  # Installed first, so a signal while the run is built (restore, compile) also ends in 143.
  with preemption.StopRequest() as stop:
    run = build_run(config, workdir)
    try:
      return _train(run, stop)
    finally:
      run.close()


def _train(run: Run, stop: preemption.StopRequest) -> dict[str, Any]:
  start = int(jax.device_get(run.state.step))
  run_status.clear(run.workdir)
  due_at = lambda step: [n for n, e in run.evaluators.items()  # noqa: E731
                         if e.spec.due(step, run.steps_per_epoch, run.total_steps)]
  # Evaluations of the restored step that an interrupted run did not finish come first.
  missing = [n for n in due_at(start)
             if _read_eval(run.workdir, start, None if n == run.primary else n) is None]
  writer = observability.MetricsWriter(run.workdir, resume_step=start)
  state = run.state
  try:
    if stop.requested:
      raise _preempt(run, start, stop)
    last_result = _read_eval(run.workdir, start, None) if start >= run.total_steps else None
    if missing:
      try:
        result = _evaluate(run, state, start, missing, writer, stop)
      except _Stopped:
        raise _preempt(run, start, stop) from None
      last_result = result or last_result
    if start >= run.total_steps:
      # A finished run (e.g. `make demo` twice): report its final evaluation, train nothing.
      console.say(f"{run.workdir} already finished its {run.total_steps} steps.")
      return _finish(run, start, last_result)
    return _train_steps(run, state, start, writer, stop)
  finally:
    writer.close()


def _train_steps(run: Run, state: state_lib.TrainState, start: int,
                 writer: observability.MetricsWriter,
                 stop: preemption.StopRequest) -> dict[str, Any]:
  cfg = run.config.train
  progress = observability.ProgressBar(run.total_steps, start)
  profile = performance.ProfileWindow(cfg.profile_steps, run.workdir)
  train_step, timer = None, None
  pending: list[dict[str, jax.Array]] = []
  console.say(f"Training steps {start}..{run.total_steps} ({run.steps_per_epoch} per epoch) "
              f"on mesh {dict(run.mesh.shape)}, workdir {run.workdir}")
  try:
    for step in range(start, run.total_steps):
      t_wait = time.monotonic()
      local = next(run.train_iter)
      batch = pipeline.to_global_batch(step_lib.model_inputs(local), run.mesh)
      if train_step is None:
        train_step, flops = compile_train_step(run, state, batch, run.class_weights)
        timer = performance.StepTimer(flops, jax.devices()[0].device_kind)
      else:
        timer.add_wait(time.monotonic() - t_wait)
      profile.before_step(step)
      with jax.transfer_guard("disallow"):  # an implicit host<->device copy is a bug
        state, metrics = train_step(state, batch)
      timer.add_step()
      profile.after_step(step, state)
      pending.append(metrics)
      done = step + 1
      last = done == run.total_steps
      if done % cfg.log_every_steps == 0 or last or stop.requested:
        fetched = jax.device_get(pending)
        _check_finite(state, run)
        row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]
               if k != "examples"}
        row.update(timer.row())
        row["examples_per_second"] = (sum(float(m["examples"]) for m in fetched)
                                      / (row["step_time_s"] * len(fetched)))
        row["epoch"] = done / run.steps_per_epoch
        writer.write(done, row)
        progress.update(done, f"loss {row['loss']:.4f}")
        if row["data_wait_fraction"] > performance.INPUT_BOUND_FRACTION:
          progress.warn_once(
              "input_bound", f"input-bound: the loop waited for data "
              f"{row['data_wait_fraction']:.0%} of the time (steps {done - len(fetched)}.."
              f"{done}); raise data.num_workers or data.read_threads (bench/pipeline.py "
              "measures the pipeline alone)")
        pending = []
      due = [] if stop.requested else [
          n for n, e in run.evaluators.items()
          if e.spec.due(done, run.steps_per_epoch, run.total_steps)]
      result = None
      if due:
        _check_finite(state, run)
        try:
          result = _evaluate(run, state, done, due, writer, stop)
        except _Stopped:
          raise _preempt(run, done, stop) from None
        timer.reset()   # evaluation time is neither data wait nor compute
      if (done % cfg.checkpoint_every_steps == 0 or due or last or stop.requested):
        _check_finite(state, run)
        run.checkpointer.save(done, state, run.train_iter, force=stop.requested,
                              metrics=({"macro_f1": result["macro_f1"]} if result else None))
      if last and result is not None:   # (a stop during the last step defers its evaluation)
        return _finish(run, done, result)
      if stop.requested:
        raise _preempt(run, done, stop)
  finally:
    profile.stop(state)
    progress.close()
  raise AssertionError("unreachable: the loop returns at its last step")


def evaluate_workdir(config: ConfigDict, workdir: str, which: str = "best") -> dict[str, Any]:
  """``--mode=eval``: evaluates a workdir's best (or latest) readable checkpoint.

  Reads only the primary evaluator's split (not the train split) and writes nothing but its
  result, ``checkpoints/<step>/eval_<name>.json``, beside the checkpoint it evaluated: the
  run's config.json and eval/ are left as training wrote them.

  Returns:
    The evaluation with its ``step`` and ``path``.
  """
  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    raise checkpointing.CheckpointError(
        f"{ckpt_dir} not found: {workdir} has no checkpoint to evaluate; train first with "
        "--mode=train")
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  name = config.train.primary_eval
  features_dir = bool(config.data.features_dir)
  if features_dir:   # the head reads cached features: they must be the run's
    from mfer_jax.features import cache  # pylint: disable=g-import-not-at-top
    cache.check_config(config, (evaluator_lib.specs_from_config(config)[name].split,))
  spec = state_lib.ModelSpec(config.model, from_features=features_dir)
  tx, _ = optimizer.make_optimizer(config.train, 1)   # the state's structure, for restoring
  state_sh = state_lib.state_shardings(spec, tx, mesh, config.mesh.rules,
                                      ema=state_lib.uses_ema(config.train))
  evaluator = evaluator_lib.build_evaluators(config, mesh, spec, state_sh.params, only=name)[name]
  checkpointer = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    restored = checkpointing.restore_required(
        checkpointer, state_lib.abstract_state(state_sh, spec, tx), prefer_best=which == "best")
  finally:
    checkpointer.close()
  with preemption.StopRequest() as stop:
    result = evaluator(state_lib.eval_params(restored.state), should_stop=stop)
  if result is None:
    raise errors.Preempted(f"{stop.signal_name} during the evaluation of step {restored.step}; "
                           "nothing was written, rerun the same command")
  result = {"step": restored.step, **result}
  path = ckpt_dir / str(restored.step) / f"eval_{name}.json"
  if jax.process_index() == 0:
    files.atomic_write_json(path, result, sort_keys=False)
  return {**result, "path": str(path)}

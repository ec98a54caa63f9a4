"""Evaluators, built once per run from ``config.evals`` (big_vision's habit).

Each `Evaluator` owns what is costly to make: the eval pipeline of its split (every shard
opened and checked once) and the jitted eval step (traced once, on the first batch). A run
builds them before training starts, and every evaluation of the run reuses them.

An evaluator returns the summary of `mfer_jax.evaluation.summarize`: macro-F1, accuracy,
per-class F1 and support, the confusion matrix and mean modality gates per true class. The
sums behind it are accumulated on device, batch by batch (`step.make_eval_step`): padded rows
count nothing, and every labelled frame counts exactly once whatever the number of devices or
hosts. Between batches it polls ``should_stop`` (a SIGTERM, say): a stopped evaluation
returns None and is never written, so a partial result cannot pass for a whole one.

Temporal runs (``data.sequence.length`` T > 1) get a `WindowEvaluator`: the split is covered
by sliding windows of T frames with ``data.sequence.hop`` (`mfer_jax.data.clips.windows`), the
logits of a frame are summed on device over the windows that cover it, and each labelled
frame is scored once, from its averaged logits. Macro-F1 stays frame-level.

To extend (a per-video evaluator, say), subclass `Evaluator` and override the accumulator
hooks (`_empty_accumulator`, `_make_step`, `_global_batch`, `_summarize`), keeping the
once-per-run construction.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from mfer_jax import constants, errors, evaluation
from mfer_jax.data import pipeline, sources
from mfer_jax.training import step as step_lib
from mfer_jax.training.state import ModelSpec

# Numbers of the summary an evaluator may log as scalars (config.evals.<name>.metrics).
SCALAR_METRICS = ("macro_f1", "accuracy")


class EvalConfigError(errors.UsageError):
  """A ``config.evals`` entry or ``train.primary_eval`` that cannot be used."""


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """One entry of ``config.evals`` (see `mfer_jax.config_lib.evaluator`)."""

  name: str
  split: str
  every_steps: int
  max_examples: int
  metrics: tuple[str, ...]

  def due(self, step: int, steps_per_epoch: int, last_step: int) -> bool:
    """Whether this evaluator runs after train step ``step`` (1-based count of steps done)."""
    every = self.every_steps if self.every_steps > 0 else steps_per_epoch
    return step == last_step or (step > 0 and step % every == 0)


def specs_from_config(config: ConfigDict) -> dict[str, EvalSpec]:
  """The checked ``config.evals`` entries by name; the primary one comes first.

  Raises:
    EvalConfigError: an unknown split or metric, a missing key, or ``train.primary_eval``
      naming no entry.
  """
  specs = {}
  for name, entry in config.evals.items():
    where = f"config.evals.{name}"
    missing = [k for k in ("split", "every_steps", "max_examples", "metrics")
               if k not in entry]
    if missing:
      raise EvalConfigError(f"{where} lacks {missing}; build entries with "
                            "config_lib.evaluator(split, ...)")
    if entry.split not in constants.SPLITS:
      raise EvalConfigError(f"{where}.split={entry.split!r}: choose one of {constants.SPLITS}")
    bad = [m for m in entry.metrics if m not in SCALAR_METRICS]
    if bad:
      raise EvalConfigError(f"{where}.metrics has {bad}: choose from {SCALAR_METRICS}")
    specs[name] = EvalSpec(name, entry.split, int(entry.every_steps), int(entry.max_examples),
                           tuple(entry.metrics))
  primary = config.train.primary_eval
  if primary not in specs:
    raise EvalConfigError(f"train.primary_eval={primary!r} names no entry of config.evals "
                          f"(it has {sorted(specs)})")
  return {primary: specs[primary], **{k: v for k, v in specs.items() if k != primary}}


class Evaluator:
  """One evaluation (a split, or a fixed subset of it) of a run's model, built once.

  Args:
    spec: what to evaluate.
    config: the run's config (data settings, model.num_classes, mesh rules).
    mesh: the run's mesh; batches are sharded over its data axes.
    model_spec: the model's static half.
    param_shardings: shardings of the params (the eval step's input shardings).
    index: the split's index if the caller already loaded it.

  Attributes:
    spec: the EvalSpec.
    num_examples: labelled frames evaluated (over all hosts; with clips, the frames the
      windows score, not the windows).
  """

  def __init__(self, spec: EvalSpec, config: ConfigDict, mesh: Mesh, model_spec: ModelSpec,
               param_shardings: Any, index: sources.SplitSource | None = None):
    self.spec = spec
    self._config = config
    self._mesh = mesh
    self._model_spec = model_spec
    self._param_shardings = param_shardings
    index = index if index is not None else sources.load_split(config.data, spec.split)
    self._index = index
    self._pipeline = pipeline.make_eval_pipeline(config.data, index, include_unlabelled=False,
                                                 max_examples=spec.max_examples)
    self.num_examples = self._pipeline.num_records
    self._step: Callable | None = None

  @property
  def traces(self) -> int:
    """How many times the eval step was traced (1 after any number of evaluations)."""
    return self._step.traces() if self._step is not None else 0

  # Accumulator hooks: the frame evaluator's; `WindowEvaluator` overrides them.

  def _empty_accumulator(self) -> Any:
    return step_lib.empty_eval_accumulator(self._config.model.num_classes, self._mesh)

  def _make_step(self, batch_sh: Any) -> Callable:
    return step_lib.make_eval_step(self._model_spec, self._config, self._mesh,
                                   self._param_shardings, batch_sh)

  def _global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return pipeline.to_global_batch(step_lib.model_inputs(local), self._mesh)

  def _eval_step(self, batch: Mapping[str, jax.Array]) -> Callable:
    if self._step is None:
      self._step = self._make_step(jax.tree.map(lambda x: x.sharding, dict(batch)))
    return self._step

  def _accumulate(self, params: Any, acc: Any, batch: Mapping[str, jax.Array]) -> Any:
    step = self._eval_step(batch)
    with jax.transfer_guard("disallow"):  # an implicit host<->device copy is a bug
      return step(params, acc, batch)

  def _summarize(self, acc: Any) -> dict[str, Any]:
    acc = jax.device_get(acc)
    return evaluation.summarize(acc["confusion"], acc["gate_sum"])

  def __call__(self, params: Any,
               should_stop: Callable[[], bool] | None = None) -> dict[str, Any] | None:
    """Evaluates ``params``; None if ``should_stop()`` turned True before the last batch."""
    acc = self._empty_accumulator()
    with contextlib.closing(iter(self._pipeline)) as batches:
      for local in batches:
        if should_stop is not None and should_stop():
          return None
        acc = self._accumulate(params, acc, self._global_batch(local))
    return self._summarize(acc)


class WindowEvaluator(Evaluator):
  """The evaluator of a temporal run: sliding windows, every labelled frame scored once.

  The eval pipeline's examples are windows of T frames whose starts are ``hop`` frames apart
  (`mfer_jax.data.clips.windows`; the ends are padded and masked). The eval step adds each
  scored slot's logits and gates to its record's row of an on-device [records, C]
  accumulator (`step.make_window_eval_step`); a frame covered by several windows is then
  predicted from its averaged logits, and counted once in the confusion matrix, whatever the
  number of windows, devices or hosts. Built and traced once per run, like `Evaluator`.
  """

  def _empty_accumulator(self) -> Any:
    return step_lib.empty_window_accumulator(len(self._index), self._config.model.num_classes,
                                             self._mesh)

  def _make_step(self, batch_sh: Any) -> Callable:
    return step_lib.make_window_eval_step(self._model_spec, self._config, self._mesh,
                                          self._param_shardings, batch_sh)

  def _global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return pipeline.to_global_batch({**step_lib.model_inputs(local), "index": local["index"]},
                                    self._mesh)

  def _summarize(self, acc: Any) -> dict[str, Any]:
    totals = step_lib.summarize_windows(acc, np.asarray(self._index.label))
    return evaluation.summarize(totals["confusion"], totals["gate_sum"])


def make_evaluator(spec: EvalSpec, config: ConfigDict, mesh: Mesh, model_spec: ModelSpec,
                   param_shardings: Any, index: sources.SplitSource | None = None) -> Evaluator:
  """A `WindowEvaluator` for clips (``data.sequence.length`` > 1), else an `Evaluator`."""
  cls = WindowEvaluator if int(config.data.sequence.length) > 1 else Evaluator
  return cls(spec, config, mesh, model_spec, param_shardings, index)


def build_evaluators(config: ConfigDict, mesh: Mesh, model_spec: ModelSpec,
                     param_shardings: Any, *, only: str | None = None) -> dict[str, Evaluator]:
  """Every evaluator of ``config.evals`` (or just ``only``), primary first, built once."""
  specs = specs_from_config(config)
  if only is not None:
    specs = {only: specs[only]}
  return {name: make_evaluator(spec, config, mesh, model_spec, param_shardings)
          for name, spec in specs.items()}

"""Evaluation: the ABAW metric (macro-F1 over all 8 classes) and what explains it.

The metric is computed from a confusion matrix so that it can be accumulated on device over
any number of hosts and batches (see `mfer_jax.training.step.make_eval_step`).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable

import numpy as np

from mfer_jax import errors
from mfer_jax.constants import CLASS_NAMES
from mfer_jax.files import atomic_write_json


def f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
  """Per-class F1 from a confusion matrix (rows = true, columns = predicted).

  A class with no true and no predicted examples gets F1 0, like scikit-learn's
  ``f1_score(average=None, labels=range(C), zero_division=0)``; ABAW averages over all 8
  classes whether or not a split contains them.
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  support = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  denom = support + predicted
  return np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)


def confusion_matrix(labels: Iterable[int], preds: Iterable[int], num_classes: int) -> np.ndarray:
  """Confusion matrix from label and prediction sequences (labels < 0 are ignored)."""
  labels, preds = np.asarray(labels), np.asarray(preds)
  keep = labels >= 0
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels[keep], preds[keep]), 1)
  return cm


def summarize(confusion: np.ndarray, gate_sum: np.ndarray | None = None,
              class_names=CLASS_NAMES) -> dict[str, Any]:
  """All evaluation numbers as a JSON-ready dict.

  Returns:
    {"macro_f1", "accuracy", "per_class_f1": {name: f1}, "support": {name: n},
     "confusion": [[...]], "gate_mean": {name: [visual, audio]} (when gate_sum is given),
     "num_examples"}.
  """
  confusion = np.asarray(confusion, np.float64)
  f1 = f1_from_confusion(confusion)
  support = confusion.sum(axis=1)
  total = confusion.sum()
  out = {
      "macro_f1": float(f1.mean()),
      "accuracy": float(np.trace(confusion) / total) if total else 0.0,
      "per_class_f1": {n: float(v) for n, v in zip(class_names, f1)},
      "support": {n: int(v) for n, v in zip(class_names, support)},
      "confusion": confusion.astype(np.int64).tolist(),
      "num_examples": int(total),
  }
  if gate_sum is not None:
    gate_sum = np.asarray(gate_sum, np.float64)
    means = gate_sum / np.maximum(support[:, None], 1)
    out["gate_mean"] = {n: [float(a), float(b)] for n, (a, b) in zip(class_names, means)}
  return out


class EvalFileError(errors.UserError, ValueError):
  """An eval JSON that cannot be read; the message names it and how to rewrite it."""


def eval_dir(workdir: str | os.PathLike, name: str | None = None) -> pathlib.Path:
  """``eval/`` for the primary evaluator (name None), ``eval/<name>/`` for the others."""
  path = pathlib.Path(workdir) / "eval"
  return path / name if name else path


def write_eval(workdir: str | os.PathLike, step: int, result: dict[str, Any],
               name: str | None = None) -> pathlib.Path:
  """Writes ``eval/<step>.json`` (or ``eval/<name>/<step>.json``) atomically; returns it."""
  path = eval_dir(workdir, name) / f"{step}.json"
  # Unsorted: per-class entries stay in class-index order.
  atomic_write_json(path, {"step": int(step), **result}, sort_keys=False)
  return path


def read_evals(workdir: str | os.PathLike, name: str | None = None) -> list[dict[str, Any]]:
  """All eval JSONs of a workdir (of the primary evaluator, or of ``name``), by step.

  Raises:
    EvalFileError: a file that is not JSON, or not an eval of its step (they are written
      atomically, so it was damaged after the fact).
  """
  paths = sorted((p for p in eval_dir(workdir, name).glob("*.json") if p.stem.isdigit()),
                 key=lambda p: int(p.stem))
  out = []
  for p in paths:
    try:
      result = json.loads(p.read_text())
      check_eval(result, int(p.stem))
    except (OSError, ValueError) as e:
      raise EvalFileError(f"{p} cannot be read ({type(e).__name__}: {e}); delete it, and "
                          "rerun `python main.py ... --mode=eval` to evaluate a checkpoint "
                          "again") from e
    out.append(result)
  return out


def check_eval(result: Any, step: int) -> None:
  """Raises ValueError unless ``result`` is an eval of ``step``: a JSON object with the
  ``step`` and numeric ``macro_f1`` and ``accuracy`` that every reader of evals uses (a file
  whose bytes were overwritten can still parse)."""
  if not isinstance(result, dict):
    raise ValueError(f"a JSON {type(result).__name__}, not an evaluation result (an object)")
  if result.get("step") != step or isinstance(result.get("step"), bool):
    raise ValueError(f"its step is {result.get('step')!r}, not {step}")
  bad = [k for k in ("macro_f1", "accuracy") if not isinstance(result.get(k), (int, float))
         or isinstance(result.get(k), bool)]
  if bad:
    raise ValueError(f"{', '.join(bad)} missing or not a number")


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of a workdir's ``metrics.jsonl`` ([] when missing).

  A line cut short by a kill in mid-write is skipped: the resumed run rewrites it.
  """
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  return rows


def format_summary(result: dict[str, Any]) -> str:
  """A readable multi-line table of per-class F1, support and gate weights."""
  lines = [f"macro-F1 {result['macro_f1']:.4f}   accuracy {result['accuracy']:.4f}   "
           f"({result['num_examples']} frames)",
           f"{'class':<10} {'F1':>7} {'support':>8}" + ("   gate visual/audio"
                                                       if "gate_mean" in result else "")]
  for name in result["per_class_f1"]:
    line = f"{name:<10} {result['per_class_f1'][name]:>7.4f} {result['support'][name]:>8d}"
    if "gate_mean" in result:
      v, a = result["gate_mean"][name]
      line += f"   {v:.2f} / {a:.2f}"
    lines.append(line)
  return "\n".join(lines)

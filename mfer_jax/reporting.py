"""Plots and a markdown summary of one trained run: where the model fails and how it trained.

  python -m mfer_jax.tools.report --workdir=runs/demo             # best eval, into runs/demo/report/
  python -m mfer_jax.tools.report --workdir=runs/demo --step=600 --out=/tmp/demo_report

Reads only the workdir contract (docs/design.md): ``eval/<step>.json``, ``metrics.jsonl`` and
``config.json``; no checkpoint is loaded and no device is used. Writes, each atomically:

  confusion.png        confusion matrix, counts and row-normalised (recall per true class)
  per_class_f1.png     per-class F1 with the macro-F1 line
  training_curves.png  loss, learning rate, grad norm, examples/s, validation macro-F1
  gates.png            mean modality gate weights (visual / audio) per true class
  report.md            summary table linking the plots

The eval shown is the best by validation macro-F1 unless ``--step`` picks one.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
from typing import Any, Sequence

import numpy as np
# The Figure API with the Agg canvas: no pyplot global state and no display backend, so this
# works on headless machines and never switches the backend of a caller's session.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mfer_jax import constants, errors, evaluation
from mfer_jax.files import atomic_write_bytes

PLOTS = {
    "confusion": "confusion.png",
    "per_class_f1": "per_class_f1.png",
    "training_curves": "training_curves.png",
    "gates": "gates.png",
}
# metrics.jsonl keys drawn as training curves, with their axis titles.
CURVES = (("loss", "training loss"), ("learning_rate", "learning rate"),
          ("grad_norm", "gradient norm"), ("examples_per_second", "examples / s"))
FIXED_GATES = constants.FIXED_GATE_FUSIONS


class ReportError(errors.UserError, FileNotFoundError):
  """The workdir cannot be reported on; the message says why and what to do."""


# Kept as the report's name for it; the reading itself lives beside read_evals.
load_metrics = evaluation.read_metrics


def load_evals(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """All evals of a workdir by step; ReportError when there are none."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise ReportError(f"workdir {workdir} does not exist; pass the --workdir of a training run "
                      "(python main.py --config=... --workdir=...)")
  evals = evaluation.read_evals(workdir)
  if not evals:
    raise ReportError(f"{workdir}/eval/ has no <step>.json: the run has not been evaluated yet. "
                      "Train until the first evaluation, or run main.py with --mode=eval.")
  return evals


def pick_eval(evals: Sequence[dict[str, Any]], step: int | None = None) -> dict[str, Any]:
  """The eval at ``step``, or the best by macro-F1 (ties go to the later step)."""
  if step is None:
    return max(evals, key=lambda e: (e["macro_f1"], e["step"]))
  for e in evals:
    if e["step"] == step:
      return e
  raise ReportError(f"no eval at step {step}; evaluated steps: {[e['step'] for e in evals]}")


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
  FigureCanvasAgg(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  atomic_write_bytes(path, buf.getvalue())
  return path


def plot_confusion(result: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """Counts and row-normalised confusion side by side (rows = true class)."""
  names = list(result["per_class_f1"])
  cm = np.asarray(result["confusion"], np.float64)
  rows = cm.sum(axis=1, keepdims=True)
  # Classes absent from the split get an all-zero row instead of NaNs.
  norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
  fig = Figure(figsize=(13, 5.5), layout="constrained")
  for ax, data, title, fmt in ((fig.add_subplot(1, 2, 1), cm, "counts", "{:.0f}"),
                               (fig.add_subplot(1, 2, 2), norm, "row-normalised (recall)",
                                "{:.2f}")):
    im = ax.imshow(data, cmap="Blues", vmin=0, vmax=max(data.max(), 1e-12))
    ax.set_title(f"confusion, {title}")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = data.max() / 2
    for i in range(data.shape[0]):
      for j in range(data.shape[1]):
        ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=7,
                color="white" if data[i, j] > threshold else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  return _save(fig, path)


def plot_per_class_f1(result: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """Per-class F1 bars with support under each name and the macro-F1 as a line."""
  names = list(result["per_class_f1"])
  f1 = [result["per_class_f1"][n] for n in names]
  support = [result["support"][n] for n in names]
  fig = Figure(figsize=(8, 4.5), layout="constrained")
  ax = fig.add_subplot()
  # Classes with no validation frames still count (as F1 0) in ABAW's macro average: grey them.
  colors = ["tab:blue" if s > 0 else "lightgrey" for s in support]
  bars = ax.bar(range(len(names)), f1, color=colors)
  ax.bar_label(bars, [f"{v:.2f}" for v in f1], fontsize=8)
  ax.axhline(result["macro_f1"], color="tab:red", linestyle="--",
             label=f"macro-F1 {result['macro_f1']:.4f}")
  ax.set_xticks(range(len(names)), [f"{n}\nn={s}" for n, s in zip(names, support)], fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("F1")
  ax.set_title(f"per-class F1 at step {result['step']} (grey: no frames in the split)")
  ax.legend(loc="upper right")
  return _save(fig, path)


def plot_training_curves(metrics: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]],
                         path: pathlib.Path) -> pathlib.Path:
  """One panel per metrics.jsonl curve plus validation macro-F1 / accuracy per eval step."""
  fig = Figure(figsize=(15, 7), layout="constrained")
  for i, (key, title) in enumerate(CURVES):
    ax = fig.add_subplot(2, 3, i + 1)
    pts = [(r["step"], r[key]) for r in metrics
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if pts:
      ax.plot(*zip(*pts), linewidth=1)
    else:
      ax.text(0.5, 0.5, f"no '{key}' in metrics.jsonl", ha="center", va="center",
              transform=ax.transAxes)
    if key == "learning_rate":
      ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title(title)
    ax.set_xlabel("step")
  ax = fig.add_subplot(2, 3, 5)
  steps = [e["step"] for e in evals]
  ax.plot(steps, [e["macro_f1"] for e in evals], marker="o", label="macro-F1")
  ax.plot(steps, [e["accuracy"] for e in evals], marker=".", linestyle=":", label="accuracy")
  ax.set_title("validation")
  ax.set_xlabel("step")
  ax.legend()
  return _save(fig, path)


def plot_gates(result: dict[str, Any], path: pathlib.Path, fusion: str | None) -> pathlib.Path:
  """Stacked bars of the mean (visual, audio) gate weights per true class."""
  names = list(result["gate_mean"])
  vis = np.array([result["gate_mean"][n][0] for n in names])
  aud = np.array([result["gate_mean"][n][1] for n in names])
  fig = Figure(figsize=(8, 4.5), layout="constrained")
  ax = fig.add_subplot()
  x = np.arange(len(names))
  ax.bar(x, vis, label="visual", color="tab:orange")
  ax.bar(x, aud, bottom=vis, label="audio", color="tab:cyan")
  for i, (v, s) in enumerate(zip(vis, [result["support"][n] for n in names])):
    if s > 0:
      ax.text(i, v / 2, f"{v:.2f}", ha="center", va="center", fontsize=8)
  ax.set_xticks(x, names, rotation=30, ha="right")
  ax.set_ylim(0, 1.15)
  ax.set_ylabel("mean gate weight")
  fixed = " (fixed by the variant, not learned)" if fusion in FIXED_GATES else ""
  ax.set_title(f"modality weights per true class, fusion {fusion or '?'}{fixed}")
  ax.legend(loc="upper right", ncols=2)
  return _save(fig, path)


def _run_config(workdir: pathlib.Path) -> dict[str, Any]:
  path = workdir / "config.json"
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}


def _markdown(workdir: pathlib.Path, result: dict[str, Any], evals: Sequence[dict[str, Any]],
              chosen_by_step: bool, config: dict[str, Any], metrics_found: bool,
              plots: dict[str, str]) -> str:
  fusion = config.get("model", {}).get("fusion", {}).get("name")
  sampling = config.get("data", {}).get("sampling", {}).get("mode")
  how = ("chosen with --step" if chosen_by_step
         else f"the best validation macro-F1 of {len(evals)} evaluation(s)")
  lines = [f"# Run report: {workdir.name}", "",
           f"- Run: `{workdir}`",
           f"- Fusion `{fusion or '?'}`, sampling `{sampling or '?'}`, seed "
           f"`{config.get('seed', '?')}` (from config.json)",
           f"- Evaluation at step **{result['step']}** ({how}; evaluated steps: "
           f"{', '.join(str(e['step']) for e in evals)})", "",
           "| macro-F1 | accuracy | frames |", "|---:|---:|---:|",
           f"| {result['macro_f1']:.4f} | {result['accuracy']:.4f} | {result['num_examples']} |",
           "",
           # Full precision too, so the report can be checked against the eval JSON exactly.
           f"Exact macro-F1: `{result['macro_f1']!r}`; exact accuracy: `{result['accuracy']!r}`.",
           ""]
  gates = result.get("gate_mean")
  header = "| class | F1 | support |" + (" gate visual | gate audio |" if gates else "")
  lines += [header, "|---|---:|---:|" + ("---:|---:|" if gates else "")]
  for name, f1 in result["per_class_f1"].items():
    row = f"| {name} | {f1:.4f} | {result['support'][name]} |"
    if gates:
      # A class with no frames has no mean gate (the 0 is a placeholder of the division).
      row += (f" {gates[name][0]:.3f} | {gates[name][1]:.3f} |" if result["support"][name]
              else " – | – |")
    lines.append(row)
  lines += ["", "Macro-F1 averages all 8 classes; a class with no frames in the split counts as "
            "F1 0 (the ABAW rule).", "", "## Confusion matrix", "",
            f"![confusion matrix]({plots['confusion']})", "", "## Per-class F1", "",
            f"![per-class F1]({plots['per_class_f1']})", "", "## Training curves", ""]
  if not metrics_found:
    lines += ["metrics.jsonl is missing or empty: only the validation curve is drawn.", ""]
  lines += [f"![training curves]({plots['training_curves']})", "", "## Modality gate weights", ""]
  if "gates" in plots:
    if fusion == "concat":
      lines += ["Fusion `concat` has no modality weights (the head sees both features side by "
                "side); the plot shows which modalities were available, not a learned split.",
                ""]
    elif fusion in FIXED_GATES:
      lines += [f"Fusion `{fusion}` uses fixed weights; the plot shows that fixed split.", ""]
    lines += [f"![gate weights]({plots['gates']})", ""]
  else:
    lines += ["This eval has no gate weights (`gate_mean`), so there is no gate plot.", ""]
  return "\n".join(lines)


def _number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_result(workdir: pathlib.Path, result: dict[str, Any]) -> None:
  """Raises ReportError unless the chosen eval has the per-class numbers the report draws
  (`evaluation.read_evals` checked its step, macro_f1 and accuracy)."""
  f1, support = result.get("per_class_f1"), result.get("support")
  confusion, gates = result.get("confusion"), result.get("gate_mean")
  ok = (isinstance(f1, dict) and f1 and isinstance(support, dict) and set(support) == set(f1)
        and all(_number(v) for v in [*f1.values(), *support.values()])
        and isinstance(confusion, list) and len(confusion) == len(f1)
        and all(isinstance(r, list) and len(r) == len(f1) and all(_number(v) for v in r)
                for r in confusion)
        and _number(result.get("num_examples"))
        and (gates is None or (isinstance(gates, dict) and set(gates) >= set(f1) and all(
            isinstance(gates[n], list) and len(gates[n]) == 2
            and all(_number(v) for v in gates[n]) for n in f1))))
  if not ok:
    path = evaluation.eval_dir(workdir) / f"{result['step']}.json"
    raise ReportError(f"{path} cannot be read (per_class_f1, support, confusion, num_examples "
                      "or gate_mean missing or malformed); delete it, and rerun `python main.py "
                      "... --mode=eval` to evaluate a checkpoint again, or pick another --step")


def write_report(workdir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 step: int | None = None) -> pathlib.Path:
  """Writes the plots and ``report.md`` for ``workdir``; returns the path of report.md.

  Args:
    workdir: a training run's directory (eval/ needed; metrics.jsonl and config.json used
      when present).
    out_dir: where to write; default ``<workdir>/report``.
    step: the eval step to report; default the best by macro-F1.

  Raises:
    ReportError: no such workdir, no eval in it, or no eval at ``step``.
  """
  workdir = pathlib.Path(workdir).resolve()
  evals = load_evals(workdir)
  result = pick_eval(evals, step)
  _check_result(workdir, result)
  metrics = load_metrics(workdir)
  config = _run_config(workdir)
  out = pathlib.Path(out_dir) if out_dir is not None else workdir / "report"
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ReportError(f"cannot make the report folder {out} ({type(e).__name__}: "
                      f"{e.strerror or e}: {e.filename}); choose a writable --out") from e
  plots = {k: v for k, v in PLOTS.items() if k != "gates" or "gate_mean" in result}
  plot_confusion(result, out / plots["confusion"])
  plot_per_class_f1(result, out / plots["per_class_f1"])
  plot_training_curves(metrics, evals, out / plots["training_curves"])
  fusion = config.get("model", {}).get("fusion", {}).get("name")
  if "gates" in plots:
    plot_gates(result, out / plots["gates"], fusion)
  md = _markdown(workdir, result, evals, step is not None, config, bool(metrics), plots)
  path = out / "report.md"
  atomic_write_bytes(path, (md + "\n").encode("utf-8"))
  return path

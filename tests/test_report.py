"""Run reports: every plot and the markdown on a finished tiny run, numbers equal to the evals."""

import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from mfer_jax import evaluation, reporting as report

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory):
  """A copy of conftest's finished tiny run (12 steps, evals at 6 and 12): the report is
  written into the run, and tiny_run is read-only (the other xdist worker may be copying it)."""
  return pathlib.Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("report") / "run"))


def _check_png(path: pathlib.Path) -> None:
  data = path.read_bytes()
  assert data.startswith(PNG_MAGIC), path
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.width >= 300 and im.height >= 200, (path, im.size)


def _exact(md: str, what: str) -> float:
  return float(re.search(rf"exact {what}: `([^`]+)`", md, re.IGNORECASE).group(1))


def test_report_writes_every_plot_and_matches_the_best_eval(run_dir):
  path = report.write_report(run_dir)
  assert path == run_dir / "report" / "report.md"
  md = path.read_text()
  for name in report.PLOTS.values():
    _check_png(path.parent / name)
    assert f"]({name})" in md, f"{name} is not linked"
  evals = evaluation.read_evals(run_dir)
  assert len(evals) == 2
  best = max(evals, key=lambda e: (e["macro_f1"], e["step"]))
  assert f"step **{best['step']}**" in md
  assert _exact(md, "macro-F1") == best["macro_f1"]
  assert _exact(md, "accuracy") == best["accuracy"]
  assert f"| {best['macro_f1']:.4f} | {best['accuracy']:.4f} | {best['num_examples']} |" in md
  for name, f1 in best["per_class_f1"].items():
    assert f"| {name} | {f1:.4f} | {best['support'][name]} |" in md


def test_report_at_a_chosen_step_into_another_directory(run_dir, tmp_path):
  first = evaluation.read_evals(run_dir)[0]
  path = report.write_report(run_dir, tmp_path / "out", step=first["step"])
  md = path.read_text()
  assert path.parent == tmp_path / "out"
  assert f"step **{first['step']}** (chosen with --step" in md
  assert _exact(md, "macro-F1") == first["macro_f1"]
  with pytest.raises(report.ReportError, match=r"no eval at step 999; evaluated steps"):
    report.write_report(run_dir, tmp_path / "out", step=999)


def test_best_eval_ties_go_to_the_later_step():
  evals = [{"step": 2, "macro_f1": 0.3}, {"step": 4, "macro_f1": 0.5},
           {"step": 6, "macro_f1": 0.5}, {"step": 8, "macro_f1": 0.1}]
  assert report.pick_eval(evals)["step"] == 6
  assert report.pick_eval(evals, 8)["step"] == 8


def test_eval_only_workdir_without_gates_or_metrics(tmp_path):
  """Evals without gate weights and no metrics.jsonl: a report still, saying what is missing."""
  result = evaluation.summarize([[3, 1] + [0] * 6, [1, 2] + [0] * 6] + [[0] * 8] * 6)
  evaluation.write_eval(tmp_path, 10, result)
  md = report.write_report(tmp_path).read_text()
  out = tmp_path / "report"
  assert not (out / "gates.png").exists()
  assert "no gate weights" in md and "metrics.jsonl is missing" in md
  for name in ("confusion.png", "per_class_f1.png", "training_curves.png"):
    _check_png(out / name)
  assert _exact(md, "macro-F1") == result["macro_f1"]


def test_missing_workdir_or_evals_is_a_clear_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "mfer_jax.tools.report",
                         f"--workdir={tmp_path / 'nowhere'}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1
  assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
  with pytest.raises(report.ReportError, match=r"has no <step>.json"):
    report.write_report(tmp_path)

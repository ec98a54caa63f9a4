"""Ablation runner: a real 2-variant sweep, resume without rerunning, table = eval JSONs, claims."""

import csv
import math
import pathlib
import shutil
import statistics
import subprocess
import sys

import pytest

from mfer_jax.testing import fake_data
from mfer_jax import evaluation
from mfer_jax.ablation import runs, sweep as sweep_lib, tables
from mfer_jax.files import atomic_write_json
from mfer_jax.training import run_status

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP_CONFIG = ROOT / "tests" / "configs" / "tiny_sweep.py"
FUSIONS = ("visual_only", "audio_only")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """A finished sweep: 2 fusions x dynamic x seed 0, one epoch (6 steps) of the tiny config."""
  data = tmp_path_factory.mktemp("ablate_data")
  fake_data.make_fake_dataset(data, splits={"train": 4, "validation": 2}, frames_per_video=60,
                              mel_shape=(16, 32), face_size=32, seed=0)
  workdir = tmp_path_factory.mktemp("sweep")
  kwargs = dict(config=str(SWEEP_CONFIG), workdir=workdir, fusions=FUSIONS,
                samplings=("dynamic",), seeds=(0,),
                # checkpoint_every_steps=4 (tiny) leaves a step-4 checkpoint to resume from.
                overrides=(f"data.data_dir={data}", "train.num_epochs=1"), say=lambda m: None)
  statuses = sweep_lib.run_sweep(**kwargs)
  return workdir, kwargs, statuses


def _final_eval(run_dir):
  return evaluation.read_evals(run_dir)[-1]


def _mtimes(directory):
  return {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def test_sweep_finishes_every_run_and_the_table_matches_the_evals(sweep):
  workdir, _, statuses = sweep
  assert [(s.variant.name, s.status) for s in statuses] == [
      (f"{f}-dynamic-seed0", "ran") for f in FUSIONS], [s.detail for s in statuses]
  rows = tables.summarize_sweep(workdir)
  assert [(r["fusion"], r["sampling"], r["n_seeds"]) for r in rows] == [
      (f, "dynamic", 1) for f in FUSIONS]
  with open(workdir / "ablation.csv") as f:
    csv_rows = list(csv.DictReader(f))
  md = (workdir / "ablation.md").read_text()
  for row, csv_row in zip(rows, csv_rows):
    final = _final_eval(workdir / f"{row['fusion']}-dynamic-seed0")
    assert final["step"] == 6
    assert row["macro_f1_mean"] == final["macro_f1"]
    assert row["accuracy_mean"] == final["accuracy"]
    assert math.isnan(row["macro_f1_std"])
    assert float(csv_row["macro_f1_mean"]) == final["macro_f1"]
    assert float(csv_row["accuracy_mean"]) == final["accuracy"]
    assert csv_row["macro_f1_std"] == ""
    assert f"| {row['fusion']} | dynamic | {final['macro_f1']:.4f} | 1 |" in md
  # No fused variant and no natural sampling in this sweep: neither claim can be judged.
  assert md.count(": not testable.") == 2


def test_second_invocation_reruns_nothing(sweep, tmp_path):
  """Nothing is started: the interpreter given for the runs would leave a trace if called."""
  workdir, kwargs, _ = sweep
  before = _mtimes(workdir / f"{FUSIONS[0]}-dynamic-seed0")
  before.update(_mtimes(workdir / f"{FUSIONS[1]}-dynamic-seed0"))
  called = tmp_path / "called"
  tripwire = tmp_path / "python.sh"
  tripwire.write_text(f"#!/bin/sh\necho \"$@\" >> {called}\nexit 3\n")
  tripwire.chmod(0o755)
  statuses = sweep_lib.run_sweep(**kwargs, python=str(tripwire))
  assert [s.status for s in statuses] == ["finished", "finished"]
  assert not called.exists(), called.read_text()
  after = _mtimes(workdir / f"{FUSIONS[0]}-dynamic-seed0")
  after.update(_mtimes(workdir / f"{FUSIONS[1]}-dynamic-seed0"))
  assert after == before
  log = (workdir / "ablate.log").read_text().splitlines()
  assert [l.split()[2] for l in log[-2:]] == ["skip", "skip"]


def test_dry_run_cli_lists_finished_runs(sweep):
  workdir, kwargs, _ = sweep
  proc = subprocess.run(
      [sys.executable, "-m", "mfer_jax.tools.ablate", f"--config={SWEEP_CONFIG}",
       f"--workdir={workdir}", f"--sweep={','.join(FUSIONS)},concat", "--sampling=dynamic",
       *[f"--override={o}" for o in kwargs["overrides"]], "--dry_run"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].split()[:2] == ["finished", "visual_only-dynamic-seed0"]
  assert lines[1].split()[:2] == ["finished", "audio_only-dynamic-seed0"]
  assert lines[2].split()[:2] == ["pending", "concat-dynamic-seed0"]
  assert "2 of 3 runs finished" in proc.stdout
  assert not (workdir / "concat-dynamic-seed0").exists()


def test_finished_runs_of_another_experiment_are_not_reused(sweep):
  workdir, kwargs, _ = sweep
  changed = {**kwargs, "overrides": (*kwargs["overrides"], "train.learning_rate=0.5")}
  with pytest.raises(runs.AblationError, match="use a new --workdir"):
    sweep_lib.run_sweep(**changed)


def test_unfinished_run_resumes_from_its_own_checkpoint(sweep):
  """A run killed after its step-4 checkpoint (no marker, no final eval) is resumed alone."""
  workdir, kwargs, _ = sweep
  done, cut = workdir / f"{FUSIONS[0]}-dynamic-seed0", workdir / f"{FUSIONS[1]}-dynamic-seed0"
  untouched = _mtimes(done)
  (cut / runs.MARKER).unlink()
  (cut / run_status.FINISHED).unlink()
  (cut / "eval" / "6.json").unlink()
  shutil.rmtree(cut / "checkpoints" / "6")
  assert sweep_lib.run_sweep(**{**kwargs, "dry_run": True})[1].status == "partial"
  statuses = sweep_lib.run_sweep(**kwargs)
  assert [s.status for s in statuses] == ["finished", "ran"]
  assert _mtimes(done) == untouched
  assert "Resuming from" in (cut / "train.log").read_text().split("\n=== ")[-1]
  final = _final_eval(cut)
  assert final["step"] == 6 and (cut / runs.MARKER).exists()
  rows = {r["fusion"]: r for r in tables.summarize_sweep(workdir)}
  assert rows[FUSIONS[1]]["macro_f1_mean"] == final["macro_f1"]


def test_a_failing_run_is_reported_and_the_sweep_goes_on(tmp_path):
  """Cheap stand-in interpreters: one crashes, one exits 0 without finishing (like SIGTERM)."""
  crash, early = tmp_path / "crash.sh", tmp_path / "early.sh"
  crash.write_text("#!/bin/sh\necho 'boom: out of memory' >&2\nexit 3\n")
  early.write_text("#!/bin/sh\nexit 0\n")
  for script in (crash, early):
    script.chmod(0o755)
  for python, why in ((crash, "exit code 3"), (early, "without reaching its last step")):
    out = tmp_path / python.stem
    statuses = sweep_lib.run_sweep(str(SWEEP_CONFIG), out, fusions=FUSIONS, samplings=("natural",),
                                overrides=("data.data_dir=/nowhere",), python=str(python),
                                say=lambda m: None)
    assert [s.status for s in statuses] == ["failed", "failed"]
    assert all(why in s.detail for s in statuses), [s.detail for s in statuses]
    assert not list(out.glob("*/" + runs.MARKER))
    assert tables.summarize_sweep(out) == []
  assert "boom: out of memory" in (tmp_path / "crash" / "ablate.log").read_text()


def test_a_preempted_run_stops_the_sweep_and_is_not_finished(tmp_path):
  """A child that exits 143 (main.py after SIGTERM: checkpoint saved, PREEMPTED.json) stops the
  sweep (the machine is going away): no marker, no next variant; `ablate` then exits 143."""
  preempted = tmp_path / "preempted.sh"
  preempted.write_text("#!/bin/sh\necho started >> \"$(dirname \"$0\")/started\"\nexit 143\n")
  preempted.chmod(0o755)
  with pytest.raises(sweep_lib.Stop):
    sweep_lib.run_sweep(str(SWEEP_CONFIG), tmp_path / "sweep", fusions=FUSIONS,
                        samplings=("natural",), overrides=("data.data_dir=/nowhere",),
                        python=str(preempted), say=lambda m: None)
  assert (tmp_path / "started").read_text().split() == ["started"]   # the first variant only
  assert not list((tmp_path / "sweep").glob("*/" + runs.MARKER))
  assert "preempted" in (tmp_path / "sweep" / "ablate.log").read_text()


def test_config_that_ignores_the_variant_is_refused(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "mfer_jax.tools.ablate", f"--config={ROOT / 'tests/configs/tiny.py'}",
       f"--workdir={tmp_path}", "--sweep=concat", "--dry_run"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2   # a --config that cannot serve a sweep is a usage error
  assert "ignores its variant argument" in proc.stderr and "Traceback" not in proc.stderr
  with pytest.raises(runs.AblationError, match="the sweep sets"):
    sweep_lib.run_sweep(f"{SWEEP_CONFIG}:fusion=mfm", tmp_path, fusions=("concat",), dry_run=True)


# --- Tables and claims on hand-made runs (no training) -----------------------------------------


def _fake_sweep(workdir, table, temporal="none"):
  """Finished-looking runs: {(fusion, sampling): [macro-F1 per seed]}."""
  for (fusion, sampling), values in table.items():
    for seed, f1 in enumerate(values):
      run = workdir / runs.Variant(fusion, sampling, seed, temporal).name
      evaluation.write_eval(run, 3, {"macro_f1": f1 - 0.1, "accuracy": 0.0})
      evaluation.write_eval(run, 7, {"macro_f1": f1, "accuracy": f1 / 2})
      atomic_write_json(run / runs.MARKER, {"final_step": 7, "macro_f1": f1})


def _rows(table):
  return [{"fusion": f, "sampling": s, "n_seeds": len(v), "macro_f1_mean": statistics.fmean(v),
           "macro_f1_std": statistics.stdev(v) if len(v) > 1 else math.nan}
          for (f, s), v in table.items()]


def test_table_statistics_over_seeds(tmp_path):
  _fake_sweep(tmp_path, {("mfm", "dynamic"): [0.5, 0.4, 0.45], ("concat", "dynamic"): [0.3]})
  tables.write_tables(tmp_path)
  rows = tables.summarize_sweep(tmp_path)
  assert [r["fusion"] for r in rows] == ["concat", "mfm"]      # table order, not name order
  mfm = rows[1]
  assert mfm["macro_f1"] == [0.5, 0.4, 0.45] and mfm["seeds"] == [0, 1, 2]
  assert mfm["macro_f1_mean"] == statistics.fmean([0.5, 0.4, 0.45])
  assert mfm["macro_f1_std"] == statistics.stdev([0.5, 0.4, 0.45])
  assert (mfm["macro_f1_min"], mfm["macro_f1_max"]) == (0.4, 0.5)
  with open(tmp_path / "ablation.csv") as f:
    csv_mfm = list(csv.DictReader(f))[1]
  assert float(csv_mfm["macro_f1_std"]) == mfm["macro_f1_std"]
  assert csv_mfm["macro_f1_per_seed"].split() == ["0.5", "0.4", "0.45"]
  md = (tmp_path / "ablation.md").read_text()
  assert f"| mfm | dynamic | {mfm['macro_f1_mean']:.4f} ± {mfm['macro_f1_std']:.4f} | 3 |" in md


def _seeds(mean):
  """Three seeds around ``mean`` with a spread (std) of 0.01."""
  return [mean - 0.01, mean, mean + 0.01]


SUPPORTED = {("visual_only", "dynamic"): _seeds(0.40), ("audio_only", "dynamic"): _seeds(0.30),
             ("mfm", "dynamic"): _seeds(0.50), ("visual_only", "natural"): _seeds(0.35),
             ("audio_only", "natural"): _seeds(0.25), ("mfm", "natural"): _seeds(0.45)}


def test_claims_supported():
  fusion, resampling = tables.assess_claims(_rows(SUPPORTED))
  assert fusion.verdict == resampling.verdict == "supported"
  assert any("best fusion `mfm` 0.5000" in d and "margin +0.1000" in d for d in fusion.details)
  assert resampling.details[0] == ("dynamic is higher for 3 of 3 fusion variants, beyond the "
                                   "seed spread for 3")
  assert not any("not shown" in d for d in fusion.details + resampling.details)


def test_claims_not_supported():
  table = {**SUPPORTED, ("mfm", "dynamic"): _seeds(0.38), ("mfm", "natural"): _seeds(0.40),
           ("visual_only", "natural"): _seeds(0.45), ("audio_only", "natural"): _seeds(0.35)}
  fusion, resampling = tables.assess_claims(_rows(table))
  assert fusion.verdict == "not supported"
  assert any("not above both (margin -0.0200)" in d for d in fusion.details)
  assert resampling.verdict == "not supported"
  assert resampling.details[0].startswith("dynamic is higher for 0 of 3 fusion variants")


def test_a_margin_inside_the_seed_noise_is_not_shown():
  # +0.06 with a spread of 0.14 on one side: another seed could undo it.
  noisy = tables.assess_claims(_rows({("mfm", "dynamic"): [0.50, 0.30],
                                      ("mfm", "natural"): [0.40, 0.38]}))[1]
  assert noisy.verdict == "not shown"
  assert "within the seed spread, std up to 0.1414: not shown" in noisy.details[1]
  # One seed each: no spread, so even a large margin shows nothing.
  single = tables.assess_claims(_rows({("mfm", "dynamic"): [0.60],
                                       ("mfm", "natural"): [0.30]}))[1]
  assert single.verdict == "not shown" and "single seed" in single.details[1]
  # Beyond the spread on one variant, inside it on another: partly.
  mixed = tables.assess_claims(_rows({("mfm", "dynamic"): _seeds(0.50),
                                      ("mfm", "natural"): _seeds(0.40),
                                      ("concat", "dynamic"): [0.50, 0.30],
                                      ("concat", "natural"): [0.40, 0.38]}))[1]
  assert mixed.verdict == "partly supported"
  # Against beyond the spread and nothing shown: not supported.
  against = tables.assess_claims(_rows({("mfm", "dynamic"): _seeds(0.40),
                                        ("mfm", "natural"): _seeds(0.50)}))[1]
  assert against.verdict == "not supported"


def test_claims_partly_supported():
  table = {**SUPPORTED, ("mfm", "natural"): [0.30, 0.32, 0.10],
           ("mfm", "dynamic"): [0.50, 0.52, 0.48]}
  fusion, resampling = tables.assess_claims(_rows(table))
  assert fusion.verdict == "partly supported"          # natural: mfm 0.24 < visual 0.35
  assert resampling.verdict == "supported"
  mfm_line = next(d for d in resampling.details if d.startswith("`mfm`"))
  assert "single seed" not in mfm_line


def test_claims_not_testable_and_in_the_markdown(tmp_path):
  fusion, resampling = tables.assess_claims(_rows({("mfm", "dynamic"): [0.5]}))
  assert fusion.verdict == resampling.verdict == "not testable"
  _fake_sweep(tmp_path, {**SUPPORTED, ("mfm", "natural"): _seeds(0.60)})
  md = tables.write_tables(tmp_path)[0].read_text()
  assert "1. **The best fusion variant beats each single modality**: supported." in md
  assert ("2. **Dynamic resampling raises macro-F1 over natural sampling**: partly supported."
          in md)
  assert "`mfm`: dynamic 0.5000 vs natural 0.6000 (-0.1000)" in md


def test_temporal_axis_names_runs_and_adds_table_rows(tmp_path):
  variants = sweep_lib.variants_of(["mfm"], ["dynamic"], [0, 1], ["none", "transformer"])
  assert [v.name for v in variants] == ["mfm-dynamic-seed0", "mfm-dynamic-seed1",
                                        "mfm-dynamic-transformer-seed0",
                                        "mfm-dynamic-transformer-seed1"]
  assert variants[2].arg == "fusion=mfm,sampling=dynamic,temporal=transformer,seed=0"
  assert runs.RUN_NAME.match("visual_only-natural-tcn-seed3")["temporal"] == "tcn"
  assert runs.RUN_NAME.match("visual_only-natural-seed3")["temporal"] is None
  with pytest.raises(runs.AblationError, match="temporal heads"):
    sweep_lib.variants_of(["mfm"], ["dynamic"], [0], ["lstm"])
  # A head on the frame-mode tiny config gets clips; the config check passes for every variant.
  sweep_lib.check_config(SWEEP_CONFIG, "", variants, ())
  _fake_sweep(tmp_path, {("mfm", "dynamic"): [0.40, 0.42]})
  _fake_sweep(tmp_path, {("mfm", "dynamic"): [0.50, 0.52]}, temporal="transformer")
  rows = tables.summarize_sweep(tmp_path)
  assert [(r["temporal"], r["n_seeds"]) for r in rows] == [("none", 2), ("transformer", 2)]
  md = tables.write_tables(tmp_path)[0].read_text()
  assert "| mfm | dynamic | transformer | 0.5100 ± 0.0141 | 2 |" in md
  assert "A temporal head raises macro-F1 over the frame model**: supported." in md
  assert "transformer 0.5100 vs frame model 0.4100 (+0.1000)" in md
  with open(tmp_path / "ablation.csv") as f:
    assert [r["temporal"] for r in csv.DictReader(f)] == ["none", "transformer"]

"""The paper's ablations from one command: fusion variants x sampling modes x seeds.

  python -m mfer_jax.ablate --config=configs/demo.py --workdir=runs/ablate
  python -m mfer_jax.ablate --config=configs/abaw.py:size=small --workdir=runs/abl \\
      --sweep=concat,mfm --sampling=dynamic --seeds=0,1,2 \\
      --override=data.data_dir=/data/affwild2_prepared --override=train.num_epochs=5
  python -m mfer_jax.ablate --config=configs/demo.py --workdir=runs/ablate --dry_run

Each run trains with ``main.py --config=<file>:<base arg>,fusion=F,sampling=S,seed=K
--workdir=DIR/F-S-seedK`` (plus ``--config.<override>`` for each ``--override``), one after
the other, each in its own subprocess: a crash, an OOM or a hung compile in one run is reported
and the sweep goes on, no JAX state (compile caches, device buffers) leaks from one run into
the next, and every run is exactly what the printed command reproduces by hand. The cost, a
few seconds of start-up per run, is small next to training.

Resuming: a run is finished when its completion marker (``ablate_done.json``, written
atomically after the run's final eval) exists; finished runs are never rerun. Any other run
is started again and main.py resumes it from its own latest checkpoint. Ctrl-C or SIGTERM
asks the running child to save a checkpoint and stop, so rerunning the same command continues.

Outputs in DIR: ``ablation.md`` and ``ablation.csv`` (macro-F1 and accuracy per variant, mean
± sample std over seeds, with the paper's two claims checked against the table), ``ablate.log``
(one line per run started, skipped, finished or failed) and each run's ``train.log``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from absl import app, flags

from mfer_jax import evaluation
from mfer_jax.data.store import atomic_write_bytes, atomic_write_json

MAIN = pathlib.Path(__file__).resolve().parents[1] / "main.py"
MARKER = "ablate_done.json"
SWEEP_KEYS = ("fusion", "sampling", "seed")
# Table order; the same names as mfer_jax.models.fusion.FUSION_VARIANTS (not imported, so the
# table tools stay free of the model code).
FUSION_ORDER = ("visual_only", "audio_only", "concat", "sum", "gated", "mfm")
SINGLE = ("visual_only", "audio_only")
FUSED = ("concat", "sum", "gated", "mfm")
SAMPLING_ORDER = ("dynamic", "natural")
DEFAULT_SWEEP = ("visual_only", "audio_only", "concat", "gated", "mfm")
_RUN_NAME = re.compile(r"^(?P<fusion>[a-z_]+)-(?P<sampling>[a-z]+)-seed(?P<seed>\d+)$")


class AblationError(ValueError):
  """A sweep that cannot run as asked; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Variant:
  fusion: str
  sampling: str
  seed: int

  @property
  def name(self) -> str:
    return f"{self.fusion}-{self.sampling}-seed{self.seed}"

  @property
  def arg(self) -> str:
    return f"fusion={self.fusion},sampling={self.sampling},seed={self.seed}"


@dataclasses.dataclass
class RunStatus:
  """What happened to one run: finished (already), ran, failed, pending or partial (dry run)."""

  variant: Variant
  workdir: pathlib.Path
  status: str
  detail: str = ""


# --- Config handling -------------------------------------------------------------------------


def split_config_arg(config: str) -> tuple[pathlib.Path, str]:
  """``path[:arg]`` -> (absolute path, arg)."""
  path, _, arg = config.partition(":")
  path = pathlib.Path(path).resolve()
  if not path.is_file():
    raise AblationError(f"--config: {path} is not a file (expected e.g. configs/abaw.py)")
  return path, arg


def merged_arg(base_arg: str, variant: Variant) -> str:
  """The base config argument plus the variant's keys; the sweep owns fusion/sampling/seed."""
  items = [i for i in base_arg.split(",") if i.strip()]
  clash = [i for i in items if i.partition("=")[0].strip() in SWEEP_KEYS]
  if clash:
    raise AblationError(f"--config argument sets {clash}, but the sweep sets {SWEEP_KEYS} "
                        "itself: use --sweep, --sampling and --seeds instead")
  return ",".join(items + [variant.arg])


def _load_get_config(path: pathlib.Path) -> Callable[[str], Any]:
  spec = importlib.util.spec_from_file_location(f"_ablate_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AblationError(f"{path} has no get_config(arg)")
  return module.get_config


def check_config(path: pathlib.Path, base_arg: str, variants: Sequence[Variant],
                 overrides: Sequence[str]) -> None:
  """Builds every variant's config in-process before any run starts.

  A typo would otherwise surface only when each run's subprocess starts, once per run; and a
  config file that ignores its argument (one that treats it as a path, say) would silently
  train the same model for every variant.
  """
  get_config = _load_get_config(path)
  for v in variants:
    try:
      c = get_config(merged_arg(base_arg, v))
    except (ValueError, KeyError) as e:
      raise AblationError(f"{path.name}:{merged_arg(base_arg, v)}: {e}") from e
    got = (c.model.fusion.name, c.data.sampling.mode, int(c.seed))
    if got != (v.fusion, v.sampling, v.seed):
      raise AblationError(
          f"{path.name}:{merged_arg(base_arg, v)} gave fusion/sampling/seed {got}: this config "
          "file ignores its variant argument. Use a config whose get_config(arg) ends with "
          "config_lib.apply_variant_args(c, arg), like configs/abaw.py and configs/demo.py.")
    for o in overrides:
      key, sep, _ = o.partition("=")
      node = c
      for part in key.split("."):
        if not sep or not hasattr(node, "keys") or part not in node.keys():
          raise AblationError(f"--override={o}: expected key=value with an existing config "
                              f"key (e.g. data.data_dir=/data/prepared); {key!r} is not one")
        node = node[part]


def run_command(config_path: pathlib.Path, base_arg: str, variant: Variant,
                run_dir: pathlib.Path, overrides: Sequence[str],
                python: str = sys.executable) -> list[str]:
  """The main.py command line that trains one variant."""
  return [python, str(MAIN), f"--config={config_path}:{merged_arg(base_arg, variant)}",
          f"--workdir={run_dir}", *[f"--config.{o}" for o in overrides]]


# --- Completion ------------------------------------------------------------------------------


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def final_eval_if_complete(run_dir: pathlib.Path) -> dict[str, Any] | None:
  """The run's final eval if training reached its last step, else None.

  main.py exits 0 after a SIGTERM too (with a checkpoint, mid-run), so exit status alone does
  not mean finished. Finished means: the last metrics.jsonl row is at the configured end
  (``train.max_steps``, or ``train.num_epochs`` epochs), and an eval exists at that step.
  """
  config = _read_json(run_dir / "config.json")
  rows = evaluation.read_metrics(run_dir)
  evals = evaluation.read_evals(run_dir) if (run_dir / "eval").is_dir() else []
  if not config or not rows or not evals:
    return None
  last = rows[-1]
  train = config.get("train", {})
  at_max = train.get("max_steps", -1) > 0 and last["step"] >= train["max_steps"]
  at_epochs = last.get("epoch", 0) >= train.get("num_epochs", math.inf) - 1e-9
  if not (at_max or at_epochs) or evals[-1]["step"] != last["step"]:
    return None
  return evals[-1]


def _spec(config_path: pathlib.Path, base_arg: str, overrides: Sequence[str]) -> dict[str, Any]:
  """What makes two runs of the same variant the same experiment (kept in the marker)."""
  return {"config": str(config_path), "config_arg": base_arg, "overrides": sorted(overrides)}


# --- Running ---------------------------------------------------------------------------------


class _Stop(Exception):
  """SIGINT/SIGTERM reached the sweep: stop after the child has saved a checkpoint."""


def _run_child(cmd: Sequence[str], log_path: pathlib.Path) -> int:
  """Runs ``cmd`` with its output appended to ``log_path``; returns the exit code.

  The child gets its own session so that a terminal's Ctrl-C reaches only us; we then send it
  SIGTERM, which the training loop turns into a final checkpoint and a clean exit.
  """
  with open(log_path, "ab") as log:
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
      return proc.wait()
    except (KeyboardInterrupt, _Stop):
      proc.send_signal(signal.SIGTERM)
      proc.wait()
      raise


def _tail(path: pathlib.Path, n: int = 15) -> str:
  try:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
  except OSError:
    return ""


def variants_of(fusions: Sequence[str], samplings: Sequence[str],
                seeds: Sequence[int]) -> list[Variant]:
  bad = [f for f in fusions if f not in FUSION_ORDER]
  bad += [s for s in samplings if s not in SAMPLING_ORDER]
  if bad:
    raise AblationError(f"unknown variant names {bad}: fusions are {FUSION_ORDER}, sampling "
                        f"modes {SAMPLING_ORDER}")
  if not (fusions and samplings and seeds):
    raise AblationError("--sweep, --sampling and --seeds each need at least one value")
  return [Variant(f, s, int(k)) for f in fusions for s in samplings for k in seeds]


def run_sweep(config: str, workdir: str | os.PathLike,
              fusions: Sequence[str] = DEFAULT_SWEEP,
              samplings: Sequence[str] = SAMPLING_ORDER, seeds: Sequence[int] = (0,),
              overrides: Sequence[str] = (), dry_run: bool = False,
              python: str = sys.executable,
              say: Callable[[str], None] = print) -> list[RunStatus]:
  """Trains every variant not finished yet, then writes ablation.md / ablation.csv.

  Args:
    config: ``path[:arg]`` of a config file whose ``get_config(arg)`` applies
      ``config_lib.apply_variant_args``; the sweep appends fusion, sampling and seed to arg.
    workdir: the sweep directory; run k goes to ``workdir/<fusion>-<sampling>-seed<k>``.
    fusions, samplings, seeds: the grid (every combination runs).
    overrides: ``a.b=value`` items passed to each run as ``--config.a.b=value``.
    dry_run: only report which runs are finished, partial (checkpoints, no marker) or pending.
    python: interpreter for main.py.
    say: where progress lines go.

  Returns:
    One RunStatus per variant, in grid order.

  Raises:
    AblationError: a bad config, override or variant name, or a finished run made with a
      different config (reusing it would mix two experiments in one table).
  """
  workdir = pathlib.Path(workdir).resolve()
  config_path, base_arg = split_config_arg(config)
  variants = variants_of(fusions, samplings, seeds)
  check_config(config_path, base_arg, variants, overrides)
  spec = _spec(config_path, base_arg, overrides)
  statuses = []
  for v in variants:
    run_dir = workdir / v.name
    marker = _read_json(run_dir / MARKER)
    if marker is not None:
      if {k: marker.get(k) for k in spec} != spec:
        raise AblationError(
            f"{run_dir} was finished with {({k: marker.get(k) for k in spec})}, not {spec}; "
            "use a new --workdir for a different experiment (or delete that run)")
      status = RunStatus(v, run_dir, "finished", f"macro-F1 {marker['macro_f1']:.4f}")
      if not dry_run:  # the dry-run listing shows it
        _log(workdir, f"skip {v.name} (finished: {status.detail})", say)
      statuses.append(status)
      continue
    if dry_run:
      partial = (run_dir / "checkpoints").is_dir()
      statuses.append(RunStatus(v, run_dir, "partial" if partial else "pending"))
      continue
    cmd = run_command(config_path, base_arg, v, run_dir, overrides, python)
    statuses.append(_train_one(v, run_dir, cmd, spec, workdir, say))
  if not dry_run:
    write_tables(workdir)
  return statuses


def _log(workdir: pathlib.Path, msg: str, say: Callable[[str], None]) -> None:
  """Says ``msg`` and appends it to the sweep's ablate.log (the record of what ran when)."""
  say(msg)
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "ablate.log", "a") as f:
    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")


def _train_one(v: Variant, run_dir: pathlib.Path, cmd: Sequence[str], spec: dict[str, Any],
               workdir: pathlib.Path, say: Callable[[str], None]) -> RunStatus:
  """Runs (or resumes) one variant; writes its marker only if it reached its last step."""
  run_dir.mkdir(parents=True, exist_ok=True)
  resumed = (run_dir / "checkpoints").is_dir()
  _log(workdir, f"{'resume' if resumed else 'start'} {v.name} (log: {run_dir / 'train.log'})",
       say)
  t0 = time.monotonic()
  code = _run_child(cmd, run_dir / "train.log")
  seconds = time.monotonic() - t0
  final = final_eval_if_complete(run_dir) if code == 0 else None
  if final is None:
    why = f"exit code {code}" if code else "exited without reaching its last step"
    _log(workdir, f"FAILED {v.name} after {seconds:.0f} s ({why}); last lines of "
         f"{run_dir / 'train.log'}:\n{_tail(run_dir / 'train.log')}", say)
    return RunStatus(v, run_dir, "failed", why)
  atomic_write_json(run_dir / MARKER, {
      **spec, "fusion": v.fusion, "sampling": v.sampling, "seed": v.seed,
      "final_step": final["step"], "macro_f1": final["macro_f1"],
      "command": cmd, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
  _log(workdir, f"done {v.name} in {seconds:.0f} s: macro-F1 {final['macro_f1']:.4f} at step "
       f"{final['step']}", say)
  return RunStatus(v, run_dir, "ran", f"macro-F1 {final['macro_f1']:.4f}")


# --- Tables and claims -----------------------------------------------------------------------


def summarize_sweep(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """One row per (fusion, sampling) over the finished runs in ``workdir``.

  The numbers are read from each run's eval JSON at the step its marker names, so the table is
  exactly what the runs wrote. Row keys: fusion, sampling, n_seeds, seeds, macro_f1 (per seed),
  macro_f1_mean, macro_f1_std (sample std; NaN for one seed), macro_f1_min, macro_f1_max,
  accuracy (per seed), accuracy_mean, accuracy_std.
  """
  groups: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
  for run_dir in sorted(pathlib.Path(workdir).glob("*/" + MARKER)):
    run_dir = run_dir.parent
    m = _RUN_NAME.match(run_dir.name)
    marker = _read_json(run_dir / MARKER)
    if not m or marker is None:
      continue
    final = [e for e in evaluation.read_evals(run_dir) if e["step"] == marker["final_step"]]
    if not final:
      raise AblationError(f"{run_dir}/eval/{marker['final_step']}.json is missing although the "
                          f"run is marked finished; delete {run_dir / MARKER} to rerun it")
    key = (m["fusion"], m["sampling"])
    groups.setdefault(key, []).append((int(m["seed"]), final[0]))
  rows = []
  for (fusion, sampling), runs in groups.items():
    runs.sort(key=lambda r: r[0])
    f1 = [e["macro_f1"] for _, e in runs]
    acc = [e["accuracy"] for _, e in runs]
    rows.append({
        "fusion": fusion, "sampling": sampling, "n_seeds": len(runs),
        "seeds": [s for s, _ in runs], "macro_f1": f1,
        "macro_f1_mean": statistics.fmean(f1), "macro_f1_std": _std(f1),
        "macro_f1_min": min(f1), "macro_f1_max": max(f1),
        "accuracy": acc, "accuracy_mean": statistics.fmean(acc), "accuracy_std": _std(acc)})
  rank = lambda name, order: order.index(name) if name in order else len(order)
  rows.sort(key=lambda r: (rank(r["fusion"], FUSION_ORDER), rank(r["sampling"], SAMPLING_ORDER)))
  return rows


def _std(values: Sequence[float]) -> float:
  # Sample std (n-1): with 2-3 seeds the population std would understate the spread.
  return statistics.stdev(values) if len(values) > 1 else math.nan


@dataclasses.dataclass
class Claim:
  title: str
  verdict: str          # supported | partly supported | not supported | not testable
  details: list[str]


def _by(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
  return {(r["fusion"], r["sampling"]): r for r in rows}


def _overall(results: Sequence[bool]) -> str:
  if all(results):
    return "supported"
  return "not supported" if not any(results) else "partly supported"


def _spread_note(margin: float, *rows: dict[str, Any]) -> str:
  """Flags a margin that one seed's noise could explain (or that no spread is known)."""
  stds = [r["macro_f1_std"] for r in rows if not math.isnan(r["macro_f1_std"])]
  if len(stds) < len(rows):
    return " (single seed: no spread to compare against)"
  if abs(margin) <= max(stds):
    return f" (within the seed spread, std up to {max(stds):.4f}: not conclusive)"
  return ""


def assess_claims(rows: Sequence[dict[str, Any]]) -> list[Claim]:
  """Checks the paper's two claims against the table's mean macro-F1.

  1. The best fusion variant beats each single modality, per sampling mode.
  2. Dynamic resampling beats natural sampling, per fusion variant.
  """
  by = _by(rows)
  details, results = [], []
  for sampling in SAMPLING_ORDER:
    singles = [by.get((f, sampling)) for f in SINGLE]
    fused = [by[(f, sampling)] for f in FUSED if (f, sampling) in by]
    if not fused or None in singles:
      continue
    best = max(fused, key=lambda r: r["macro_f1_mean"])
    top_single = max(singles, key=lambda r: r["macro_f1_mean"])
    margin = best["macro_f1_mean"] - top_single["macro_f1_mean"]
    results.append(margin > 0)
    details.append(
        f"{sampling} sampling: best fusion `{best['fusion']}` {best['macro_f1_mean']:.4f} vs "
        + ", ".join(f"`{s['fusion']}` {s['macro_f1_mean']:.4f}" for s in singles)
        + f": {'above' if margin > 0 else 'not above'} both (margin {margin:+.4f})"
        + _spread_note(margin, best, top_single))
  claim1 = Claim("The best fusion variant beats each single modality",
                 _overall(results) if results else "not testable",
                 details or ["needs visual_only, audio_only and at least one fusion variant "
                             "(concat, sum, gated, mfm) with the same sampling mode"])
  details, results = [], []
  for fusion in FUSION_ORDER:
    dyn, nat = by.get((fusion, "dynamic")), by.get((fusion, "natural"))
    if dyn is None or nat is None:
      continue
    gain = dyn["macro_f1_mean"] - nat["macro_f1_mean"]
    results.append(gain > 0)
    details.append(f"`{fusion}`: dynamic {dyn['macro_f1_mean']:.4f} vs natural "
                   f"{nat['macro_f1_mean']:.4f} ({gain:+.4f})" + _spread_note(gain, dyn, nat))
  if results:
    details.insert(0, f"dynamic is higher for {sum(results)} of {len(results)} fusion variants")
  claim2 = Claim("Dynamic resampling raises macro-F1 over natural sampling",
                 _overall(results) if results else "not testable",
                 details or ["needs the same fusion variant run with both dynamic and natural "
                             "sampling"])
  return [claim1, claim2]


def _fmt(mean: float, std: float) -> str:
  return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """The markdown table (also readable as plain text)."""
  lines = ["| fusion | sampling | macro-F1 (mean ± std) | n | min – max | accuracy (mean ± std) |",
           "|---|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['fusion']} | {r['sampling']} | "
                 f"{_fmt(r['macro_f1_mean'], r['macro_f1_std'])} | {r['n_seeds']} | "
                 f"{r['macro_f1_min']:.4f} – {r['macro_f1_max']:.4f} | "
                 f"{_fmt(r['accuracy_mean'], r['accuracy_std'])} |")
  return "\n".join(lines)


def format_claims(claims: Sequence[Claim]) -> str:
  lines = []
  for i, c in enumerate(claims, 1):
    lines.append(f"{i}. **{c.title}**: {c.verdict}.")
    lines += [f"   - {d}" for d in c.details]
  return "\n".join(lines)


CSV_FIELDS = ("fusion", "sampling", "n_seeds", "seeds", "macro_f1_mean", "macro_f1_std",
              "macro_f1_min", "macro_f1_max", "accuracy_mean", "accuracy_std", "macro_f1_per_seed",
              "accuracy_per_seed")


def _csv(rows: Sequence[dict[str, Any]]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(CSV_FIELDS)
  for r in rows:
    # repr floats: the CSV round-trips to the eval JSONs' values exactly.
    w.writerow([r["fusion"], r["sampling"], r["n_seeds"], " ".join(map(str, r["seeds"])),
                *(repr(r[k]) if not math.isnan(r[k]) else "" for k in
                  ("macro_f1_mean", "macro_f1_std", "macro_f1_min", "macro_f1_max",
                   "accuracy_mean", "accuracy_std")),
                " ".join(map(repr, r["macro_f1"])), " ".join(map(repr, r["accuracy"]))])
  return buf.getvalue()


def write_tables(workdir: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes ablation.md and ablation.csv from the finished runs; returns their paths."""
  workdir = pathlib.Path(workdir)
  rows = summarize_sweep(workdir)
  markers = [_read_json(p) or {} for p in sorted(workdir.glob("*/" + MARKER))]
  unfinished = sorted(p.name for p in workdir.iterdir()
                      if p.is_dir() and _RUN_NAME.match(p.name) and not (p / MARKER).exists())
  configs = sorted({f"{m.get('config')}:{m.get('config_arg', '')}" for m in markers})
  overrides = sorted({o for m in markers for o in m.get("overrides", [])})
  md = [f"# Ablation: {workdir.name}", "",
        f"Config: {', '.join(f'`{c}`' for c in configs) or '?'}"
        + (f"; overrides: {', '.join(f'`{o}`' for o in overrides)}" if overrides else ""), "",
        "Validation macro-F1 of each run's final evaluation (`eval/<last step>.json`), mean ± "
        "sample std over seeds; n is the number of finished seeds.", "",
        format_table(rows), "", "## The paper's claims on this table", "",
        format_claims(assess_claims(rows)), ""]
  if unfinished:
    md += [f"Not finished (not in the table): {', '.join(unfinished)}.", ""]
  md_path, csv_path = workdir / "ablation.md", workdir / "ablation.csv"
  atomic_write_bytes(csv_path, _csv(rows).encode())
  atomic_write_bytes(md_path, "\n".join(md).encode())
  return md_path, csv_path


# --- Command line ----------------------------------------------------------------------------

def _define_flags() -> None:
  # Defined only when run as a command, so importing the library registers no flags.
  flags.DEFINE_string("config", None, "Config file[:base arg], e.g. configs/demo.py or "
                      "configs/abaw.py:size=small (fusion/sampling/seed come from the sweep "
                      "flags).", required=True)
  flags.DEFINE_string("workdir", None, "Sweep directory; each run gets a subdirectory.",
                      required=True)
  flags.DEFINE_list("sweep", list(DEFAULT_SWEEP), f"Fusion variants, of {FUSION_ORDER}.")
  flags.DEFINE_list("sampling", list(SAMPLING_ORDER),
                    "Sampling modes to run each fusion with: dynamic, natural.")
  flags.DEFINE_list("seeds", ["0"], "Seeds, e.g. 0,1,2.")
  flags.DEFINE_multi_string("override", [], "key=value passed to every run as "
                            "--config.key=value, e.g. data.data_dir=/data (repeatable).")
  flags.DEFINE_bool("dry_run", False, "List the runs and which are finished; run none.")


def _raise_stop(signum, frame):
  del signum, frame
  raise _Stop()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  signal.signal(signal.SIGTERM, _raise_stop)
  try:
    seeds = [int(s) for s in f.seeds]
  except ValueError:
    sys.stderr.write(f"error: --seeds={','.join(f.seeds)}: expected integers\n")
    sys.exit(1)
  say = lambda msg: print(msg, flush=True)
  try:
    statuses = run_sweep(f.config, f.workdir, f.sweep, f.sampling, seeds, f.override, f.dry_run,
                         say=say)
  except AblationError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(1)
  except (KeyboardInterrupt, _Stop):
    sys.stderr.write("\nstopped: the running variant saved a checkpoint; rerun the same "
                     "command to continue.\n")
    sys.exit(130)
  workdir = pathlib.Path(f.workdir).resolve()
  if f.dry_run:
    for s in statuses:
      print(f"{s.status:<9} {s.variant.name:<28} {s.workdir} {s.detail}")
    n = sum(s.status == "finished" for s in statuses)
    print(f"{n} of {len(statuses)} runs finished")
    return
  rows = summarize_sweep(workdir)
  print("\n" + format_table(rows) + "\n\n" + format_claims(assess_claims(rows)))
  print(f"\nWrote {workdir / 'ablation.md'} and {workdir / 'ablation.csv'}")
  failed = [s.variant.name for s in statuses if s.status == "failed"]
  if failed:
    sys.stderr.write(f"\n{len(failed)} run(s) failed: {', '.join(failed)}; see their train.log. "
                     "Rerun the same command to retry them (finished runs are kept).\n")
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)

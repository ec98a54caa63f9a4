"""The ablation table and the paper's two claims, from a sweep's finished runs.

`summarize_sweep` reads each finished run's final eval JSON (at the step its marker names),
`assess_claims` checks the paper's claims against the means and the seed spread, and
`write_tables` writes ``ablation.md`` and ``ablation.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import pathlib
import statistics
from typing import Any, Sequence

from mfer_jax import evaluation
from mfer_jax.ablation.runs import (FUSED, FUSION_ORDER, MARKER, RUN_NAME, SAMPLING_ORDER,
                                    SINGLE, TEMPORAL_ORDER, AblationError, read_json)
from mfer_jax.files import atomic_write_bytes


def summarize_sweep(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """One row per (fusion, sampling, temporal head) over the finished runs in ``workdir``.

  The numbers are read from each run's eval JSON at the step its marker names, so the table is
  exactly what the runs wrote. Row keys: fusion, sampling, temporal, n_seeds, seeds, macro_f1 (per seed),
  macro_f1_mean, macro_f1_std (sample std; NaN for one seed), macro_f1_min, macro_f1_max,
  accuracy (per seed), accuracy_mean, accuracy_std.
  """
  groups: dict[tuple[str, str, str], list[tuple[int, dict[str, Any]]]] = {}
  for run_dir in sorted(pathlib.Path(workdir).glob("*/" + MARKER)):
    run_dir = run_dir.parent
    m = RUN_NAME.match(run_dir.name)
    marker = read_json(run_dir / MARKER)
    if not m or marker is None:
      continue
    final = [e for e in evaluation.read_evals(run_dir) if e["step"] == marker["final_step"]]
    if not final:
      raise AblationError(f"{run_dir}/eval/{marker['final_step']}.json is missing although the "
                          f"run is marked finished; delete {run_dir / MARKER} to rerun it")
    key = (m["fusion"], m["sampling"], m["temporal"] or "none")
    groups.setdefault(key, []).append((int(m["seed"]), final[0]))
  rows = []
  for (fusion, sampling, temporal), runs in groups.items():
    runs.sort(key=lambda r: r[0])
    f1 = [e["macro_f1"] for _, e in runs]
    acc = [e["accuracy"] for _, e in runs]
    rows.append({
        "fusion": fusion, "sampling": sampling, "temporal": temporal, "n_seeds": len(runs),
        "seeds": [s for s, _ in runs], "macro_f1": f1,
        "macro_f1_mean": statistics.fmean(f1), "macro_f1_std": _std(f1),
        "macro_f1_min": min(f1), "macro_f1_max": max(f1),
        "accuracy": acc, "accuracy_mean": statistics.fmean(acc), "accuracy_std": _std(acc)})
  rank = lambda name, order: order.index(name) if name in order else len(order)
  rows.sort(key=lambda r: (rank(r["fusion"], FUSION_ORDER), rank(r["sampling"], SAMPLING_ORDER),
                           rank(r["temporal"], TEMPORAL_ORDER)))
  return rows


def _std(values: Sequence[float]) -> float:
  # Sample std (n-1): with 2-3 seeds the population std would understate the spread.
  return statistics.stdev(values) if len(values) > 1 else math.nan


@dataclasses.dataclass
class Claim:
  title: str
  verdict: str          # supported | partly supported | not shown | not supported | not testable
  details: list[str]


def _temporal(row: dict[str, Any]) -> str:
  return row.get("temporal", "none")


def _by(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
  """The frame-model rows (the paper's claims are about it) by (fusion, sampling)."""
  return {(r["fusion"], r["sampling"]): r for r in rows if _temporal(r) == "none"}


# What one comparison (a margin between two rows' means) shows. A margin inside either row's
# seed spread, or between rows without a spread (one seed), is what another seed could undo,
# so it shows nothing either way (issue 16: inside the noise reads as "not shown").
SHOWN, NOT_SHOWN, AGAINST = "shown", "not shown", "against"


def _evidence(margin: float, *rows: dict[str, Any]) -> tuple[str, str]:
  """Returns (SHOWN | NOT_SHOWN | AGAINST, a note for the detail line) for ``margin``."""
  stds = [r["macro_f1_std"] for r in rows if not math.isnan(r["macro_f1_std"])]
  if len(stds) < len(rows):
    return NOT_SHOWN, " (single seed: no spread to compare against, not shown)"
  if abs(margin) <= max(stds):
    return NOT_SHOWN, f" (within the seed spread, std up to {max(stds):.4f}: not shown)"
  return (SHOWN if margin > 0 else AGAINST), ""


def _overall(statuses: Sequence[str]) -> str:
  """A claim is supported when every comparison shows it, partly when some do, not supported
  when none does and some go against it, and not shown when every margin is inside the noise."""
  if all(s == SHOWN for s in statuses):
    return "supported"
  if SHOWN in statuses:
    return "partly supported"
  return "not supported" if AGAINST in statuses else "not shown"


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
    status, note = _evidence(margin, best, top_single)
    results.append(status)
    details.append(
        f"{sampling} sampling: best fusion `{best['fusion']}` {best['macro_f1_mean']:.4f} vs "
        + ", ".join(f"`{s['fusion']}` {s['macro_f1_mean']:.4f}" for s in singles)
        + f": {'above' if margin > 0 else 'not above'} both (margin {margin:+.4f})" + note)
  claim1 = Claim("The best fusion variant beats each single modality",
                 _overall(results) if results else "not testable",
                 details or ["needs visual_only, audio_only and at least one fusion variant "
                             "(concat, sum, gated, mfm) with the same sampling mode"])
  details, results, higher = [], [], 0
  for fusion in FUSION_ORDER:
    dyn, nat = by.get((fusion, "dynamic")), by.get((fusion, "natural"))
    if dyn is None or nat is None:
      continue
    gain = dyn["macro_f1_mean"] - nat["macro_f1_mean"]
    status, note = _evidence(gain, dyn, nat)
    results.append(status)
    higher += gain > 0
    details.append(f"`{fusion}`: dynamic {dyn['macro_f1_mean']:.4f} vs natural "
                   f"{nat['macro_f1_mean']:.4f} ({gain:+.4f})" + note)
  if results:
    details.insert(0, f"dynamic is higher for {higher} of {len(results)} fusion variants, "
                      f"beyond the seed spread for {results.count(SHOWN)}")
  claim2 = Claim("Dynamic resampling raises macro-F1 over natural sampling",
                 _overall(results) if results else "not testable",
                 details or ["needs the same fusion variant run with both dynamic and natural "
                             "sampling"])
  return [claim1, claim2]


def assess_temporal(rows: Sequence[dict[str, Any]]) -> Claim | None:
  """Whether each temporal head beats the frame model (temporal 'none') with the same fusion
  and sampling; None when the table has no temporal head."""
  frame = _by(rows)
  heads = [r for r in rows if _temporal(r) != "none"]
  if not heads:
    return None
  details, results = [], []
  for r in heads:
    base = frame.get((r["fusion"], r["sampling"]))
    if base is None:
      continue
    gain = r["macro_f1_mean"] - base["macro_f1_mean"]
    status, note = _evidence(gain, r, base)
    results.append(status)
    details.append(f"`{r['fusion']}` {r['sampling']}: {r['temporal']} "
                   f"{r['macro_f1_mean']:.4f} vs frame model {base['macro_f1_mean']:.4f} "
                   f"({gain:+.4f})" + note)
  return Claim("A temporal head raises macro-F1 over the frame model",
               _overall(results) if results else "not testable",
               details or ["needs the frame model (temporal none) with the same fusion and "
                           "sampling as a temporal head"])


def _fmt(mean: float, std: float) -> str:
  return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """The markdown table (also readable as plain text)."""
  temporal = any(_temporal(r) != "none" for r in rows)
  head = "| temporal " if temporal else ""
  lines = [f"| fusion | sampling {head}| macro-F1 (mean ± std) | n | min – max | "
           "accuracy (mean ± std) |",
           "|---|---|" + ("---|" if temporal else "") + "---:|---:|---:|---:|"]
  for r in rows:
    cell = f"{_temporal(r)} | " if temporal else ""
    lines.append(f"| {r['fusion']} | {r['sampling']} | {cell}"
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


CSV_FIELDS = ("fusion", "sampling", "temporal", "n_seeds", "seeds", "macro_f1_mean", "macro_f1_std",
              "macro_f1_min", "macro_f1_max", "accuracy_mean", "accuracy_std", "macro_f1_per_seed",
              "accuracy_per_seed")


def _csv(rows: Sequence[dict[str, Any]]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(CSV_FIELDS)
  for r in rows:
    # repr floats: the CSV round-trips to the eval JSONs' values exactly.
    w.writerow([r["fusion"], r["sampling"], _temporal(r), r["n_seeds"], " ".join(map(str, r["seeds"])),
                *(repr(r[k]) if not math.isnan(r[k]) else "" for k in
                  ("macro_f1_mean", "macro_f1_std", "macro_f1_min", "macro_f1_max",
                   "accuracy_mean", "accuracy_std")),
                " ".join(map(repr, r["macro_f1"])), " ".join(map(repr, r["accuracy"]))])
  return buf.getvalue()


def write_tables(workdir: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes ablation.md and ablation.csv from the finished runs; returns their paths."""
  workdir = pathlib.Path(workdir)
  rows = summarize_sweep(workdir)
  markers = [read_json(p) or {} for p in sorted(workdir.glob("*/" + MARKER))]
  unfinished = sorted(p.name for p in workdir.iterdir()
                      if p.is_dir() and RUN_NAME.match(p.name) and not (p / MARKER).exists())
  configs = sorted({f"{m.get('config')}:{m.get('config_arg', '')}" for m in markers})
  overrides = sorted({o for m in markers for o in m.get("overrides", [])})
  md = [f"# Ablation: {workdir.name}", "",
        f"Config: {', '.join(f'`{c}`' for c in configs) or '?'}"
        + (f"; overrides: {', '.join(f'`{o}`' for o in overrides)}" if overrides else ""), "",
        "Validation macro-F1 of each run's final evaluation (`eval/<last step>.json`), mean ± "
        "sample std over seeds; n is the number of finished seeds.", "",
        format_table(rows), "", "## The paper's claims on this table", "",
        format_claims(assess_claims(rows)), ""]
  temporal = assess_temporal(rows)
  if temporal is not None:
    md += ["## Temporal heads", "", format_claims([temporal]), ""]
  if unfinished:
    md += [f"Not finished (not in the table): {', '.join(unfinished)}.", ""]
  md_path, csv_path = workdir / "ablation.md", workdir / "ablation.csv"
  atomic_write_bytes(csv_path, _csv(rows).encode())
  atomic_write_bytes(md_path, "\n".join(md).encode())
  return md_path, csv_path

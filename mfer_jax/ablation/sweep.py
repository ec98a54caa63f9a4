"""The paper's ablations from one command: fusion variants x sampling modes x temporal heads x
seeds.

  python -m mfer_jax.tools.ablate --config=configs/demo.py --workdir=runs/ablate
  python -m mfer_jax.tools.ablate --config=configs/abaw.py:size=small --workdir=runs/abl \\
      --sweep=concat,mfm --sampling=dynamic --seeds=0,1,2 \\
      --override=data.data_dir=/data/affwild2_prepared --override=train.num_epochs=5
  python -m mfer_jax.tools.ablate --config=configs/demo.py --workdir=runs/ablate --dry_run

Each run trains with ``main.py --config=<file>:<base arg>,fusion=F,sampling=S,seed=K
--workdir=DIR/F-S-seedK`` (plus ``--config.<override>`` for each ``--override``), one after
the other, each in its own subprocess: a crash, an OOM or a hung compile in one run is reported
and the sweep goes on, no JAX state (compile caches, device buffers) leaks from one run into
the next, and every run is exactly what the printed command reproduces by hand. The cost, a
few seconds of start-up per run, is small next to training.

Resuming: a run is finished when its training loop wrote its FINISHED marker
(`mfer_jax.training.run_status`); the sweep then records it in ``ablate_done.json`` with the
sweep spec, and finished runs are never rerun. Any other run is started again and main.py
resumes it from its own newest checkpoint. Ctrl-C or SIGTERM asks the running child to save a
checkpoint and stop (it exits 143 with a PREEMPTED marker), then the sweep exits 143 too, so
rerunning the same command continues.

Outputs in DIR: ``ablation.md`` and ``ablation.csv`` (macro-F1 and accuracy per variant, mean
± sample std over seeds, with the paper's two claims checked against the table), ``ablate.log``
(one line per run started, skipped, finished or failed) and each run's ``train.log``.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from mfer_jax import config_lib, errors
from mfer_jax.ablation import tables
from mfer_jax.ablation.runs import (DEFAULT_SWEEP, FUSION_ORDER, MARKER, SAMPLING_ORDER,
                                    SWEEP_KEYS, TEMPORAL_ORDER, AblationError,
                                    AblationUsageError, RunStatus,
                                    Variant, read_json)
from mfer_jax.files import atomic_write_json
from mfer_jax.training import run_status

MAIN = pathlib.Path(__file__).resolve().parents[2] / "main.py"


# --- Config handling -------------------------------------------------------------------------


def split_config_arg(config: str) -> tuple[pathlib.Path, str]:
  """``path[:arg]`` -> (absolute path, arg)."""
  path, _, arg = config.partition(":")
  path = pathlib.Path(path).resolve()
  if not path.is_file():
    raise AblationUsageError(f"--config: {path} is not a file (expected e.g. configs/abaw.py)")
  return path, arg


def merged_arg(base_arg: str, variant: Variant) -> str:
  """The base config argument plus the variant's keys; the sweep owns fusion, sampling,
  temporal and seed."""
  items = [i for i in base_arg.split(",") if i.strip()]
  clash = [i for i in items if i.partition("=")[0].strip() in SWEEP_KEYS]
  if clash:
    raise AblationUsageError(f"--config argument sets {clash}, but the sweep sets "
                             f"{SWEEP_KEYS} itself: use --sweep, --sampling, --temporal and --seeds "
                             "instead")
  return ",".join(items + [variant.arg])


def _load_get_config(path: pathlib.Path) -> Callable[[str], Any]:
  spec = importlib.util.spec_from_file_location(f"_ablate_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AblationUsageError(f"{path} has no get_config(arg)")
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
      raise AblationUsageError(f"{path.name}:{merged_arg(base_arg, v)}: {e}") from e
    got = (c.model.fusion.name, c.data.sampling.mode, c.model.temporal.name, int(c.seed))
    if got != (v.fusion, v.sampling, v.temporal, v.seed):
      raise AblationUsageError(
          f"{path.name}:{merged_arg(base_arg, v)} gave fusion/sampling/temporal/seed {got}: "
          "this config "
          "file ignores its variant argument. Use a config whose get_config(arg) ends with "
          "config_lib.apply_variant_args(c, arg), like configs/abaw.py and configs/demo.py.")
    for o in overrides:
      key, sep, _ = o.partition("=")
      node = c
      for part in key.split("."):
        if not sep or not hasattr(node, "keys") or part not in node.keys():
          close = difflib.get_close_matches(part, list(node.keys()) if hasattr(node, "keys")
                                            else [], n=1)
          hint = f"; did you mean {close[0]!r}?" if close else ""
          raise AblationUsageError(f"--override={o}: expected key=value with an existing "
                                   f"config key (e.g. data.data_dir=/data/prepared); {key!r} is "
                                   f"not one{hint}")
        node = node[part]
    try:
      config_lib.validate(c)
    except errors.UsageError as e:
      raise AblationUsageError(f"{path.name}:{merged_arg(base_arg, v)}: {e}") from e


def run_command(config_path: pathlib.Path, base_arg: str, variant: Variant,
                run_dir: pathlib.Path, overrides: Sequence[str],
                python: str = sys.executable) -> list[str]:
  """The main.py command line that trains one variant."""
  return [python, str(MAIN), f"--config={config_path}:{merged_arg(base_arg, variant)}",
          f"--workdir={run_dir}", *[f"--config.{o}" for o in overrides]]


# --- Completion ------------------------------------------------------------------------------


def final_eval_if_complete(run_dir: pathlib.Path) -> dict[str, Any] | None:
  """The run's final evaluation if its training loop finished, else None.

  The loop itself says so: it writes ``FINISHED.json`` (`mfer_jax.training.run_status`) after
  the last step's evaluation and checkpoint, and never for a preempted (exit 143), failed or
  killed run.
  """
  marker = run_status.finished(run_dir)
  if marker is None:
    return None
  return read_json(run_dir / marker["eval"]) or {"step": marker["step"],
                                                 "macro_f1": marker["macro_f1"],
                                                 "accuracy": marker["accuracy"]}


def _spec(config_path: pathlib.Path, base_arg: str, overrides: Sequence[str]) -> dict[str, Any]:
  """What makes two runs of the same variant the same experiment (kept in the marker)."""
  return {"config": str(config_path), "config_arg": base_arg, "overrides": sorted(overrides)}


# --- Running ---------------------------------------------------------------------------------


class Stop(Exception):
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
    except (KeyboardInterrupt, Stop):
      proc.send_signal(signal.SIGTERM)
      proc.wait()
      raise


def _tail(path: pathlib.Path, n: int = 15) -> str:
  try:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
  except OSError:
    return ""


def variants_of(fusions: Sequence[str], samplings: Sequence[str], seeds: Sequence[int],
                temporals: Sequence[str] = ("none",)) -> list[Variant]:
  bad = [f for f in fusions if f not in FUSION_ORDER]
  bad += [s for s in samplings if s not in SAMPLING_ORDER]
  bad += [t for t in temporals if t not in TEMPORAL_ORDER]
  if bad:
    raise AblationUsageError(f"unknown variant names {bad}: fusions are {FUSION_ORDER}, "
                             f"sampling modes {SAMPLING_ORDER}, temporal heads {TEMPORAL_ORDER}")
  if not (fusions and samplings and seeds and temporals):
    raise AblationUsageError("--sweep, --sampling, --temporal and --seeds each need at least "
                             "one value")
  return [Variant(f, s, int(k), t) for f in fusions for s in samplings for t in temporals
          for k in seeds]


def run_sweep(config: str, workdir: str | os.PathLike,
              fusions: Sequence[str] = DEFAULT_SWEEP,
              samplings: Sequence[str] = SAMPLING_ORDER, seeds: Sequence[int] = (0,),
              overrides: Sequence[str] = (), dry_run: bool = False,
              python: str = sys.executable,
              say: Callable[[str], None] = print,
              temporals: Sequence[str] = ("none",)) -> list[RunStatus]:
  """Trains every variant not finished yet, then writes ablation.md / ablation.csv.

  Args:
    config: ``path[:arg]`` of a config file whose ``get_config(arg)`` applies
      ``config_lib.apply_variant_args``; the sweep appends fusion, sampling and seed to arg.
    workdir: the sweep directory; run k goes to ``workdir/<fusion>-<sampling>-seed<k>``.
    fusions, samplings, seeds: the grid (every combination runs).
    temporals: temporal heads, a fourth axis of the grid ('none' is the frame model unless the
      base config argument sets ``clip=T``; a head on a frame-mode config gets clips of
      ``config_lib.DEFAULT_CLIP_LENGTH``).
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
  variants = variants_of(fusions, samplings, seeds, temporals)
  check_config(config_path, base_arg, variants, overrides)
  spec = _spec(config_path, base_arg, overrides)
  statuses = []
  for v in variants:
    run_dir = workdir / v.name
    marker = read_json(run_dir / MARKER)
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
    tables.write_tables(workdir)
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
  if code == errors.EXIT_PREEMPTED:
    # Someone preempted the child itself: the machine is going away, so stop the sweep too.
    _log(workdir, f"preempted {v.name} after {seconds:.0f} s (it saved a checkpoint)", say)
    raise Stop()
  final = final_eval_if_complete(run_dir) if code == 0 else None
  if final is None:
    why = f"exit code {code}" if code else "exited without reaching its last step"
    _log(workdir, f"FAILED {v.name} after {seconds:.0f} s ({why}); last lines of "
         f"{run_dir / 'train.log'}:\n{_tail(run_dir / 'train.log')}", say)
    return RunStatus(v, run_dir, "failed", why)
  atomic_write_json(run_dir / MARKER, {
      **spec, "fusion": v.fusion, "sampling": v.sampling, "temporal": v.temporal, "seed": v.seed,
      "final_step": final["step"], "macro_f1": final["macro_f1"],
      "command": cmd, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
  _log(workdir, f"done {v.name} in {seconds:.0f} s: macro-F1 {final['macro_f1']:.4f} at step "
       f"{final['step']}", say)
  return RunStatus(v, run_dir, "ran", f"macro-F1 {final['macro_f1']:.4f}")

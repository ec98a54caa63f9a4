r"""The paper's ablations from one command: fusion variants x sampling modes x temporal heads
x seeds.

  python -m mfer_jax.tools.ablate --config=configs/demo.py --workdir=runs/ablate
  python -m mfer_jax.tools.ablate --config=configs/abaw.py:size=small --workdir=runs/abl \
      --sweep=concat,mfm --sampling=dynamic --seeds=0,1,2 \
      --override=data.data_dir=/data/affwild2_prepared --override=train.num_epochs=5
  python -m mfer_jax.tools.ablate --config=configs/demo.py --workdir=runs/temporal \
      --sweep=mfm --sampling=dynamic --temporal=none,transformer,tcn --seeds=0,1,2
  python -m mfer_jax.tools.ablate --config=configs/demo.py --workdir=runs/ablate --dry_run

Each run is one main.py subprocess (`mfer_jax.ablation.sweep`); finished runs are never
rerun, interrupted ones resume. Writes ablation.md / ablation.csv in --workdir.
"""

from __future__ import annotations

import pathlib
import signal

from absl import flags

from mfer_jax import cli, errors
from mfer_jax.ablation import runs, sweep, tables

_CONFIG = flags.DEFINE_string(
    "config", None, "Config file[:base arg], e.g. configs/demo.py or configs/abaw.py:size=small "
    "(fusion/sampling/temporal/seed come from the sweep flags).", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory; each run gets a subdirectory.",
                               required=True)
_SWEEP = flags.DEFINE_list("sweep", list(runs.DEFAULT_SWEEP),
                           f"Fusion variants, of {', '.join(runs.FUSION_ORDER)}.")
_SAMPLING = flags.DEFINE_list("sampling", list(runs.SAMPLING_ORDER),
                              "Sampling modes to run each fusion with: "
                              f"{', '.join(runs.SAMPLING_ORDER)}.")
_TEMPORAL = flags.DEFINE_list("temporal", ["none"], "Temporal heads, of "
                              f"{', '.join(runs.TEMPORAL_ORDER)}; 'none' is the frame model "
                              "(unless the config argument sets clip=T), a head gets clips of "
                              "16 frames on a frame-mode config.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds, e.g. 0,1,2.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "key=value passed to every run as "
                                      "--config.key=value, e.g. data.data_dir=/data "
                                      "(repeatable).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the runs and which are finished; run none.")


def _raise_stop(signum, frame):
  del signum, frame
  raise sweep.Stop()


def main() -> None:
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    raise errors.UsageError(f"--seeds={','.join(_SEEDS.value)}: expected integers such as "
                            "0,1,2") from None
  signal.signal(signal.SIGTERM, _raise_stop)
  say = lambda msg: print(msg, flush=True)  # noqa: E731
  try:
    statuses = sweep.run_sweep(_CONFIG.value, _WORKDIR.value, _SWEEP.value, _SAMPLING.value,
                               seeds, _OVERRIDE.value, _DRY_RUN.value, say=say,
                               temporals=_TEMPORAL.value)
  except (KeyboardInterrupt, sweep.Stop):
    raise errors.Preempted("the running variant saved a checkpoint and stopped (its "
                           "PREEMPTED.json); rerun the same command to continue") from None
  workdir = pathlib.Path(_WORKDIR.value).resolve()
  if _DRY_RUN.value:
    for s in statuses:
      print(f"{s.status:<9} {s.variant.name:<28} {s.workdir} {s.detail}")
    n = sum(s.status == "finished" for s in statuses)
    print(f"{n} of {len(statuses)} runs finished")
    return
  rows = tables.summarize_sweep(workdir)
  temporal = tables.assess_temporal(rows)
  print("\n" + tables.format_table(rows) + "\n\n"
        + tables.format_claims(tables.assess_claims(rows) + ([temporal] if temporal else [])))
  print(f"\nWrote {workdir / 'ablation.md'} and {workdir / 'ablation.csv'}")
  failed = [s.variant.name for s in statuses if s.status == "failed"]
  if failed:
    cli.fail(f"{len(failed)} run(s) failed: {', '.join(failed)}; see their train.log and rerun "
             "the same command to retry them (finished runs are kept)")


if __name__ == "__main__":
  cli.run(main)

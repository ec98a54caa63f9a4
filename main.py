"""Train or evaluate the audio-visual expression model.

  python main.py --config=configs/abaw.py --workdir=runs/abaw
  python main.py --config=configs/abaw.py:fusion=gated --workdir=runs/gated
  python main.py --config=configs/demo.py --workdir=runs/demo        # no data needed
  python main.py --config=configs/abaw.py --workdir=runs/abaw --mode=eval

Override any config value with --config.a.b=value (unknown keys are an error). A rerun of the
same command resumes from the workdir's latest checkpoint. Exit codes: 0 done, 1 data or run
error, 2 bad flag or config, 143 preempted after saving (rerun to resume).
"""

from absl import flags
from ml_collections import config_flags

from data_prep import api as data_prep_api
from mfer_jax import cli, config_lib, runner

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/abaw.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, evals).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (resumes automatically) or eval of the workdir's best checkpoint.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 for multi-host runs (jax.distributed); "
    "empty: auto-detect from SLURM / Cloud TPU / JAX_COORDINATOR_ADDRESS, else single-host.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config", "workdir"])


def main() -> None:
  config_lib.validate(_CONFIG.value)   # before any data preparation or device work
  runner.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                      _PROCESS_ID.value)
  # The demo config names a synthetic set; making it is data preparation, not the library's.
  data_prep_api.prepare_for_config(_CONFIG.value)
  runner.run(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
  cli.run(main)

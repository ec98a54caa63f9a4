"""What ``main.py`` runs: multi-host set-up, then train or eval, and the summary it prints."""

from __future__ import annotations

import os
import pathlib

import jax
from absl import logging
from ml_collections import ConfigDict

from mfer_jax import evaluation
from mfer_jax.training import loop


def maybe_initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> None:
  """Calls ``jax.distributed.initialize`` when flags or the environment ask for it.

  Explicit flags win. Otherwise a cluster environment (``JAX_COORDINATOR_ADDRESS``, SLURM with
  several tasks, or a multi-worker Cloud TPU slice) lets JAX auto-detect the topology. A
  single machine needs nothing.
  """
  env = os.environ
  auto = (env.get("JAX_COORDINATOR_ADDRESS")
          or int(env.get("SLURM_NTASKS", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if not coordinator_address and not auto:
    return
  # Cross-process collectives of the CPU backend go through gloo (tests run two processes on
  # 127.0.0.1); the option only concerns CPU devices. Asking jax.default_backend() here would
  # initialise the backend, which must wait until after jax.distributed.initialize.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def run(config: ConfigDict, workdir: str, mode: str) -> dict:
  """Runs ``mode`` ('train' or 'eval') and prints a readable summary.

  The summary is printed only for a finished training run or evaluation. User errors
  (missing or damaged data and checkpoints, bad init files, NaN losses) and preemption
  (`errors.Preempted`, after a checkpoint was saved) propagate; `mfer_jax.cli.run` turns
  them into one line and an exit code.
  """
  if mode == "train":
    result = loop.train_and_evaluate(config, workdir)
  else:
    result = loop.evaluate_workdir(config, workdir)
  if jax.process_index() == 0:
    wd = pathlib.Path(workdir)
    print("\n" + evaluation.format_summary(result))
    if mode == "train":
      print(f"\nOutputs in {wd}/: checkpoints/, eval/<step>.json, metrics.jsonl, tensorboard/, "
            "config.json, FINISHED.json")
    else:
      print(f"\nCheckpoint step {result['step']}; wrote {result['path']}")
  return result

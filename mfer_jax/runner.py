"""What ``main.py`` runs: multi-host set-up, demo data, train or eval, and user-facing errors."""

from __future__ import annotations

import os
import pathlib
import sys

import jax
from absl import logging
from ml_collections import ConfigDict

from mfer_jax import evaluation
from mfer_jax.data import store
from mfer_jax.training import init_files, loop

# Errors whose message already tells the user what to do: print it, no traceback.
USER_ERRORS = (store.DatasetError, init_files.InitFileError, loop.NonFiniteLossError)


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


def prepare_synthetic_data(config: ConfigDict) -> None:
  """Generates and prepares the synthetic Aff-Wild2-format set if ``config.synthetic`` asks."""
  syn = config.get("synthetic")
  if not syn or not syn.enabled:
    return
  from data_prep import api  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    api.ensure_demo_dataset(syn.raw_dir, config.data.data_dir, num_videos=syn.num_videos,
                            seed=syn.seed, workers=syn.workers, seconds=tuple(syn.seconds))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("synthetic data ready")


def run(config: ConfigDict, workdir: str, mode: str) -> dict | None:
  """Runs ``mode`` ('train' or 'eval') and prints a readable summary; exits 1 on user errors."""
  try:
    prepare_synthetic_data(config)
    if mode == "train":
      result = loop.train_and_evaluate(config, workdir)
    else:
      result = loop.evaluate_workdir(config, workdir)
  except USER_ERRORS as e:
    sys.stderr.write(f"\nerror: {e}\n")
    if isinstance(e, store.DatasetError) and not config.get("synthetic"):
      sys.stderr.write("(configs/demo.py runs without any data: it makes a synthetic "
                       "Aff-Wild2-format set itself.)\n")
    sys.exit(1)
  if result is not None and jax.process_index() == 0:
    wd = pathlib.Path(workdir)
    print("\n" + evaluation.format_summary(result))
    print(f"\nOutputs in {wd}/: checkpoints/, eval/<step>.json, metrics.jsonl, tensorboard/, "
          "config.json")
  return result

"""Helpers shared by the training tests (test_training_{step,loop,resume}.py): the
deterministic tiny config, one compiled step with its first batch, main.py runs and what they
write."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from conftest import tiny_config
from mfer_jax import sharding
from mfer_jax.data import pipeline, store
from mfer_jax.training import checkpointing
from mfer_jax.training import optimizer
from mfer_jax.training import state as state_lib
from mfer_jax.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.py"


def deterministic_config(data_dir):
  """The tiny config without dropout, drop path or modality dropout: exact comparisons."""
  config = tiny_config(data_dir)
  config.model.modality_dropout = 0.0
  config.model.fusion.dropout = 0.0
  for enc in (config.model.image, config.model.audio):
    enc.drop_path_rate = 0.0
  return config


def pieces(config, mesh):
  """(spec, state, state shardings, the compiled train step, the first local batch) of
  ``config`` on ``mesh``, built as training builds them."""
  spec = state_lib.ModelSpec(config.model)
  tx, schedule = optimizer.make_optimizer(config.train, 100)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  it = pipeline.make_train_iterator(config.data, store.load_split(config.data.data_dir, "train"))
  local = step_lib.model_inputs(next(it))
  it.close()
  batch = pipeline.to_global_batch(local, mesh)
  step = step_lib.make_train_step(spec, tx, schedule, config, mesh, state_sh,
                                  jax.tree.map(lambda x: x.sharding, batch), np.ones(8))
  return spec, state, state_sh, step, local


def run_main(*args, check=True):
  proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def logged_losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in rows]


def final_params(workdir, step):
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  restored = ckpt.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpt.close()
  return restored.state["params"]


def restore_state(workdir, config, step):
  """The sharded train state of checkpoint ``step`` (EMA included when the config keeps one)."""
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 1)
  state_sh = state_lib.state_shardings(spec, tx, mesh, config.mesh.rules,
                                       ema=state_lib.uses_ema(config.train))
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  try:
    state = ckpt.restore_state_only(step, state_lib.abstract_state(state_sh, spec, tx))
  finally:
    ckpt.close()
  return state, (mesh, spec, state_sh)

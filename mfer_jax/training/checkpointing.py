"""Orbax checkpoints of the train state together with the Grain iterator state.

A checkpoint step holds two items: ``state`` (params, optimizer, step, RNG key, NaN flag) and
``data`` (the input iterator's position and sampler state), so a resumed run draws the very
batches an uninterrupted run would. Saving is asynchronous; the newest ``keep`` checkpoints
are kept, plus the best one by validation macro-F1.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from mfer_jax import errors


class CheckpointMismatchError(errors.UserError, ValueError):
  """A checkpoint whose model is not the one the config builds; names both."""


def _temporal_head_of(param_keys: dict[str, Any] | None) -> str:
  """'none', 'transformer' or 'tcn', from the top level of a params tree."""
  temporal = (param_keys or {}).get("temporal")
  if not temporal:
    return "none"
  return "tcn" if "convs" in temporal else "transformer"


class Checkpointer:
  """Thin owner of an Orbax CheckpointManager at ``<workdir>/checkpoints``.

  Args:
    workdir: run directory.
    keep: how many of the newest checkpoints to keep (the best-by-macro-F1 one is kept too).
    async_save: write in a background thread, so training continues during the write.
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=keep),
        cm.BestN(get_metric_fn=lambda m: m["macro_f1"], reverse=False, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, state: Any, data_iterator: Any,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts saving ``state`` and the iterator position at ``step`` (async)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iterator))
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores the state into ``abstract_state``'s shardings and rewinds the iterator."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=grain.checkpoint.CheckpointRestore(data_iterator))
    return self.manager.restore(step, args=args).state

  def restore_state_only(self, step: int, abstract_state: Any) -> Any:
    """Restores just the train state (evaluation and prediction need no iterator)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    return self.manager.restore(step, args=args).state

  def check_temporal_head(self, step: int, config: Any) -> None:
    """Raises a one-line error if checkpoint ``step`` and ``config`` disagree on the temporal
    head (a frame-mode config on a temporal checkpoint, or the reverse), before Orbax would
    fail with a tree-structure dump."""
    try:
      tree = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state").tree
    except (OSError, ValueError, KeyError):
      return   # unreadable metadata: let the restore report it
    saved = _temporal_head_of(tree.get("params"))
    wanted = config.model.temporal.name
    if saved != wanted:
      mode = lambda head: "frame mode" if head == "none" else f"temporal head {head!r}"  # noqa: E731
      raise CheckpointMismatchError(
          f"checkpoint {self.directory / str(step)} holds a model with {mode(saved)}, but the "
          f"config asks for {mode(wanted)} (model.temporal.name={wanted!r}); use the config the "
          "run was trained with (its config.json), or a new --workdir")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


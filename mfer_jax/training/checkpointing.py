"""Orbax checkpoints of the train state together with the Grain iterator state.

A checkpoint step holds two items: ``state`` (params, optimizer, step, RNG key, NaN flag) and
``data`` (the input iterator's position and sampler state), so a resumed run draws the very
batches an uninterrupted run would. Saving is asynchronous; the newest ``keep`` checkpoints
are kept, plus the best one by validation macro-F1.

Restoring verifies what it reads (`Checkpointer.restore_newest_good`). A step that cannot be
read (a missing or truncated array file, a deleted ``manifest.ocdbt``, an emptied folder,
or, when the iterator is restored too, a damaged iterator JSON) is reported in one line
naming the step and the cause, renamed to ``<step>.corrupt`` (never deleted; Orbax ignores
the name) and the next newest step is tried.
If none can be read, `CheckpointError` stops the run: it never starts from scratch over
existing checkpoints. A checkpoint whose arrays do not match the config (another model size,
say) is not damage: `CheckpointMismatchError` names the first differing array and nothing is
renamed.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging as std_logging
import os
import pathlib
import re
import sys
import traceback
import warnings
from typing import Any, Sequence

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from mfer_jax import console, errors

CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(errors.UserError, RuntimeError):
  """No readable checkpoint where one is needed; the message names the folder and the fix."""


class CheckpointMismatchError(errors.UserError, ValueError):
  """A readable checkpoint whose arrays do not match the config (another model, say)."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """A restored checkpoint: its step and the train state (iterator restored in place)."""

  step: int
  state: Any


def _cause(e: BaseException, limit: int = 240) -> str:
  """One short line for an exception from Orbax or TensorStore.

  Orbax wraps TensorStore's error in a generic one ("Encountered error while reading array
  index ... See full TensorStore details"), so the innermost cause says more; TensorStore
  appends its whole JSON spec, which is cut off.
  """
  inner = e
  while inner.__cause__ is not None and str(inner.__cause__):
    inner = inner.__cause__
  text = re.split(r" \[tensorstore_spec", errors.one_line(str(inner)))[0]
  text = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _dotted(path: Sequence[Any]) -> str:
  """``.opt_state[1][0].mu['x'].value`` -> ``opt_state.1.0.mu.x.value`` (Orbax's names)."""
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


class _FailedRestoreLeftovers(std_logging.Filter):
  """Drops asyncio's "exception was never retrieved" reports of Orbax/TensorStore reads.

  Which of them names Orbax or TensorStore varies: a Task's message names its Orbax
  coroutine; a _GatheringFuture's exception says "TensorStore details" and carries Orbax's
  frames; a bare Future's is TensorStore's read error of the OCDBT checkpoint, without frames.
  So the message, each exception of the chain and its frames' files are searched.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    text = record.getMessage()
    if "never retrieved" not in text:
      return True
    parts, seen = [text], set()
    exc = record.exc_info[1] if record.exc_info else None
    while exc is not None and id(exc) not in seen:
      seen.add(id(exc))
      parts.append(str(exc))
      parts += [frame.filename for frame in traceback.extract_tb(exc.__traceback__)]
      exc = exc.__cause__ or exc.__context__
    blob = " ".join(parts).lower()
    return not any(k in blob for k in ("orbax", "tensorstore", "ocdbt"))


_leftovers_silenced = False


def _is_failed_restore_leftover(info: Any) -> bool:
  """Whether an unraisable exception (`sys.UnraisableHookArgs`) is a failed restore's
  leftover read: "Event loop is closed", or an Orbax coroutine that raised while the
  garbage collector closed it (its exception caused by that GeneratorExit)."""
  exc = info.exc_value
  if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
    return True
  code = getattr(info.object, "cr_code", None)
  return (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
          and isinstance(exc, Exception)
          and isinstance(exc.__cause__ or exc.__context__, GeneratorExit))


def _silence_failed_restore_leftovers() -> None:
  """Keeps a failed restore's leftover asyncio tasks from printing tracebacks.

  When one array of a checkpoint cannot be read, Orbax's restore raises while its other
  reads are still pending on an event loop it then closes; those tasks complain later, when
  they are garbage-collected (as late as interpreter exit): "Task exception was never
  retrieved" through asyncio's logger, and through `sys.unraisablehook` "Event loop is
  closed" or, for a read coroutine that the collector closes while it waits, "Exception
  ignored in: <coroutine object ...>" (Orbax's broad ``except`` around the read turns the
  collector's GeneratorExit into another read error: a truncated array file printed 41 such
  tracebacks through `mfer_jax.tools.predict`). The failure itself is reported in one line,
  so exactly these reports are dropped (`_is_failed_restore_leftover`; others pass).
  Installed before the first restore, not after a failure: a TensorStore thread can finish a
  read on the just-closed loop before the failing restore has even returned to our handler
  (a CI run printed that one traceback).
  """
  global _leftovers_silenced
  if _leftovers_silenced:
    return
  _leftovers_silenced = True
  std_logging.getLogger("asyncio").addFilter(_FailedRestoreLeftovers())
  hook = sys.unraisablehook

  def unraisable(info):
    if not _is_failed_restore_leftover(info):
      hook(info)

  sys.unraisablehook = unraisable


def _macro_f1(metrics: dict[str, float]) -> float:
  return metrics["macro_f1"]


class _NoMetricsWarning(std_logging.Filter):
  """Drops Orbax's warning for a save without metrics: only evaluated steps have one."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return "did not provide metrics" not in str(record.msg)


std_logging.getLogger("absl").addFilter(_NoMetricsWarning())


def _temporal_head(names) -> str:
  """'none', 'transformer' or 'tcn': the temporal head whose params ``names`` (dotted array
  names of a train state) hold."""
  temporal = [n for n in names if n.startswith("params.temporal.")]
  if not temporal:
    return "none"
  return "tcn" if any(".conv." in n for n in temporal) else "transformer"


def _mode(head: str) -> str:
  return "frame mode" if head == "none" else f"temporal head {head!r}"


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
        cm.BestN(get_metric_fn=_macro_f1, reverse=False, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    # best_fn makes Orbax write each step's metrics to disk (and read them back after a
    # restart) and `best_step()` use them; without it, best_step() is the latest step and a
    # resumed run forgets which checkpoint was best. The explicit policy decides what is kept.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_macro_f1, best_mode="max",
        enable_async_checkpointing=async_save, create=True)
    self._move_aside_unreadable_metrics()
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def _move_aside_unreadable_metrics(self) -> None:
    """A step whose metrics JSON is damaged would stop Orbax from listing any step."""
    if not self.directory.is_dir():
      return
    for path in self.directory.glob("*/metrics/metrics"):
      try:
        json.loads(path.read_text())
      except (OSError, ValueError) as e:
        step = path.parent.parent.name
        if step.isdigit():
          moved = self._move_aside(int(step))
          console.say(f"warning: checkpoint step {step} in {self.directory} has unreadable "
                      f"metrics ({type(e).__name__}: {e}); moved it to {moved.name}")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def corrupt_steps(self) -> list[str]:
    """Names of the step folders moved aside as unreadable (``<step>.corrupt``)."""
    if not self.directory.is_dir():
      return []
    return sorted((p.name for p in self.directory.iterdir()
                   if CORRUPT_SUFFIX in p.name), key=lambda n: (len(n.split(".")[0]), n))

  def save(self, step: int, state: Any, data_iterator: Any,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts saving ``state`` and the iterator position at ``step`` (async)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iterator))
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def save_if_absent(self, step: int, state: Any, data_iterator: Any) -> bool:
    """Saves ``step`` unless a checkpoint of it exists; waits until it is written."""
    self.manager.reload()
    if step in self.manager.all_steps():
      return False
    self.save(step, state, data_iterator, force=True)
    self.wait()
    return True

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores the state into ``abstract_state``'s shardings and rewinds the iterator.

    No verification or fallback: see `restore_newest_good`.
    """
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=grain.checkpoint.CheckpointRestore(data_iterator))
    return self.manager.restore(step, args=args).state

  def restore_state_only(self, step: int, abstract_state: Any) -> Any:
    """Restores just the train state (evaluation and prediction need no iterator)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    return self.manager.restore(step, args=args).state

  def restore_newest_good(self, abstract_state: Any, data_iterator: Any = None, *,
                          prefer_best: bool = False) -> Restored | None:
    """Restores the newest readable checkpoint, moving unreadable ones aside.

    Args:
      abstract_state: the restore target (shapes, dtypes and shardings), from
        `mfer_jax.training.state.abstract_state`.
      data_iterator: the train iterator to rewind too; None restores the state alone (for
        evaluation and prediction).
      prefer_best: try the best step by validation macro-F1 first (evaluation, prediction).

    Returns:
      The restored step and state, or None if the folder holds no checkpoint at all (and
      none moved aside), so the caller may start from its init files or from scratch.

    Raises:
      CheckpointError: checkpoints exist (or were moved aside) but none can be read.
      CheckpointMismatchError: a checkpoint is readable but its arrays do not match
        ``abstract_state`` (the config changed); nothing is renamed.
    """
    _silence_failed_restore_leftovers()
    moved_any = False
    while True:
      self.manager.reload()
      steps = sorted(self.manager.all_steps(), reverse=True)
      if not steps:
        break
      best = self.manager.best_step() if prefer_best else None
      step = best if best is not None else steps[0]
      try:
        if data_iterator is None:
          state = self.restore_state_only(step, abstract_state)
        else:
          state = self.restore(step, abstract_state, data_iterator)
        return Restored(step, state)
      except Exception as e:  # pylint: disable=broad-exception-caught
        # Orbax and TensorStore raise plain Exception/ValueError/KeyError/OSError for damage;
        # the saved metadata tells a config mismatch (our error to report) from damage.
        with warnings.catch_warnings():
          # Leftover reads that never started: "coroutine ... was never awaited".
          warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
          gc.collect()   # the leftover reads, now rather than at some later moment
        self._raise_if_mismatch(step, abstract_state)
        cause = _cause(e)
      moved = self._move_aside(step)
      moved_any = True
      console.say(f"warning: checkpoint step {step} in {self.directory} cannot be read "
                  f"({cause}); moved it to {moved.name} and trying the previous one")
    corrupt = self.corrupt_steps()
    if not moved_any and not corrupt:
      return None
    raise CheckpointError(
        f"no readable checkpoint in {self.directory} (unreadable steps were moved aside: "
        f"{', '.join(corrupt)}); restore them from a backup, or to start over move "
        f"{self.directory} away or use a new --workdir")

  def _move_aside(self, step: int) -> pathlib.Path:
    """Renames step folder ``step`` to ``<step>.corrupt`` (``.corrupt.1`` ... if taken)."""
    src = self.directory / str(step)
    dst = self.directory / f"{step}{CORRUPT_SUFFIX}"
    n = 0
    while dst.exists():
      n += 1
      dst = self.directory / f"{step}{CORRUPT_SUFFIX}.{n}"
    if jax.process_index() == 0:
      os.replace(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    return dst

  def _raise_if_mismatch(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointMismatchError if step's saved array names or shapes differ from the
    target's; returns quietly if they match or the metadata itself is unreadable."""
    try:
      saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
      saved = {m.name: tuple(m.shape) for m in jax.tree.leaves(saved.tree)
               if hasattr(m, "shape")}
    except Exception:  # pylint: disable=broad-exception-caught
      return   # the metadata is damaged too: damage, not a mismatch
    if not saved:
      return
    # PRNG keys are stored as their raw uint32 data, so only their presence is compared.
    wanted = {_dotted(p): (None if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
                           else tuple(leaf.shape))
              for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    params_first = lambda k: (not k.startswith("params."), k)  # noqa: E731
    missing = sorted(set(wanted) - set(saved), key=params_first)
    extra = sorted(set(saved) - set(wanted), key=params_first)
    shapes = sorted((k for k in set(wanted) & set(saved)
                     if wanted[k] is not None and wanted[k] != saved[k]), key=params_first)
    if not (missing or extra or shapes):
      return
    saved_head, wanted_head = _temporal_head(saved), _temporal_head(wanted)
    if saved_head != wanted_head:
      # The likeliest mismatch of a temporal run, named as such rather than by one array.
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} holds a model with "
          f"{_mode(saved_head)}, but the config asks for {_mode(wanted_head)} "
          f"(model.temporal.name={wanted_head!r}): use the config the run was trained with "
          "(its config.json), or a new --workdir")
    if shapes:
      what = f"{shapes[0]} is {saved[shapes[0]]} there but {wanted[shapes[0]]} in the config"
    elif missing:
      what = f"the config has {missing[0]}, the checkpoint does not"
    else:
      what = f"the checkpoint has {extra[0]}, the config does not"
    raise CheckpointMismatchError(
        f"checkpoint step {step} in {self.directory} does not match the config ({what}; "
        f"{len(missing) + len(extra) + len(shapes)} arrays differ): use the config the run "
        "was trained with (its config.json), or a new --workdir")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_required(checkpointer: Checkpointer, abstract_state: Any,
                     data_iterator: Any = None, *, prefer_best: bool = False,
                     what: str = "evaluate") -> Restored:
  """`Checkpointer.restore_newest_good` for a reader that needs a checkpoint (eval, predict):
  raises CheckpointError naming the folder when there is none."""
  restored = checkpointer.restore_newest_good(abstract_state, data_iterator,
                                              prefer_best=prefer_best)
  if restored is None:
    raise CheckpointError(f"{checkpointer.directory} holds no checkpoint to {what}; train "
                          "first with `python main.py --config=... --workdir=...`")
  return restored


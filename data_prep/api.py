"""One call for the demo: make the synthetic raw set if needed, then build it if needed.

    from data_prep import api
    api.ensure_demo_dataset("data/synth_raw", "data/synth")   # then train on data/synth
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
from typing import Callable

from data_prep import build
from mfer_jax import constants
from mfer_jax.data import store


def ensure_demo_dataset(raw_dir: str | os.PathLike, data_dir: str | os.PathLike,
                        num_videos: int = 16, seed: int = 0, workers: int = 2,
                        seconds: tuple[float, float] | None = None,
                        log: Callable[[str], None] | None = print) -> pathlib.Path:
  """Makes sure ``data_dir`` holds a prepared synthetic dataset, doing only missing work.

  1. ``data_prep.synth.generate`` completes the raw set in ``raw_dir`` (it skips the videos it
     already finished, so this is cheap when the set is complete).
  2. If any raw video was (re)generated, or ``data_dir`` has no readable metadata.json, the
     builder runs (it too skips videos finished by an earlier run).

  Calls on the same ``raw_dir`` (from several processes) run one at a time.

  Args:
    raw_dir: synthetic raw Aff-Wild2 layout (created if missing).
    data_dir: prepared dataset directory.
    num_videos, seed: of the synthetic set.
    workers: processes for generation and for the build.
    seconds: (min, max) video length of the synthetic set; None: the generator's default.
    log: prints progress lines (None: silent).

  Returns:
    ``data_dir`` as a path.

  Raises:
    build.BuildError: if the build finds nothing usable (it should not, on the synthetic set).
    synth.SynthDirError: if ``raw_dir`` holds a set made with other settings.
  """
  say = log or (lambda _: None)
  # Imported here: the generator pulls in its drawing and face-detection code, which readers
  # of an existing dataset never need.
  from data_prep import synth  # pylint: disable=g-import-not-at-top

  raw_dir, data_dir = pathlib.Path(raw_dir), pathlib.Path(data_dir)
  with _exclusive(raw_dir / synth.MARKER_DIR / "lock"):
    return _ensure(synth, raw_dir, data_dir, num_videos, seed, workers, seconds, say)


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path):
  """Holds an exclusive lock for the block: two runs started at once on the same synthetic
  set (two trainings of an ablation, say) then make it once, one after the other, instead of
  both writing the same files. The lock goes with the process, so a killed run frees it."""
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _ensure(synth, raw_dir, data_dir, num_videos, seed, workers, seconds, say) -> pathlib.Path:
  """`ensure_demo_dataset`'s work, under its lock (``synth``: the module, imported there)."""
  say(f"Synthetic Aff-Wild2 set in {raw_dir} ({num_videos} videos, seed {seed})...")
  extra = {} if seconds is None else {"seconds": tuple(seconds)}
  made = synth.generate(raw_dir, num_videos=num_videos, seed=seed, workers=workers, **extra)
  generated = made.get("generated", [])
  say(f"  {len(generated)} videos generated, {len(made.get('skipped', []))} already there")
  try:
    store.load_metadata(data_dir)
    ready = not generated
  except (store.DatasetError, ValueError, OSError):
    ready = False
  if ready:
    say(f"Prepared dataset {data_dir} is up to date.")
    return data_dir
  say(f"Preparing {data_dir} (shards, index, metadata)...")
  summary = build.build(raw_dir, data_dir, splits=constants.SPLITS, workers=workers,
                        log=lambda m: None)
  say(f"  {summary.total_records} records "
      + ", ".join(f"{s} {n}" for s, n in summary.num_records.items())
      + f"; {summary.bytes_per_record:.0f} bytes/record; {summary.wall_seconds:.0f} s")
  if summary.skipped or summary.repaired:
    say(f"  {len(summary.skipped)} skipped, {len(summary.repaired)} repaired "
        "(the synthetic set has length mismatches on purpose)")
  return data_dir


def prepare_for_config(config) -> None:
  """Makes the synthetic dataset a config asks for (``config.synthetic``), on process 0.

  main.py calls this before training, so ``python main.py --config=configs/demo.py`` needs no
  data. The library (mfer_jax) never generates data itself: data preparation stays here.
  Other processes of a multi-host run wait until process 0 is done.
  """
  syn = config.get("synthetic")
  if not syn or not syn.enabled:
    return
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    ensure_demo_dataset(syn.raw_dir, config.data.data_dir, num_videos=syn.num_videos,
                        seed=syn.seed, workers=syn.workers, seconds=tuple(syn.seconds))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("synthetic data ready")

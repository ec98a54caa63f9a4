"""Train and eval input pipelines (Grain), per host, and their conversion to global arrays.

Layout of a global batch: global step ``s`` of epoch ``e`` covers positions
``[s*G, (s+1)*G)`` of that epoch's draw (`sampling.EpochSampler`), G the global batch. Process
``p`` of ``P`` reads the contiguous block ``[s*G + p*B, s*G + (p+1)*B)``, B = G // P, and
`to_global_batch` assembles the blocks into one array sharded over the mesh's data axes. So
the examples of a global step, and their augmentations (seeded by (seed, epoch, position)),
are the same for any number of hosts, Grain workers or threads; an epoch is
``epoch_size // G`` steps (the remainder of the draw is dropped).

Each Grain element is one whole local batch, built by `_TrainBatch` / `_EvalBatch` from its
step number, so ``mp_prefetch`` hands whole batches to workers round-robin and the batches do
not depend on ``num_workers``. The train iterator's state is just the step and the class-F1
schedule, both small JSON, which is what makes restore exact (and independent of the number
of workers).

Batches hold uint8 ``face`` [B, S, S, 3] and ``mel`` [B, n_mels, W] (with
``data.features_dir``: the cached float32 image and audio features [B, C], unaugmented),
bool ``has_face`` and ``mask``, int32 ``label``; eval batches add int32 ``video_id``, ``frame``
and ``index`` (the
record index in the split) for per-frame predictions. Conversion to float, resizing and
normalisation happen on device.

**Clips** (``data.sequence.length`` T > 1, see `mfer_jax.data.clips`): every field gains a
time axis after the batch axis (``face`` [B, T, S, S, 3], or [B, T, C] cached features;
``label`` [B, T], ...) and a bool ``present`` [B, T] says which slots hold a record; a padded
slot has zero face and mel, no face, label -1 and ``mask`` False. ``mask`` marks the frames
the loss or the metric counts. The face augmentation is drawn once per clip (every frame gets
the same crop, flip and colours, so the clip does not flicker); SpecAugment masks are drawn
per frame. Eval batches are windows (`clips.windows`) with ``index`` [B, T]; a frame covered
by several windows is scored once, from its averaged logits
(`mfer_jax.training.step.make_window_eval_step`).
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

from absl import logging
import grain
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from mfer_jax.data import augment
from mfer_jax.data import clips as clips_lib
from mfer_jax.data import sampling
from mfer_jax.data import sources

STATE_VERSION = 1
# Length of the (conceptually endless) train stream, in steps.
_ENDLESS = 2**62


def _stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def _rng(*key: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def read_clip(reader: sources.RecordReader, rows: np.ndarray, scored: np.ndarray,
              augmenter: augment.Augmenter | None = None,
              key: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
  """Reads one clip (or window) of records; -1 slots become padding.

  Args:
    reader: the split's records.
    rows: int [T] record indices, -1 for a padded slot (at least one must be >= 0).
    scored: bool [T], the slots the loss or metric may count (``mask`` is this and a label
      >= 0 for training, this alone for windows of an unlabelled split).
    augmenter: the train recipe, or None (evaluation).
    key: (seed, epoch, position) of the clip, seeding its augmentation.

  Returns:
    face [T, S, S, 3], mel [T, n_mels, W] (or [T, C] each from a `cache.FeatureReader`),
    has_face, present, label, mask and index, per slot.
  """
  real = [int(r) for r in rows if r >= 0]
  cache = {real[0]: reader[real[0]]}   # the first record also gives the padding's shapes
  template = cache[real[0]]
  frames = []
  for j, r in enumerate(rows):
    if r < 0:
      frames.append({"face": np.zeros_like(template["face"]), "mel": np.zeros_like(template["mel"]),
                     "has_face": np.bool_(False), "present": np.bool_(False),
                     "label": np.int32(-1), "index": np.int32(-1)})
      continue
    ex = cache[int(r)] if int(r) in cache else reader[int(r)]
    face, mel = ex["face"], ex["mel"]
    # A disabled recipe (cached features) skips seeding generators, which costs more than
    # reading a feature row.
    if augmenter is not None and augmenter.enabled:
      # One face draw per clip (same generator state for every frame), one mel draw per frame.
      face = augmenter.face(face, bool(ex["has_face"]), _rng(*key))
      mel = augmenter.mel(mel, _rng(*key, j + 1))
    frames.append({"face": face, "mel": mel, "has_face": ex["has_face"],
                   "present": np.bool_(True), "label": ex["label"], "index": np.int32(r)})
  out = _stack(frames)
  out["mask"] = np.asarray(scored, bool) & out["present"]
  return out


class _TrainBatch:
  """Global step -> this process's block of the step's examples, read and augmented."""

  def __init__(self, reader: sources.RecordReader, sampler: sampling.EpochSampler,
               augmenter: augment.Augmenter, *, global_batch: int, local_batch: int,
               process_index: int, seed: int):
    self._reader = reader
    self._sampler = sampler
    self._augmenter = augmenter
    self._global_batch = global_batch
    self._local_batch = local_batch
    self._process_index = process_index
    self._seed = seed
    self._steps_per_epoch = sampler.epoch_size // global_batch

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, s = divmod(int(step), self._steps_per_epoch)
    first = s * self._global_batch + self._process_index * self._local_batch
    examples = []
    if self._sampler.sequence.length > 1:
      rows = self._sampler.epoch_clips(epoch)
      for pos in range(first, first + self._local_batch):
        clip = read_clip(self._reader, rows[pos], np.ones(rows.shape[1], bool), self._augmenter,
                         (self._seed, epoch, pos))
        clip["mask"] &= clip["label"] >= 0
        del clip["index"]
        examples.append(clip)
      return _stack(examples)
    draws = self._sampler.epoch_indices(epoch)
    for pos in range(first, first + self._local_batch):
      ex = self._reader[draws[pos]]
      face, mel = ex["face"], ex["mel"]
      if self._augmenter.enabled:   # off for cached features: no generator to seed
        face, mel = self._augmenter(face, bool(ex["has_face"]), mel,
                                    _rng(self._seed, epoch, pos))
      examples.append({"face": face, "mel": mel, "has_face": ex["has_face"],
                       "label": ex["label"], "mask": np.bool_(True)})
    return _stack(examples)


class _EvalBlocks:
  """Eval batch number -> this process's block of positions in a fixed item list.

  Every process reads the same global batches in the same order; process ``p`` takes rows
  ``p * local_batch ...`` of each. Positions past the end are padding (``real`` False).
  """

  def __init__(self, num_items: int, *, global_batch: int, local_batch: int,
               process_index: int):
    self._num_items = num_items
    self._global_batch = global_batch
    self._local_batch = local_batch
    self._process_index = process_index

  def positions(self, b: int):
    """Yields (position, real) for this process's rows of eval batch ``b``."""
    first = int(b) * self._global_batch + self._process_index * self._local_batch
    for pos in range(first, first + self._local_batch):
      yield pos, pos < self._num_items


class _EvalBatch(_EvalBlocks):
  """Eval batch number -> this process's block of frames; positions past the end are masked."""

  def __init__(self, reader: sources.RecordReader, record_ids: np.ndarray,
               video_id: np.ndarray, **layout):
    super().__init__(record_ids.shape[0], **layout)
    self._reader = reader
    self._record_ids = record_ids
    self._video_id = video_id

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    examples = []
    for pos, real in self.positions(b):
      # Padding has the shapes of a real record (the first) but carries no data.
      i = int(self._record_ids[pos if real else 0])
      ex = self._reader[i]
      examples.append({
          "face": ex["face"] if real else np.zeros_like(ex["face"]),
          "mel": ex["mel"] if real else np.zeros_like(ex["mel"]),
          "has_face": np.bool_(ex["has_face"] and real),
          "label": ex["label"] if real else np.int32(-1),
          "mask": np.bool_(real),
          "video_id": np.int32(self._video_id[i] if real else -1),
          "frame": ex["frame"] if real else np.int32(0),
          "index": np.int32(i if real else -1),
      })
    return _stack(examples)


class _EvalWindowBatch(_EvalBlocks):
  """Eval batch number -> this process's block of windows; windows past the end are padding."""

  def __init__(self, reader: sources.RecordReader, windows: np.ndarray, selected: np.ndarray,
               **layout):
    super().__init__(windows.shape[0], **layout)
    self._reader = reader
    self._windows = windows
    self._selected = selected

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    examples = []
    for pos, real in self.positions(b):
      rows = self._windows[pos if real else 0]
      scored = self._selected[np.maximum(rows, 0)] & (rows >= 0)
      clip = read_clip(self._reader, rows, scored)
      if not real:   # padding: the shapes of a real window, no data
        clip = {k: np.zeros_like(v) for k, v in clip.items()}
        clip["label"][:] = -1
        clip["index"][:] = -1
      examples.append(clip)
    return _stack(examples)


def _process_layout(global_batch: int, process_index: int | None,
                    process_count: int | None) -> tuple[int, int, int]:
  """(process_index, process_count, per-process batch), defaulting to jax's process."""
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f"global batch {global_batch} must be a positive multiple of the "
                     f"process count {process_count}")
  return process_index, process_count, global_batch // process_count


def _iterate(ds: grain.MapDataset, cfg: ml_collections.ConfigDict) -> grain.DatasetIterator:
  """Threads (and, with num_workers > 0, worker processes) building batches ahead."""
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                               prefetch_buffer_size=cfg.prefetch))
  if cfg.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
  return iter(it_ds)


class TrainIterator:
  """Endless iterator of this process's train batches, checkpointable and resumable exactly.

  Implements the iterator protocol Grain's Orbax handler expects: ``get_state()`` returns
  JSON bytes, ``set_state()`` takes them back, ``start_prefetch()`` starts the workers. Save
  it with ``grain.checkpoint.CheckpointSave(it)`` and restore with
  ``grain.checkpoint.CheckpointRestore(it)`` inside an ``orbax.checkpoint.args.Composite``.
  Close it (or use it as a context manager) to stop worker processes.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, reader: sources.RecordReader,
               sampler: sampling.EpochSampler, *, process_index: int, process_count: int):
    self._cfg = cfg
    self._reader = reader
    self._sampler = sampler
    # Cached features are not images: they pass through unaugmented.
    self._augmenter = (augment.Augmenter(enabled=False) if cfg.get("features_dir")
                       else augment.Augmenter.from_config(cfg.augment))
    self.global_batch_size = int(cfg.batch_size)
    self.process_index, self.process_count, self.local_batch_size = _process_layout(
        self.global_batch_size, process_index, process_count)
    self.steps_per_epoch = sampler.epoch_size // self.global_batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"an epoch of {sampler.epoch_size} draws is smaller than one global "
                       f"batch of {self.global_batch_size}; lower data.batch_size or raise "
                       "data.sampling.epoch_size")
    self._step = 0
    self._iter: grain.DatasetIterator | None = None

  @property
  def sampler(self) -> sampling.EpochSampler:
    return self._sampler

  @property
  def step(self) -> int:
    """Global batches consumed so far."""
    return self._step

  @property
  def epoch(self) -> int:
    """The epoch of the next batch."""
    return self._step // self.steps_per_epoch

  def _start(self) -> grain.DatasetIterator:
    if self._iter is None:
      fn = _TrainBatch(self._reader, self._sampler, self._augmenter,
                       global_batch=self.global_batch_size, local_batch=self.local_batch_size,
                       process_index=self.process_index, seed=int(self._cfg.seed))
      self._iter = _iterate(grain.MapDataset.range(self._step, _ENDLESS).map(fn), self._cfg)
    return self._iter

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._start())
    self._step += 1
    return batch

  def start_prefetch(self) -> None:
    """Starts building batches now (Grain's Orbax handler calls this after a restore)."""
    self._start().start_prefetch()

  def close(self) -> None:
    """Stops worker processes and threads; the iterator restarts if used again."""
    if self._iter is not None:
      self._iter.close()
      self._iter = None

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def set_class_f1(self, class_f1: Sequence[float]) -> int:
    """Feeds validation per-class F1 to adaptive resampling (``sampling.adaptive_beta``).

    The F1 applies from the first epoch none of whose batches were consumed yet: the coming
    epoch if called at an epoch boundary (the usual place, right after evaluation), else the
    one after. It is part of the state, so a restored run draws the same epochs.

    Returns:
      The first epoch that uses ``class_f1``.
    """
    first_epoch = -(-self._step // self.steps_per_epoch)
    self._sampler = self._sampler.with_class_f1(class_f1, first_epoch)
    if self._sampler.options.adaptive_beta > 0:
      # Batches already built ahead used the old weights: rebuild from the current step
      # (with worker processes this restarts them, about a second once per update).
      self.close()
    return first_epoch

  def get_state(self) -> bytes:
    """JSON bytes: step, epoch and position (for reading), alpha, the class-F1 schedule."""
    epoch = self.epoch
    state = {
        "version": STATE_VERSION,
        "step": self._step,
        "epoch": epoch,
        "position": (self._step % self.steps_per_epoch) * self.global_batch_size,
        "alpha": self._sampler.alpha(epoch),
        "class_f1_schedule": [[e, list(f1)] for e, f1 in self._sampler.class_f1_schedule],
        "seed": int(self._cfg.seed),
        "global_batch_size": self.global_batch_size,
        "epoch_size": self._sampler.epoch_size,
        "num_records": len(self._reader),
    }
    return json.dumps(state).encode("utf-8")

  def set_state(self, state: bytes | str | dict[str, Any]) -> None:
    """Continues from a `get_state` result: the next batch is the one that followed it."""
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"train iterator state version {state.get('version')} is not "
                       f"{STATE_VERSION}: {state}")
    now = json.loads(self.get_state())
    changed = [k for k in ("seed", "global_batch_size", "epoch_size", "num_records")
               if state[k] != now[k]]
    if changed:
      logging.warning("Restoring the train iterator with different %s (saved %s, now %s): "
                      "the data order will not continue the saved run exactly.", changed,
                      {k: state[k] for k in changed}, {k: now[k] for k in changed})
    self._sampler = self._sampler.with_class_f1_schedule(
        tuple((e, f1) for e, f1 in state["class_f1_schedule"]))
    self._step = int(state["step"])
    self.close()   # anything built ahead belongs to the old position


class EvalPipeline:
  """This process's eval batches over a split: every frame once, static shapes, no drops.

  The selected records (label >= 0, or every record of an unlabeled split) are laid out in
  order and cut into ``num_batches`` global batches; the last one is padded with ``mask``
  False rows (label -1, video_id -1, index -1). Every process gets the same ``num_batches``,
  so collective eval steps stay in lockstep. Iterate it once per evaluation.

  With clips (``data.sequence.length`` > 1) the examples are windows over the selected
  records (`clips.windows`), and each selected record is in one or more of them.

  Attributes:
    num_records: selected records (over all processes).
    num_examples: selected records, or windows with clips (over all processes).
    num_batches: batches per process (the same on every process).
    global_batch_size, local_batch_size: examples per global / per-process batch.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, reader: sources.RecordReader,
               index: sources.SplitSource, *, include_unlabelled: bool | None,
               process_index: int, process_count: int, max_examples: int = 0):
    self._cfg = cfg
    self.global_batch_size = int(cfg.eval_batch_size)
    self.process_index, self.process_count, self.local_batch_size = _process_layout(
        self.global_batch_size, process_index, process_count)
    labelled = np.asarray(index.label) >= 0
    if include_unlabelled is None:
      include_unlabelled = not labelled.any()   # the test split: predictions for every frame
    record_ids = np.arange(len(index)) if include_unlabelled else np.flatnonzero(labelled)
    if record_ids.size == 0:
      raise ValueError(f"split {index.split!r} has no record to evaluate")
    if 0 < max_examples < record_ids.size:
      # An evenly spaced, fixed subset: every video contributes, and each evaluation of a
      # run sees the same frames. With clips, the windows score only these frames (the
      # others of a window are context).
      record_ids = record_ids[np.linspace(0, record_ids.size - 1, int(max_examples))
                              .round().astype(np.int64)]
    self.num_records = int(record_ids.size)
    self.sequence = clips_lib.SequenceOptions.from_config(cfg.sequence)
    layout = dict(global_batch=self.global_batch_size, local_batch=self.local_batch_size,
                  process_index=self.process_index)
    if self.sequence.length == 1:
      self.num_examples = self.num_records
      self._fn = _EvalBatch(reader, record_ids, np.asarray(index.video_id, np.int32), **layout)
    else:
      selected = np.zeros(len(index), bool)
      selected[record_ids] = True
      self.windows = clips_lib.windows(index.video_id, index.frame, selected, self.sequence)
      self.num_examples = int(self.windows.shape[0])
      self._fn = _EvalWindowBatch(reader, self.windows, selected, **layout)
    self.num_batches = -(-self.num_examples // self.global_batch_size)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    it = _iterate(grain.MapDataset.range(self.num_batches).map(self._fn), self._cfg)
    try:
      yield from it
    finally:
      it.close()


def _reader(cfg: ml_collections.ConfigDict, index: sources.SplitSource):
  """The split's records, or their cached encoder features with ``data.features_dir``."""
  if cfg.get("features_dir"):
    from mfer_jax.features import cache  # pylint: disable=g-import-not-at-top
    return cache.FeatureReader(index, cfg.features_dir)
  return index.open_reader(cfg.face_size)


def make_train_iterator(cfg: ml_collections.ConfigDict, index: sources.SplitSource, *,
                        process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
  """The train pipeline of this process from ``config.data`` and the train split's index.

  Args:
    cfg: ``config.data`` (see `mfer_jax.data.config.default_data_config`).
    index: the train split's source, from ``sources.load_split(cfg, "train")``.
    process_index, process_count: which part of each global batch this process reads;
      default jax.process_index() / jax.process_count() (tests pass them to simulate hosts).
  """
  reader = _reader(cfg, index)
  sampler = sampling.EpochSampler(index.label, index.video_id, index.frame,
                                  sampling.SamplingOptions.from_config(cfg.sampling),
                                  seed=int(cfg.seed),
                                  sequence=clips_lib.SequenceOptions.from_config(cfg.sequence))
  return TrainIterator(cfg, reader, sampler, process_index=process_index,
                       process_count=process_count)


def make_eval_pipeline(cfg: ml_collections.ConfigDict, index: sources.SplitSource, *,
                       include_unlabelled: bool | None = None,
                       process_index: int | None = None,
                       process_count: int | None = None,
                       max_examples: int = 0) -> EvalPipeline:
  """The eval pipeline of this process over one split (no resampling, no augmentation).

  Args:
    cfg: ``config.data``; uses eval_batch_size, face_size and the worker settings.
    index: the split's source, to evaluate or predict, from `sources.load_split`.
    include_unlabelled: also emit label -1 records; default: only if the split has no
      labelled record at all (the test split).
    process_index, process_count: as in `make_train_iterator`.
    max_examples: 0 for every selected record; N > 0 for an evenly spaced subset of N.
  """
  reader = _reader(cfg, index)
  return EvalPipeline(cfg, reader, index, include_unlabelled=include_unlabelled,
                      process_index=process_index, process_count=process_count,
                      max_examples=max_examples)


def to_global_batch(batch: dict[str, np.ndarray], mesh: Mesh,
                    data_axes: Sequence[str] = ("data", "fsdp")) -> dict[str, jax.Array]:
  """Assembles every process's local batch into global arrays sharded over ``data_axes``.

  The leading (example) dimension is split over the data axes that ``mesh`` has (the same
  axes the logical 'batch' dimension maps to in `mfer_jax.sharding`); other dimensions are
  replicated. Global batch rows follow the mesh's device order; every field of an example
  travels with it, so labels, masks and ids stay aligned.

  Args:
    batch: this process's batch (numpy arrays with the same leading size).
    mesh: the training mesh.
    data_axes: mesh axes that split the batch.
  """
  axes = tuple(a for a in data_axes if a in mesh.axis_names)
  sharding = NamedSharding(mesh, P(axes if axes else None))

  def one(path, x):
    try:
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    except ValueError as e:
      raise ValueError(f"cannot shard batch field {jax.tree_util.keystr(path)} of shape "
                       f"{np.shape(x)} over mesh axes {axes} of {dict(mesh.shape)}: {e}") from e

  return jax.tree_util.tree_map_with_path(one, batch)

"""Defaults of ``config.data``: the dataset, input pipeline, augmentation and resampling.

Experiment configs start from `default_data_config()` and override keys. The defaults of
``augment.*`` and ``sampling.*`` are the field defaults of `augment.Augmenter` and
`sampling.SamplingOptions`, written once there. Every key is read by `mfer_jax.data.sources`
(``source``, ``data_dir``, ``tfds_*``), `mfer_jax.data.pipeline` (reading, batching, workers),
`mfer_jax.data.augment` (``augment.*``) or `mfer_jax.data.sampling` (``sampling.*``).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mfer_jax import constants
from mfer_jax.data import augment, clips, sampling


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the ``config.data`` ConfigDict with documented defaults.

  Keys:
    source: where records come from (`mfer_jax.data.sources`): 'prepared' (``data_dir``,
      written by ``python -m data_prep.build``) or 'tfds' (``tfds_name`` in ``tfds_data_dir``,
      written by ``python -m data_prep.tfds_affwild2``). Both give the same batches.
    data_dir: prepared dataset directory (``metadata.json``, shards, split indexes).
    tfds_name: TFDS dataset name, optionally with config and version
      (``aff_wild2_expr/default/1.1.0``); data_prep/tfds_affwild2.py registers the default.
    tfds_data_dir: TFDS data directory; '' = TFDS's default (``~/tensorflow_datasets``).
    features_dir: '' reads faces and log-mel windows from the records; a feature cache made by
      ``python -m mfer_jax.tools.extract`` makes the pipeline emit the cached per-frame encoder
      features instead (``face`` and ``mel`` then hold float [C] vectors of the image and
      audio encoders, [T, C] per clip; no augmentation), and the model runs only the fusion,
      the temporal head and the classifier (docs/foundation.md). data_dir still gives the
      split indexes (labels, frames, videos).
    face_size: side of the face crop the pipeline emits (uint8). Crops of another size are
      resized on decode; resizing to the model's input size happens on device.
    seed: seed of the data order and the augmentations (independent of the model's seed).
    batch_size: GLOBAL train batch; each of P processes reads batch_size // P examples.
    eval_batch_size: GLOBAL eval batch; the last batch is padded (mask False), never dropped.
    num_workers: Grain worker processes per host; 0 reads in the training process.
    worker_buffer_size: batches each worker process keeps ready.
    read_threads: threads per process (or per worker) building batches in parallel; OpenCV
      releases the GIL, so with num_workers=0 this still overlaps decoding with the step.
    prefetch: batches buffered ahead by those threads (0 = build on demand).
    augment.enabled: master switch; False emits the decoded frames unchanged.
    augment.random_resized_crop: crop a random area/aspect and resize back to face_size.
    augment.crop_scale: range of the crop's area as a fraction of the face.
    augment.crop_ratio: range of the crop's aspect ratio (width / height).
    augment.hflip: probability of a horizontal flip of the face.
    augment.brightness, .contrast, .saturation: colour jitter amounts; each factor is drawn
      from [max(0, 1 - a), 1 + a], as in torchvision's ColorJitter; 0 disables.
    augment.spec_time_masks, .spec_time_width: SpecAugment time masks on the log-mel window:
      how many, and the largest width in frames; masked cells get the silence value 0
      (uint8 0 = -top_db dB).
    augment.spec_freq_masks, .spec_freq_width: the same along the mel axis.
    sampling.mode: 'dynamic' (weighted resampling with replacement, below) or 'natural'
      (each candidate frame once per epoch, shuffled; alpha and adaptive_beta are ignored).
    sampling.alpha_start, .alpha_end, .alpha_decay_epochs, .alpha_shape: the per-record
      weight is n_c^-alpha (n_c = frames of the record's class among the candidates); alpha
      goes from alpha_start to alpha_end over alpha_decay_epochs epochs, 'linear', 'cosine'
      or 'constant' (alpha_start throughout). alpha 1 balances classes, 0 is natural.
    sampling.epoch_size: draws per epoch; 0 = the number of candidate frames (valid train
      frames, or one per chunk with stratification). An epoch has epoch_size // batch_size
      steps.
    sampling.stratify_chunk: K > 0 takes one random frame from every K-frame chunk of every
      video (frames 1..K, K+1..2K, ...) as the epoch's candidates, before weighting; 0 = off.
    sampling.adaptive_beta: beta > 0 multiplies class weights by (1 - F1_c)^beta, with the
      latest validation F1 passed to ``TrainIterator.set_class_f1``; 0 = off.
    sequence.length: frames per clip T (`mfer_jax.data.clips`); 1 is frame mode (batches
      without a time axis, exactly as before clips existed). With T > 1, batch_size and
      eval_batch_size count clips (windows), so a batch holds T times as many frames (the
      ``clip=T`` and ``temporal=`` config arguments divide them by T), and the sampling keys
      above apply to clips: a draw is a clip, its class weight comes from its labelled frames
      (`mfer_jax.data.sampling`), ``epoch_size`` counts clips and 0 means ceil(candidates / T)
      (about as many frames as frame mode), and ``stratify_chunk`` chunks the clips' first
      frames. A model with a temporal head needs T >= 2.
    sequence.stride: frames between consecutive clip frames (1 = every frame, at the video's
      own frame rate; 2 = every other frame, twice the time span).
    sequence.hop: clip slots between the starts of evaluation and prediction windows, from 1
      to ``length`` (a larger hop would skip frames: an error); 0 = length // 2. Every frame is
      scored once, from the mean of its logits over the T / hop windows that cover it.
  """
  c = ml_collections.ConfigDict()
  c.source = constants.DATA_SOURCES[0]
  c.data_dir = ""
  c.tfds_name = constants.TFDS_NAME
  c.tfds_data_dir = ""
  c.features_dir = ""
  c.face_size = constants.FACE_SIZE
  c.seed = 0
  c.batch_size = 64
  c.eval_batch_size = 64
  c.num_workers = 0
  c.worker_buffer_size = 2
  c.read_threads = 1
  c.prefetch = 2

  # The recipes' dataclasses hold the defaults (one place); the config mirrors their fields.
  c.augment = ml_collections.ConfigDict(dataclasses.asdict(augment.Augmenter()))
  c.sampling = ml_collections.ConfigDict(dataclasses.asdict(sampling.SamplingOptions()))
  c.sequence = ml_collections.ConfigDict(dataclasses.asdict(clips.SequenceOptions()))
  return c

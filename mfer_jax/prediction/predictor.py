"""A trained model from a workdir, as a batched, jitted ``predict(face, mel, has_face)``.

Prediction (`mfer_jax.prediction.videos`, ``python -m mfer_jax.tools.predict``) uses this;
training never does. The workdir's ``config.json`` rebuilds the model, and the best checkpoint
by validation macro-F1 (or the latest) supplies the parameters. Inference runs on one device
with a fixed batch size, and the last partial batch is padded, so the function compiles
exactly once per process.

A temporal run (``data.sequence.length`` T > 1) predicts a video the way it was evaluated:
windows of T frames at the run's stride and hop over the whole video (`mfer_jax.data.clips`),
the logits of a frame averaged over the windows that cover it, so every decoded frame still
gets exactly one prediction.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from mfer_jax import config_lib, errors, sharding
from mfer_jax.data import clips
from mfer_jax.training import checkpointing, optimizer, state as state_lib


class WorkdirError(errors.UserError, FileNotFoundError):
  """A workdir without the config or checkpoint that prediction needs."""


def _tuples(value: Any) -> Any:
  # JSON has no tuples; every sequence in our configs is a tuple (sizes, mesh shape, rules).
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load_config(workdir: str | os.PathLike) -> ConfigDict:
  """The resolved config a run was trained with (``<workdir>/config.json``).

  It is merged into `config_lib.base_config()`, so keys added since the run keep their
  defaults and the types stay those of the code.

  Raises:
    WorkdirError: if the workdir has no config.json.
  """
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise WorkdirError(f"{path} not found: {workdir} is not a training workdir (train one with "
                       "`python main.py --config=... --workdir=...`)")
  saved = _tuples(json.loads(path.read_text()))
  config = config_lib.base_config()
  config.update(saved)   # also adds keys base_config lacks (e.g. the demo's `synthetic`)
  return config


class Predictor:
  """Batched, jitted inference with a trained model.

  Args:
    workdir: a training workdir (config.json and checkpoints/).
    which: "best" (highest validation macro-F1, the default) or "latest" checkpoint; if it
      cannot be read it is moved aside (`checkpointing`) and the next one is used.
    batch_size: frames per device call; every call has this shape (the last batch is padded).

  Attributes:
    config: the run's config.
    step: the checkpoint step that was loaded.
    face_size: the face side the model was trained on (the pipeline's ``data.face_size``).
  """

  def __init__(self, workdir: str | os.PathLike, which: str = "best", batch_size: int = 64):
    self.config = config_lib.validate(load_config(workdir))
    self.sequence = clips.SequenceOptions.from_config(self.config.data.sequence)
    self.batch_size = int(batch_size)
    self.face_size = int(self.config.data.face_size)
    self.num_classes = int(self.config.model.num_classes)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    spec = state_lib.ModelSpec(self.config.model,
                               from_features=bool(self.config.data.features_dir))
    tx, _ = optimizer.make_optimizer(self.config.train, 1)
    shardings = state_lib.state_shardings(spec, tx, mesh, self.config.mesh.rules,
                                          ema=state_lib.uses_ema(self.config.train))
    if not (pathlib.Path(workdir) / "checkpoints").is_dir():
      raise WorkdirError(f"{workdir}/checkpoints not found; train {workdir} first")
    ckpt = checkpointing.Checkpointer(workdir, async_save=False)
    try:
      # An unreadable checkpoint is moved aside and the next best (or newest) one is used.
      restored = checkpointing.restore_required(
          ckpt, state_lib.abstract_state(shardings, spec, tx), prefer_best=which == "best",
          what="predict with")
    finally:
      ckpt.close()
    self.step = int(restored.step)
    self._params = state_lib.eval_params(restored.state)
    rules = self.config.mesh.rules

    def forward(params, face, mel, has_face):
      with sharding.use_rules(mesh, rules):
        out = spec.merge(params)(face, mel, has_face)
      return jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1), out["gates"]

    def forward_clips(params, face, mel, has_face, present):
      with sharding.use_rules(mesh, rules):
        out = spec.merge(params)(face, mel, has_face, present)
      return out["logits"].astype(jnp.float32), out["gates"]

    self._forward = jax.jit(forward)
    self._forward_clips = jax.jit(forward_clips)
    self.from_features = spec.from_features
    self._workdir = pathlib.Path(workdir)
    self._extractor = None

  def encoders(self):
    """The frozen encoders of a feature-cache run (built once, on first use).

    The run's ``feature_cache.json`` records the weights its features came from; encoders
    whose init files now hold other weights are refused, with both hashes.
    """
    if self._extractor is None:
      from mfer_jax.features import cache  # pylint: disable=g-import-not-at-top
      from mfer_jax.features import extractor  # pylint: disable=g-import-not-at-top
      record = self._workdir / "feature_cache.json"
      if not record.is_file():
        raise WorkdirError(f"{record} not found: {self._workdir} trained on cached features "
                           "but does not say which; retrain it with this version")
      trained = json.loads(record.read_text())["weights"]
      now = cache.weights(self.config)
      for kind in cache.MODALITIES:
        if trained[kind] != now[kind]:
          raise WorkdirError(
              f"model.{kind}.init_file={self.config.model[kind].init_file} has sha256 "
              f"{now[kind][:12] or '(none)'} but {self._workdir} was trained on features of "
              f"sha256 {trained[kind][:12] or '(random init)'}; restore the original weights "
              "file at that path")
      self._extractor = extractor.FeatureExtractor(self.config)
    return self._extractor

  def encode(self, face: np.ndarray, mel: np.ndarray, has_face: np.ndarray,
             media: str | os.PathLike, fps) -> tuple[np.ndarray, np.ndarray]:
    """A feature-cache run's model inputs: the encoders' features of every frame.

    Exactly what extraction computes: faces through the image encoder (zeros without a
    face); audio from ``mel`` (Swin / ViT audio) or from the media's waveform (wav2vec 2.0 /
    HuBERT, silence when it has no decodable audio).
    """
    ext = self.encoders()
    image = np.zeros((face.shape[0], ext.image_dim), np.float32)
    if has_face.any():
      image[has_face] = ext.image_features(face[has_face])
    if ext.audio_from_waveform:
      from mfer_jax.features import extract  # pylint: disable=g-import-not-at-top
      from mfer_jax.media import decode  # pylint: disable=g-import-not-at-top
      try:
        wave = extract.load_waveform(str(media))
      except decode.MediaError:
        wave = np.zeros(0, np.float32)
      audio = ext.waveform_features(wave, fps, np.arange(1, face.shape[0] + 1))
    else:
      audio = ext.mel_features(mel)
    return image, audio

  def predict(self, face: np.ndarray, mel: np.ndarray,
              has_face: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and modality gates for N frames.

    Args:
      face: uint8 [N, face_size, face_size, 3] RGB crops (zeros where there is no face);
        for a feature-cache run, the image features from `encode`.
      mel: uint8 [N, n_mels, T] log-mel windows, built as in data preparation; for a
        feature-cache run, the audio features from `encode`.
      has_face: bool [N].

    Returns:
      (probs float32 [N, num_classes], gates float32 [N, 2] as (visual, audio)).
    """
    if self.sequence.length > 1:
      return self._predict_windows(face, mel, has_face)
    n = face.shape[0]
    probs, gates = [], []
    for start in range(0, n, self.batch_size):
      stop = min(start + self.batch_size, n)
      pad = self.batch_size - (stop - start)
      chunk = [np.asarray(a[start:stop]) for a in (face, mel, has_face)]
      if pad:
        chunk = [np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in chunk]
      p, g = self._forward(self._params, *chunk)
      probs.append(np.asarray(p)[:stop - start])
      gates.append(np.asarray(g)[:stop - start])
    if not probs:
      return np.zeros((0, self.num_classes), np.float32), np.zeros((0, 2), np.float32)
    return np.concatenate(probs), np.concatenate(gates)

  def _predict_windows(self, face: np.ndarray, mel: np.ndarray,
                       has_face: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`predict` of a temporal run: windows over the whole video, logits averaged per frame."""
    n = face.shape[0]
    if n == 0:
      return np.zeros((0, self.num_classes), np.float32), np.zeros((0, 2), np.float32)
    frame = np.arange(1, n + 1)
    rows = clips.windows(np.zeros(n, np.int64), frame, np.ones(n, bool), self.sequence)
    t = self.sequence.length
    per_call = max(1, self.batch_size // t)     # about batch_size frames per device call
    logit_sum = np.zeros((n, self.num_classes), np.float64)
    gate_sum = np.zeros((n, 2), np.float64)
    count = np.zeros(n, np.int64)
    for start in range(0, rows.shape[0], per_call):
      chunk = rows[start:start + per_call]
      if chunk.shape[0] < per_call:   # padding windows: no frame present
        chunk = np.concatenate([chunk, np.full((per_call - chunk.shape[0], t), -1)])
      present = chunk >= 0
      take = np.maximum(chunk, 0)
      inputs = [np.where(present.reshape(*present.shape, *(1,) * (a.ndim - 1)), a[take], 0)
                .astype(a.dtype) for a in (face, mel, has_face)]
      logits, gates = self._forward_clips(self._params, *inputs, present)
      np.add.at(logit_sum, chunk[present], np.asarray(logits)[present])
      np.add.at(gate_sum, chunk[present], np.asarray(gates)[present])
      np.add.at(count, chunk[present], 1)
    mean = logit_sum / count[:, None]
    probs = np.exp(mean - mean.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs.astype(np.float32), (gate_sum / count[:, None]).astype(np.float32)

"""Prediction on videos: one file, or every video of an Aff-Wild2 split (a submission).

``python -m mfer_jax.tools.predict --help`` is the command line; `predict_video` and
`predict_split` are the library.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from mfer_jax import errors
from mfer_jax.data import affwild2, sources, store
from mfer_jax.media import audio_features
from mfer_jax.prediction import frames, labels as labels_lib
from mfer_jax.prediction import predictor as predictor_lib

FEATURES_FILE = "features.json"


def feature_params(workdir: str | os.PathLike,
                   config=None) -> audio_features.FeatureParams:
  """The audio feature parameters the run was trained with.

  A workdir keeps a copy of its dataset's ``features`` (``features.json``), so prediction
  works without the training data; older workdirs fall back to the dataset's metadata.json.

  Raises:
    predictor_lib.WorkdirError: if neither is found.
  """
  path = pathlib.Path(workdir) / FEATURES_FILE
  if path.is_file():
    return audio_features.FeatureParams.from_dict(json.loads(path.read_text()))
  config = config or predictor_lib.load_config(workdir)
  try:
    meta = sources.load_metadata(config.data)
  except store.DatasetError as e:
    raise predictor_lib.WorkdirError(
        f"{path} not found and the training data's metadata is unavailable ({e}); the audio "
        "windows must be built with the training features") from e
  return audio_features.FeatureParams.from_dict(meta["features"])


@dataclasses.dataclass
class VideoResult:
  """What one prediction wrote (one person of one video).

  Attributes:
    label_file: the ABAW-format label file.
    probs_file: the per-frame probabilities CSV.
    num_frames: frames (= label lines after the header).
    frames_with_face: frames the model saw a face for.
    notes: warnings (no face, no audio, unreadable frames).
  """

  label_file: str
  probs_file: str
  num_frames: int
  frames_with_face: int
  notes: list[str]


def label_path(out: str | os.PathLike, suffix: str) -> pathlib.Path:
  """``x/clip.txt`` + ``_left`` -> ``x/clip_left.txt`` (the person's label file)."""
  out = pathlib.Path(out)
  return out.with_name(out.stem + suffix + out.suffix) if suffix else out


def predict_video(predictor: predictor_lib.Predictor, params: audio_features.FeatureParams,
                  video: str | os.PathLike, out: str | os.PathLike, *,
                  crops: str | os.PathLike | None = None, smooth_window: int = 0,
                  no_face: str = "audio", detect_every: int = 1,
                  person: str = "largest") -> list[VideoResult]:
  """Predicts one label per decoded frame of ``video`` and writes the ABAW file and CSV.

  Args:
    predictor: the trained model.
    params: its audio feature parameters (`feature_params`).
    video: the media file.
    out: the label file to write; the CSV goes beside it (``<stem>.probs.csv``). With
      ``person="all"`` each person gets ``out`` with its suffix (``clip_left.txt``, ...).
    crops: an Aff-Wild2 ``cropped_aligned/<name>`` folder to use instead of detecting faces.
    smooth_window: centred moving average of probabilities over this many frames (<= 1: off).
    no_face: policy for frames without a face: "audio" or "nearest" (see `labels`).
    detect_every: run the face detector every k-th frame.
    person: which face track(s): "largest", "left", "right" or "all" (`frames.read_video`).

  Returns:
    One result per label file written.

  Raises:
    mfer_jax.media.decode.MediaError: if the file cannot be opened or no frame decodes.
  """
  results = []
  for inputs in frames.read_video(video, params, predictor.face_size, crops, detect_every,
                                  person):
    face, mel = inputs.face, inputs.mel
    if predictor.from_features:   # a head trained on cached features: encoders first
      face, mel = predictor.encode(face, mel, inputs.has_face, video, inputs.fps)
    probs, gates = predictor.predict(face, mel, inputs.has_face)
    probs = labels_lib.smooth(labels_lib.fill_no_face(probs, inputs.has_face, no_face),
                              smooth_window)
    predicted = probs.argmax(-1)
    label_file = label_path(out, inputs.suffix)
    label_file.parent.mkdir(parents=True, exist_ok=True)
    probs_file = labels_lib.probabilities_path(label_file)
    labels_lib.write_probabilities(probs_file, probs, predicted, inputs.has_face, gates,
                                   inputs.boxes, inputs.landmarks)
    labels_lib.write_labels(label_file, predicted)   # last: its presence means it is done
    results.append(VideoResult(str(label_file), str(probs_file), inputs.num_frames,
                               int(inputs.has_face.sum()), inputs.notes))
  return results


def split_names(root: str | os.PathLike | affwild2.Release, split: str,
                test_list: str | os.PathLike | None = None,
                annotations: str | os.PathLike | None = None) -> list[str]:
  """Annotation names of an Aff-Wild2 split: the test list, or the annotation files.

  Args:
    root: the unpacked release, or its `affwild2.scan_release`.
    split: "train", "validation" or "test".
    test_list, annotations: as ``data_prep.build``'s flags (default: found under root).

  Raises:
    affwild2.LayoutError: no (or several) test lists or annotation folders.
  """
  release = root if isinstance(root, affwild2.Release) else affwild2.scan_release(root)
  if split == "test":
    return affwild2.read_test_list(release.test_list(test_list))
  challenge = release.challenge_dir(annotations)
  return [p.stem for p in affwild2.list_split_annotations(challenge, split)]


def predict_split(predictor: predictor_lib.Predictor, params: audio_features.FeatureParams,
                  root: str | os.PathLike, split: str, out_dir: str | os.PathLike, *,
                  test_list: str | os.PathLike | None = None,
                  annotations: str | os.PathLike | None = None, use_crops: bool = True,
                  overwrite: bool = False, on_video=None, **kwargs) -> dict[str, VideoResult]:
  """Writes ``<out_dir>/<name>.txt`` for every video of an Aff-Wild2 split.

  Two-person videos get one file per side (``x_left.txt``, ``x_right.txt``), each from the
  shared media and its own crops folder (from any ``cropped_aligned*`` folder; without one,
  from the left or right face track). A video whose file exists is skipped unless
  ``overwrite``, so an interrupted submission run resumes.

  Args:
    on_video: optional callback(name, VideoResult | Exception) for progress reporting.
    kwargs: passed to `predict_video` (smooth_window, no_face, detect_every).

  Returns:
    name -> VideoResult for the videos written in this call.
  """
  release = affwild2.scan_release(root)
  results = {}
  missing = []
  for name in split_names(release, split, test_list, annotations):
    out = pathlib.Path(out_dir) / f"{name}.txt"
    if out.exists() and not overwrite:
      continue
    video = release.media.find(name)
    if video is None:
      missing.append(name)
      if on_video:
        on_video(name, FileNotFoundError(f"no media for {name} in batch*/ or new_vids*/ "
                                         f"under {root}"))
      continue
    crops = release.crops.find(name) if use_crops else None
    # Without crops, the side named by an Aff-Wild2 name (x_left, x_right) is that person.
    person = affwild2.side(name) or "largest"
    result, = predict_video(predictor, params, video, out, crops=crops, person=person,
                            **kwargs)
    results[name] = result
    if on_video:
      on_video(name, result)
  if missing:
    raise errors.UserError(f"{len(missing)} video(s) of split {split!r} have no media in "
                           f"batch*/ or new_vids*/ under {root} (first: {missing[0]}); their "
                           "files were not written; check --root")
  return results


__all__ = ["VideoResult", "feature_params", "label_path", "predict_split", "predict_video",
           "split_names"]

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
from mfer_jax.data import affwild2, store
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
    meta = store.load_metadata(config.data.data_dir)
  except store.DatasetError as e:
    raise predictor_lib.WorkdirError(
        f"{path} not found and the training data's metadata is unavailable ({e}); the audio "
        "windows must be built with the training features") from e
  return audio_features.FeatureParams.from_dict(meta["features"])


@dataclasses.dataclass
class VideoResult:
  """What one prediction wrote.

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


def predict_video(predictor: predictor_lib.Predictor, params: audio_features.FeatureParams,
                  video: str | os.PathLike, out: str | os.PathLike, *,
                  crops: str | os.PathLike | None = None, smooth_window: int = 0,
                  no_face: str = "audio", detect_every: int = 1) -> VideoResult:
  """Predicts one label per decoded frame of ``video`` and writes the ABAW file and CSV.

  Args:
    predictor: the trained model.
    params: its audio feature parameters (`feature_params`).
    video: the media file.
    out: the label file to write; the CSV goes beside it (``<stem>.probs.csv``).
    crops: an Aff-Wild2 ``cropped_aligned/<name>`` folder to use instead of detecting faces.
    smooth_window: centred moving average of probabilities over this many frames (<= 1: off).
    no_face: policy for frames without a face: "audio" or "nearest" (see `labels`).
    detect_every: run the face detector every k-th frame.

  Raises:
    mfer_jax.media.decode.MediaError: if the file cannot be opened or no frame decodes.
  """
  inputs = frames.read_video(video, params, predictor.face_size, crops, detect_every)
  probs, gates = predictor.predict(inputs.face, inputs.mel, inputs.has_face)
  probs = labels_lib.smooth(labels_lib.fill_no_face(probs, inputs.has_face, no_face),
                            smooth_window)
  predicted = probs.argmax(-1)
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  probs_file = labels_lib.probabilities_path(out)
  labels_lib.write_probabilities(probs_file, probs, predicted, inputs.has_face, gates)
  labels_lib.write_labels(out, predicted)   # last: its presence means the video is done
  return VideoResult(str(out), str(probs_file), inputs.num_frames,
                     int(inputs.has_face.sum()), inputs.notes)


def split_names(root: str | os.PathLike, split: str,
                test_list: str | os.PathLike | None = None) -> list[str]:
  """Annotation names of an Aff-Wild2 split: the test list, or the annotation files."""
  if split == "test":
    lists = [pathlib.Path(test_list)] if test_list else affwild2.find_test_list(root)
    if not lists:
      raise affwild2.LayoutError(
          f"no test-set list (*test*set*.txt) under {root}; pass --test_list FILE")
    return affwild2.read_test_list(lists[0])
  return [p.stem for p in affwild2.list_annotations(root, split)]


def predict_split(predictor: predictor_lib.Predictor, params: audio_features.FeatureParams,
                  root: str | os.PathLike, split: str, out_dir: str | os.PathLike, *,
                  test_list: str | os.PathLike | None = None, use_crops: bool = True,
                  overwrite: bool = False, on_video=None, **kwargs) -> dict[str, VideoResult]:
  """Writes ``<out_dir>/<name>.txt`` for every video of an Aff-Wild2 split.

  Two-person videos get one file per side (``x_left.txt``, ``x_right.txt``), each from the
  shared media and its own crops folder. A video whose file exists is skipped unless
  ``overwrite``, so an interrupted submission run resumes.

  Args:
    on_video: optional callback(name, VideoResult | Exception) for progress reporting.
    kwargs: passed to `predict_video` (smooth_window, no_face, detect_every).

  Returns:
    name -> VideoResult for the videos written in this call.
  """
  media_index = affwild2.index_media(root)
  results = {}
  missing = []
  for name in split_names(root, split, test_list):
    out = pathlib.Path(out_dir) / f"{name}.txt"
    if out.exists() and not overwrite:
      continue
    video = media_index.find(name)
    if video is None:
      missing.append(name)
      if on_video:
        on_video(name, FileNotFoundError(f"no media for {name} under {root}/batch*/"))
      continue
    crops = affwild2.crops_dir(root, name) if use_crops else None
    if crops is not None and not crops.is_dir():
      crops = None
    result = predict_video(predictor, params, video, out, crops=crops, **kwargs)
    results[name] = result
    if on_video:
      on_video(name, result)
  if missing:
    raise errors.UserError(f"{len(missing)} video(s) of split {split!r} have no media under "
                           f"{root}/batch*/ (first: {missing[0]}); their files were not written; "
                           "check --root")
  return results


__all__ = ["VideoResult", "feature_params", "predict_split", "predict_video", "split_names"]

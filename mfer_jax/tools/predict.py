r"""Predict expressions for videos with a trained run.

One video (faces are detected, tracked and aligned like the training crops; labels and
probabilities are written):

  python -m mfer_jax.tools.predict --workdir=runs/abaw --video=clip.mp4 [--out=clip.txt]
  python -m mfer_jax.tools.predict --workdir=runs/abaw --video=two_people.mp4 --person=all

--person picks the face track: 'largest' (default: the person present in the most frames),
'left' or 'right' (of the two main people), or 'all' (one label file per person: clip.txt
for one, clip_left.txt and clip_right.txt for two side by side, clip_person<k>.txt
otherwise). See docs/faces.md.

An ABAW submission: one file per video of a split of an Aff-Wild2 root (the split's
cropped_aligned crops are used where they exist, as in training):

  python -m mfer_jax.tools.predict --workdir=runs/abaw --root=/data/Aff-Wild2 --split=test \
      --out=submission/

Every decoded frame gets a label. Frames without a face follow --no_face: 'audio' predicts
from the audio window alone, 'nearest' copies the nearest frame with a face. Per-frame class
probabilities and modality gates go to <out stem>.probs.csv beside each label file.
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from mfer_jax import cli, console, errors
from mfer_jax.media import track
from mfer_jax.prediction import predictor as predictor_lib
from mfer_jax.prediction import videos as predict_lib
from mfer_jax.prediction import labels as labels_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained run directory (config + checkpoints).")
_VIDEO = flags.DEFINE_string("video", None, "One video file to predict.")
_ROOT = flags.DEFINE_string("root", None, "Aff-Wild2 root, to predict a whole split.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"],
                           "Split of --root to predict.")
_TEST_LIST = flags.DEFINE_string("test_list", None,
                                 "Test-set list file (default: found under --root by its "
                                 "known name).")
_ANNOTATIONS = flags.DEFINE_string("annotations", None, "--split=train|validation: the EXPR "
                                   "challenge folder, when --root holds several.")
_OUT = flags.DEFINE_string("out", None, "--video: label file (default <video stem>.txt beside "
                           "the video); --root: output directory.")
_CROPS = flags.DEFINE_string("crops", None, "--video: a cropped_aligned/<name> folder to use "
                             "instead of face detection.")
_USE_CROPS = flags.DEFINE_bool("use_crops", True, "--root: use the cropped_aligned* crops "
                               "(False: detect faces in the frames).")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "Which checkpoint of the workdir.")
_SMOOTH = flags.DEFINE_integer("smooth", 0, "Centred moving average of the probabilities over "
                               "this many frames (0 or 1: off).")
_NO_FACE = flags.DEFINE_enum("no_face", "audio", list(labels_lib.NO_FACE_POLICIES),
                             "Policy for frames without a face.")
_DETECT_EVERY = flags.DEFINE_integer("detect_every", 1, "Detect faces every k-th frame; in "
                                     "between, each face is followed by its landmarks alone "
                                     "(faster, slightly less robust).", lower_bound=1)
_PERSON = flags.DEFINE_enum("person", "largest", list(track.PERSON_CHOICES),
                            "--video: which face track(s) to predict (see above).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Frames per jitted model call.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "--root: rewrite existing files.")
flags.mark_flag_as_required("workdir")



def _report(name, result) -> None:
  if isinstance(result, Exception):
    console.say(f"{name}: skipped: {result}")
    return
  console.say(f"{name}: {result.num_frames} frames ({result.frames_with_face} with a face) "
              f"-> {result.label_file}")
  for note in result.notes:
    console.say(f"  warning: {note}")


def main() -> None:
  if bool(_VIDEO.value) == bool(_ROOT.value):
    raise app.UsageError("give exactly one of --video (one file) or --root (a whole split)")
  predictor = predictor_lib.Predictor(_WORKDIR.value, _CHECKPOINT.value, _BATCH.value)
  params = predict_lib.feature_params(_WORKDIR.value, predictor.config)
  console.say(f"Model: {_WORKDIR.value} step {predictor.step}")
  options = dict(smooth_window=_SMOOTH.value, no_face=_NO_FACE.value,
                 detect_every=_DETECT_EVERY.value)
  if _VIDEO.value:
    video = pathlib.Path(_VIDEO.value)
    if not video.is_file():
      raise errors.UserError(f"--video={video}: no such file; give the path of a video file")
    out = _OUT.value or str(video.with_suffix(".txt"))
    for result in predict_lib.predict_video(predictor, params, video, out, crops=_CROPS.value,
                                            person=_PERSON.value, **options):
      _report(video.name, result)
    return
  if not _OUT.value:
    raise app.UsageError("--root needs --out, the directory for the submission files")
  if flags.FLAGS["person"].present:
    raise app.UsageError("--person applies to --video; with --root each annotation name "
                         "says its person (x_left, x_right, otherwise the largest)")
  results = predict_lib.predict_split(
      predictor, params, _ROOT.value, _SPLIT.value, _OUT.value, test_list=_TEST_LIST.value,
      annotations=_ANNOTATIONS.value, use_crops=_USE_CROPS.value, overwrite=_OVERWRITE.value, on_video=_report, **options)
  console.say(f"Wrote {len(results)} file(s) to {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)

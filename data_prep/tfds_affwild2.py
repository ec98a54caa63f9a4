"""Aff-Wild2 Expression as a TFDS builder (ArrayRecord output, no TensorFlow needed).

    python -m data_prep.tfds_affwild2 --manual_dir=/path/to/Aff-Wild2 \\
        --data_dir=~/tensorflow_datasets [--annotations=DIR] [--test_list=FILE]

or from Python::

    import tensorflow_datasets as tfds
    from data_prep import tfds_affwild2   # registers "aff_wild2_expr"

    builder = tfds_affwild2.AffWild2Expr(data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/path/to/Aff-Wild2"))
    source = builder.as_data_source()        # or tfds.data_source("aff_wild2_expr", ...)
    example = records.decode_record(source["train"][0])

Each example is ``{"record": <version-1 record bytes>, "video", "frame", "label",
"has_face"}``; the extra fields are copies of the record header, which the training pipeline
reads as the sampler's index (`mfer_jax.data.tfds_source`). Records come from
`data_prep.build.prepare_video`, the code ``python -m data_prep.build`` runs, so both routes
give the same bytes per frame. TFDS orders examples by a hash of their key
(``<video>/<frame>``), not by video; the training pipeline puts them back in the prepared
dataset's order.

Only Tensor/Scalar/Text features are used: TFDS writes them without TensorFlow (its Image and
Audio features need TensorFlow to encode). ``builder.info.metadata`` holds what
``metadata.json`` holds for a prepared dataset: ``schema_version``, ``features``, ``splits``
(per split: the videos in record order, num_records, class_counts) and ``videos``.

``tfds build data_prep/tfds_affwild2.py --manual_dir=...`` (the TFDS command line) does not
start without TensorFlow in tensorflow-datasets 4.9.10: its ``tfds`` entry point imports every
subcommand, and ``convert_format`` evaluates ``tf.train.Example`` at import (and
``build_croissant`` needs mlcroissant). The builder itself needs neither; this module's command
line (above) is the same build without them.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

from absl import flags
import numpy as np
import tensorflow_datasets as tfds

from data_prep import build
from mfer_jax import cli, constants, errors
from mfer_jax.data import affwild2
from mfer_jax.data import records
from mfer_jax.media import audio_features

_DESCRIPTION = """\
Aff-Wild2 expression recognition (ABAW Expression challenge, 8 classes): one example per
annotated valid frame (train/validation) or per decoded frame (test, label -1), holding the
112x112 face crop JPEG and a uint8 log-mel window centred on the frame time t = (i-1)/fps.
"""

_CITATION = """\
@inproceedings{kollias2023abaw,
  title={ABAW: Valence-Arousal Estimation, Expression Recognition, Action Unit Detection &
         Emotional Reaction Intensity Estimation Challenges},
  author={Kollias, Dimitrios and Tzirakis, Panagiotis and Baird, Alice and Cowen, Alan and
          Zafeiriou, Stefanos},
  booktitle={CVPR Workshops},
  year={2023}
}
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Aff-Wild2 is licensed for research use under an End User License Agreement (EULA). Request
access from the dataset owners (https://ibug.doc.ic.ac.uk/resources/aff-wild2/ , the ABAW
challenge pages): sign the EULA as (or with) a permanent academic staff member and send it as
instructed there. You will receive download links for the videos, the cropped-aligned faces
and the annotations. This builder cannot download them for you.

Unpack everything into one folder and pass it as the manual dir
(`--manual_dir` or `DownloadConfig(manual_dir=...)`); the parts are found at any depth.
{affwild2.LAYOUT_HELP}
"""


@dataclasses.dataclass
class AffWild2ExprConfig(tfds.core.BuilderConfig):
  """A builder config: the log-mel parameters the records are built with."""

  params: audio_features.FeatureParams = dataclasses.field(
      default_factory=audio_features.FeatureParams)


class AffWild2Expr(tfds.core.GeneratorBasedBuilder):
  """Aff-Wild2 Expression frames as mfer-jax version-1 records."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Record layout v1 (mfer_jax.data.records).",
      "1.1.0": "Metadata gains `splits` (videos in record order, counts) and each video's "
               "crops folder; releases found at any depth, crops from every cropped_aligned*.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [AffWild2ExprConfig(name="default", description="Default log-mel "
                                        "parameters (data_prep.audio_features.FeatureParams).")]

  def __init__(self, *args, file_format="array_record", annotations=None, test_list=None,
               **kwargs):
    """As any TFDS builder, plus the choices ``data_prep.build`` offers as flags.

    Args:
      *args, **kwargs: `tfds.core.GeneratorBasedBuilder` arguments (data_dir, config, ...).
      file_format: "array_record" (random access, no TensorFlow); keep it.
      annotations: the EXPR challenge folder, when the manual dir holds several.
      test_list: the test names file; default: the one with a known name, if any.
    """
    super().__init__(*args, file_format=file_format, **kwargs)
    self._annotations = annotations
    self._test_list = test_list

  @property
  def params(self) -> audio_features.FeatureParams:
    return self.builder_config.params

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            # Raw bytes: a Tensor of dtype object is written and read without TensorFlow.
            "record": tfds.features.Tensor(shape=(), dtype=np.object_),
            "video": tfds.features.Text(),
            "frame": tfds.features.Scalar(dtype=np.int32),
            "label": tfds.features.Scalar(dtype=np.int32),
            "has_face": tfds.features.Scalar(dtype=np.bool_),
        }),
        metadata=tfds.core.MetadataDict(),
        homepage="https://ibug.doc.ic.ac.uk/resources/aff-wild2/",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.manual_dir)
    splits = ["train", "validation"]
    if self._test_list or affwild2.find_test_list(root):
      splits.append("test")
    else:
      logging.warning("%s: no Expression test list (known names: %s); building train and "
                      "validation only", root, ", ".join(affwild2.TEST_LIST_NAMES))
    try:
      plan = build.plan_jobs(root, splits, self._test_list, self._annotations)
    except build.BuildError as e:
      raise BuildError(f"{e} ({MANUAL_DOWNLOAD_INSTRUCTIONS})") from None
    for _, _, why in plan.skipped:
      logging.warning("%s", why)
    self.info.metadata["features"] = {**self.params.to_dict(), "face_size": build.FACE_SIZE}
    self.info.metadata["schema_version"] = records.SCHEMA_VERSION
    self.info.metadata["splits"] = {}
    self.info.metadata["videos"] = {}
    return {split: self._generate_examples(split, [j for j in plan.jobs if j.split == split])
            for split in splits}

  def _generate_examples(self, split, jobs):
    """Examples of one split; its metadata entry is written when the last one is yielded."""
    videos, counts, num_records = [], np.zeros(constants.NUM_CLASSES, np.int64), 0
    media_cache: dict = {}   # a _left/_right pair (adjacent jobs) decodes its media once
    for job in jobs:
      try:
        video = build.prepare_video(job, self.params, media_cache)
      except build.SkipVideo as e:
        logging.error("%s", e)
        continue
      for w in video.warnings:
        logging.warning("%s", w)
      if video.frame.size == 0:
        logging.error("%s: no valid frame (every label is -1); %s left out",
                      job.annotation or job.media, job.name)
        continue
      self.info.metadata["videos"][job.name] = video.entry
      videos.append(job.name)
      num_records += int(video.frame.size)
      counts += np.bincount(video.label[video.label >= 0], minlength=constants.NUM_CLASSES)
      for rec in video.frame_records():
        yield f"{job.name}/{rec.frame:06d}", {
            "record": records.encode_record(rec), "video": job.name, "frame": rec.frame,
            "label": rec.label, "has_face": rec.has_face}
    self.info.metadata["splits"][split] = {"videos": videos, "num_records": num_records,
                                           "class_counts": counts.tolist()}


class BuildError(errors.UserError, ValueError):
  """The manual dir is not a usable Aff-Wild2 release; the message says what to do."""


def _define_flags() -> None:
  # Defined only when run as a command, as in data_prep.build.
  flags.DEFINE_string("manual_dir", None, "The unpacked Aff-Wild2 release (as for "
                      "python -m data_prep.build --root).", required=True)
  flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's, "
                      "~/tensorflow_datasets).")
  flags.DEFINE_string("annotations", None, "The EXPR challenge folder, when the release holds "
                      "several.")
  flags.DEFINE_string("test_list", None, "Test names file (default: the one with a known "
                      "name; without one, test is not built).")


def main() -> None:
  """``python -m data_prep.tfds_affwild2``: builds the TFDS dataset (see the docstring)."""
  f = flags.FLAGS
  manual = pathlib.Path(f.manual_dir).expanduser()
  if not manual.is_dir() or not any(manual.iterdir()):
    raise BuildError(f"--manual_dir={manual} is not a folder with the unpacked release; "
                     "unpack Aff-Wild2 there (see data_prep/README.md)")
  builder = AffWild2Expr(data_dir=f.data_dir, annotations=f.annotations,
                         test_list=f.test_list)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  print(f"Built {builder.info.full_name} in {builder.data_dir}: {splits}. Train on it with "
        f"--config.data.source=tfds --config.data.tfds_data_dir={builder.data_dir_root}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)


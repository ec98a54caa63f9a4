"""Aff-Wild2 Expression as a TFDS builder (ArrayRecord output, no TensorFlow needed).

    import tensorflow_datasets as tfds
    from data_prep import tfds_affwild2   # registers "aff_wild2_expr"

    builder = tfds_affwild2.AffWild2Expr(data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/path/to/Aff-Wild2"))
    source = builder.as_data_source()        # or tfds.data_source("aff_wild2_expr", ...)
    example = records.decode_record(source["train"][0])

Each example is ``{"record": <version-1 record bytes>, "video", "frame", "label",
"has_face"}``; the extra fields are copies of the record header, for filtering without a
decode. Records come from `data_prep.build.prepare_video`, the code ``python -m
data_prep.build`` runs, so both routes give the same bytes per frame. TFDS orders examples by
a hash of their key (``<video>/<frame>``), not by video.

Only Tensor/Scalar/Text features are used: TFDS writes them without TensorFlow (its Image and
Audio features need TensorFlow to encode). The feature parameters and the per-video entries of
``metadata.json`` are kept in the dataset info's metadata.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow_datasets as tfds

from mfer_jax.data import affwild2
from mfer_jax.media import audio_features
from data_prep import build
from mfer_jax.data import records

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
(`--manual_dir` or `DownloadConfig(manual_dir=...)`).
{affwild2.LAYOUT_HELP}
"""


@dataclasses.dataclass
class AffWild2ExprConfig(tfds.core.BuilderConfig):
  """A builder config: the log-mel parameters the records are built with."""

  params: audio_features.FeatureParams = dataclasses.field(
      default_factory=audio_features.FeatureParams)


class AffWild2Expr(tfds.core.GeneratorBasedBuilder):
  """Aff-Wild2 Expression frames as mfer-jax version-1 records."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Record layout v1 (mfer_jax.data.records)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [AffWild2ExprConfig(name="default", description="Default log-mel "
                                        "parameters (data_prep.audio_features.FeatureParams).")]

  def __init__(self, *args, file_format="array_record", **kwargs):
    super().__init__(*args, file_format=file_format, **kwargs)

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
    root = dl_manager.manual_dir
    splits = ["train", "validation"]
    if affwild2.find_test_list(root):
      splits.append("test")
    else:
      logging.warning("%s: no test list (*test*set*.txt); building train and validation only",
                      root)
    try:
      plan = build.plan_jobs(root, splits)
    except build.BuildError as e:
      raise ValueError(f"{e}\n\n{MANUAL_DOWNLOAD_INSTRUCTIONS}") from None
    for _, _, why in plan.skipped:
      logging.warning("%s", why)
    self.info.metadata["features"] = {**self.params.to_dict(), "face_size": build.FACE_SIZE}
    self.info.metadata["schema_version"] = records.SCHEMA_VERSION
    self.info.metadata["videos"] = {}
    return {split: self._generate_examples([j for j in plan.jobs if j.split == split])
            for split in splits}

  def _generate_examples(self, jobs):
    for job in jobs:
      try:
        video = build.prepare_video(job, self.params)
      except build.SkipVideo as e:
        logging.error("%s", e)
        continue
      for w in video.warnings:
        logging.warning("%s", w)
      self.info.metadata["videos"][job.name] = video.entry
      for rec in video.frame_records():
        yield f"{job.name}/{rec.frame:06d}", {
            "record": records.encode_record(rec), "video": job.name, "frame": rec.frame,
            "label": rec.label, "has_face": rec.has_face}


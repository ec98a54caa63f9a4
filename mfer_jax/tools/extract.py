r"""Extracts per-frame encoder features of a prepared dataset, for training heads on top.

  python -m mfer_jax.tools.extract --config=configs/abaw_features.py \
      --data_dir=/data/affwild2_prepared --out=/data/affwild2_features \
      --media_root=/data/Aff-Wild2 [--splits=train,validation]
  python -m mfer_jax.tools.extract --config=configs/abaw_features.py \
      --config.data.source=tfds --config.data.tfds_data_dir=/data/tfds \
      --out=/data/affwild2_features --media_root=/data/Aff-Wild2     # a TFDS-built set

The config names the encoders and their weights (``model.image`` / ``model.audio``: family,
variant, init_file) and the feature parameters (``features.*``); training with the same config
and ``--config.data.features_dir=FEATURES`` reads the cache and refuses one made with other
encoders, weights or parameters. Faces come from the prepared records; wav2vec 2.0 / HuBERT
audio from the original media under --media_root (the root the data was prepared from:
``metadata.json`` names each video's media relative to it); Swin / ViT audio from the
records' log-mel windows. Runs on all local devices. Resumable: rerun the same command after
an interruption and finished videos are skipped (docs/foundation.md).
"""

from __future__ import annotations

import difflib

from absl import flags
from ml_collections import config_flags

from mfer_jax import cli, constants, errors
from mfer_jax.features import extract

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file naming the encoders, "
                                          "e.g. configs/abaw_features.py.", lock_config=True)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "Prepared dataset (python -m data_prep.build); without it, the dataset "
    "config.data names (e.g. --config.data.source=tfds --config.data.tfds_data_dir=DIR).")
_OUT = flags.DEFINE_string("out", None, "Feature cache directory to write.", required=True)
_MEDIA_ROOT = flags.DEFINE_string(
    "media_root", "", "Aff-Wild2 root the data was prepared from (the media of wav2vec2 / "
    "hubert audio); not needed for Swin / ViT audio, which reads the records' log-mels.")
_SPLITS = flags.DEFINE_list("splits", ["train", "validation"],
                            f"Splits to extract, among {','.join(constants.SPLITS)}.")
flags.mark_flags_as_required(["config"])


def main() -> None:
  splits = [s.strip() for s in _SPLITS.value if s.strip()]
  unknown = [s for s in splits if s not in constants.SPLITS]
  if unknown:
    # A misspelt split is a usage error (exit 2), named before any encoder is loaded.
    hint = difflib.get_close_matches(unknown[0], constants.SPLITS, n=1)
    raise errors.UsageError(
        f"--splits: unknown split {unknown[0]!r}"
        + (f"; did you mean {hint[0]!r}?" if hint else "")
        + f" Choose among {','.join(constants.SPLITS)}.")
  extract.extract(_CONFIG.value, _DATA_DIR.value, _OUT.value, splits=splits,
                  media_root=_MEDIA_ROOT.value)


if __name__ == "__main__":
  cli.run(main)

"""The tiny test config with the variant syntax, for the ablation runner's tests.

``tests/configs/tiny.py`` takes the data directory as its argument; a sweep needs the
``fusion=..,sampling=..,seed=..`` argument instead, so the data directory comes as an override:
``--config=tests/configs/tiny_sweep.py:fusion=concat --config.data.data_dir=/tmp/data``.
"""

import os
import sys

from ml_collections import ConfigDict

from mfer_jax import config_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str | None = None) -> ConfigDict:
  return config_lib.apply_variant_args(tiny.get_config(""), arg)

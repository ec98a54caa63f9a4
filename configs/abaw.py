"""The paper's setup on prepared Aff-Wild2: Swin-T for faces and audio at 224, MFM fusion.

Usage:
  python main.py --config=configs/abaw.py --workdir=runs/abaw \
      --config.data.data_dir=/data/affwild2_prepared
  python main.py --config=configs/abaw.py --workdir=runs/abaw \
      --config.data.source=tfds --config.data.tfds_data_dir=/data/tfds   # the TFDS build

Named variants go through the config argument (comma-separated key=value):
  configs/abaw.py:fusion=audio_only,sampling=natural
  configs/abaw.py:fusion=gated,size=small,seed=1,dtype=bfloat16
Keys: fusion (visual_only|audio_only|concat|sum|gated|mfm), sampling (dynamic|natural),
size (tiny|small|base|large), seed (int), dtype (float32|bfloat16).
Any single value can also be overridden with --config.a.b=value; unknown keys are an error.
"""

from ml_collections import ConfigDict

from mfer_jax import config_lib


def get_config(arg: str | None = None) -> ConfigDict:
  c = config_lib.base_config()
  c.data.data_dir = "data/affwild2"
  c.data.batch_size = 64
  c.train.num_epochs = 20
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 1000
  return config_lib.apply_variant_args(c, arg)

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
size (tiny|small|base|large), seed (int), dtype (float32|bfloat16), image / audio (the
encoder: swin_t|swin_s|swin_b|swin_l, or a ViT such as vit_b16, dinov2_b14_reg, mae_b16,
clip_b16; models/vit.py lists them).

Fine-tuning a pretrained ViT end to end (weights converted with python -m
mfer_jax.tools.convert --family=vit), with the ViT recipe's layer-wise learning-rate decay:
  python main.py --config=configs/abaw.py:image=dinov2_b14_reg --workdir=runs/dinov2 \
      --config.model.image.init_file=dinov2_b14_reg.safetensors --config.train.layer_decay=0.75
Training heads on cached DINOv2 + wav2vec 2.0 features instead: configs/abaw_features.py.
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

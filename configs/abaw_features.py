"""Heads on cached DINOv2 + wav2vec 2.0 features of prepared Aff-Wild2 (docs/foundation.md).

The recent ABAW recipe: large pretrained encoders run once over every frame, then fusion (and
temporal) heads train on the cached features in minutes. From raw Aff-Wild2:

  python -m data_prep.build --root=/data/Aff-Wild2 --out=/data/affwild2_prepared
  python -m mfer_jax.tools.convert --family=vit --variant=dinov2_l14_reg --img_size=224,224 \\
      --in=vit_large_patch14_reg4_dinov2.lvd142m.safetensors --out=weights/dinov2_l14_reg.safetensors
  python -m mfer_jax.tools.convert --family=wav2vec2 --variant=base \\
      --in=wav2vec2-base/model.safetensors --out=weights/wav2vec2_base.safetensors
  python -m mfer_jax.tools.extract --config=configs/abaw_features.py \\
      --data_dir=/data/affwild2_prepared --out=/data/affwild2_features --media_root=/data/Aff-Wild2
  python main.py --config=configs/abaw_features.py --workdir=runs/features \\
      --config.data.data_dir=/data/affwild2_prepared \\
      --config.data.features_dir=/data/affwild2_features

The same config runs both commands: training refuses a cache made with other encoders,
weights or feature parameters. Variants as in configs/abaw.py (fusion=..., sampling=...,
seed=..., image=dinov2_b14_reg, audio=hubert_base, ...). A temporal head trains on the same
cache (clips of 16 frames; ``clip=T`` for another length; the batch sizes count clips):

  python main.py --config=configs/abaw_features.py:temporal=transformer --workdir=runs/feat_tr \
      --config.data.data_dir=/data/affwild2_prepared \
      --config.data.features_dir=/data/affwild2_features
"""

from ml_collections import ConfigDict

from mfer_jax import config_lib


def get_config(arg: str | None = None) -> ConfigDict:
  c = config_lib.base_config()
  c.data.data_dir = "data/affwild2_prepared"
  c.data.features_dir = "data/affwild2_features"
  c.model.image.update(family="vit", variant="dinov2_l14_reg", img_size=(224, 224),
                       drop_path_rate=0.0, init_file="weights/dinov2_l14_reg.safetensors")
  c.model.audio.update(family="wav2vec2", variant="base",
                       init_file="weights/wav2vec2_base.safetensors")
  c.features.update(dtype="float16", batch_size=64)
  # A head on vectors trains fast: large batches, a higher learning rate, more epochs.
  c.model.fusion.update(dim=256, num_layers=1, num_heads=8, dropout=0.2, gate_hidden=128)
  c.model.modality_dropout = 0.2
  c.data.batch_size = 512
  c.data.eval_batch_size = 1024
  c.data.read_threads = 2
  c.train.num_epochs = 30
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 200
  c.train.weight_decay = 0.05
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000
  return config_lib.apply_variant_args(c, arg)

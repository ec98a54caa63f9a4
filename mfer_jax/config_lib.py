"""Shared config defaults and the ``configs/<x>.py:key=value,...`` variant syntax.

Config files stay short: they take `base_config()` and change what differs. Every key that
exists is documented here, so ``--config.a.b=v`` overrides and unknown keys are errors
(ml_collections refuses to set a key that does not exist).
"""

from __future__ import annotations

from typing import Callable

from ml_collections import ConfigDict

from mfer_jax import sharding
from mfer_jax.data import config as data_config
from mfer_jax.constants import DTYPES, FUSION_VARIANTS, SAMPLING_MODES


def _encoder(in_chans: int) -> ConfigDict:
  return ConfigDict({
      "variant": "tiny",          # tiny | small | base | large | test sizes (models/swin.py)
      "img_size": (224, 224),     # encoder input (H, W); faces / mels are resized on device
      "window_size": 7,
      "in_chans": in_chans,       # audio: 3 = mel repeated (authors), 1 = summed RGB kernel
      "drop_path_rate": 0.1,
      "init_file": "",            # params from `python -m mfer_jax.tools.convert` ('' = scratch)
  })


def base_config() -> ConfigDict:
  """All keys with their defaults (the paper's model at Swin-T / 224)."""
  c = ConfigDict()
  c.seed = 0
  c.model = ConfigDict({
      "num_classes": 8,
      "dtype": "float32",         # compute dtype: float32 | bfloat16 (params stay float32)
      "modality_dropout": 0.1,    # chance of blanking one modality of a training example
      "image": _encoder(3),
      "audio": _encoder(3),
      "fusion": {
          "name": "mfm",          # one of FUSION_VARIANTS
          "dim": 256,             # common width of both streams
          "num_layers": 2,        # bidirectional cross-attention blocks (mfm)
          "num_heads": 8,
          "mlp_ratio": 4.0,
          "dropout": 0.1,
          "gate_hidden": 128,     # hidden width of the modality-gate MLP (gated, mfm)
          "combine": "sum",       # EXPERIMENT gated/mfm: sum | concat of gated pooled features
          "gate": "softmax",      # EXPERIMENT softmax | sigmoid
          "gate_bias": 0.0,       # EXPERIMENT initial gate-logit bias
          "pool": "mean",         # EXPERIMENT mean | attention
      },
  })
  c.data = data_config.default_data_config()
  c.train = ConfigDict({
      "num_epochs": 20,           # epochs of data.sampling.epoch_size examples
      "max_steps": -1,            # > 0 caps the run (smoke tests)
      "optimizer": "adamw",       # adamw | adam
      "learning_rate": 1e-4,
      "warmup_steps": 1000,
      "final_lr_ratio": 0.01,     # cosine decays to learning_rate * final_lr_ratio
      "weight_decay": 0.05,
      "b1": 0.9,
      "b2": 0.999,
      "grad_clip_norm": 1.0,      # 0 disables clipping
      "grad_accum_steps": 1,      # microbatches per step (same global batch, less memory)
      "label_smoothing": 0.0,
      # > 0 keeps an exponential moving average of the params (decay min(ema_decay,
      # (1 + step) / (10 + step))); evaluation, the best checkpoint and prediction use it.
      "ema_decay": 0.0,
      "fusion_blocks_lr_scale": 1.0,  # EXPERIMENT lr multiplier of the fusion's cross-attention
      "class_weights": "none",    # none | inverse | inverse_sqrt (loss weights from counts)
      "log_every_steps": 50,
      "eval_every_steps": -1,     # -1: once per epoch
      "checkpoint_every_steps": 500,
      "keep_checkpoints": 3,      # newest N, plus the best by validation macro-F1
      "async_checkpointing": True,
      "eval_split": "validation",
      # Train frames (evenly spaced, no augmentation) evaluated at every evaluation next to
      # eval_split, so memorisation shows; 0 = off.
      "train_eval_examples": 0,
  })
  c.mesh = ConfigDict({
      "shape": (-1, 1, 1),        # over axes; -1 takes the remaining devices
      "axes": sharding.MESH_AXES,
      "rules": sharding.DEFAULT_RULES,
  })
  return c


def _fusion(c: ConfigDict, value: str) -> None:
  if value not in FUSION_VARIANTS:
    raise ValueError(f"fusion={value!r}: choose one of {FUSION_VARIANTS}")
  c.model.fusion.name = value


def _sampling(c: ConfigDict, value: str) -> None:
  if value not in SAMPLING_MODES:
    raise ValueError(f"sampling={value!r}: choose one of {SAMPLING_MODES}")
  c.data.sampling.mode = value


def _size(c: ConfigDict, value: str) -> None:
  c.model.image.variant = c.model.audio.variant = value


def _seed(c: ConfigDict, value: str) -> None:
  # One seed for the model init, dropout and the data order/augmentation, so a sweep over
  # seeds varies everything that is random.
  c.seed = c.data.seed = int(value)


def _dtype(c: ConfigDict, value: str) -> None:
  if value not in DTYPES:
    raise ValueError(f"dtype={value!r}: choose one of {DTYPES}")
  c.model.dtype = value


VARIANT_KEYS: dict[str, Callable[[ConfigDict, str], None]] = {
    "fusion": _fusion,
    "sampling": _sampling,
    "size": _size,
    "seed": _seed,
    "dtype": _dtype,
}


def apply_variant_args(c: ConfigDict, arg: str | None) -> ConfigDict:
  """Applies ``key=value,key=value`` from the config argument; unknown keys are errors."""
  if not arg:
    return c
  for item in arg.split(","):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in VARIANT_KEYS:
      raise ValueError(f"config argument {item!r}: expected key=value with key in "
                       f"{sorted(VARIANT_KEYS)} (e.g. configs/abaw.py:fusion=gated)")
    VARIANT_KEYS[key](c, value.strip())
  return c

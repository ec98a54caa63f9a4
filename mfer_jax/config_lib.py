"""Shared config defaults and the ``configs/<x>.py:key=value,...`` variant syntax.

Config files stay short: they take `base_config()` and change what differs. Every key that
exists is documented here, so ``--config.a.b=v`` overrides and unknown keys are errors
(ml_collections refuses to set a key that does not exist).
"""

from __future__ import annotations

import difflib
from typing import Callable

from ml_collections import ConfigDict

from mfer_jax import errors, sharding
from mfer_jax.data import config as data_config
from mfer_jax.constants import DTYPES, FUSION_VARIANTS, SAMPLING_MODES, TEMPORAL_HEADS


# Clip length a `temporal=` variant sets when the config is in frame mode (T = 1).
DEFAULT_CLIP_LENGTH = 16


def _encoder(in_chans: int) -> ConfigDict:
  return ConfigDict({
      # swin | vit (faces or the log-mel image); audio also wav2vec2 | hubert (raw waveform:
      # cached features via data.features_dir, and prediction). models/encoders.py.
      "family": "swin",
      "variant": "tiny",          # swin: tiny | small | base | large | test (models/swin.py);
                                  # vit: dinov2_s14_reg, mae_b16, clip_b16, ... (models/vit.py);
                                  # wav2vec2 / hubert: base | large | ... (models/wav2vec2.py)
      "img_size": (224, 224),     # encoder input (H, W); faces / mels are resized on device
      "window_size": 7,           # swin only
      "in_chans": in_chans,       # audio: 3 = mel repeated (authors), 1 = one grey channel
                                  # (3-channel Swin init files are folded in exactly)
      "drop_path_rate": 0.1,
      "pool": "",                 # vit: token | avg; '' = the variant's own (DINOv2, CLIP:
                                  # class token; MAE: mean of the patch tokens)
      "init_file": "",            # params from `python -m mfer_jax.tools.convert` ('' = scratch)
  })


def evaluator(split: str, every_steps: int = -1, max_examples: int = 0,
              metrics: tuple[str, ...] = ("macro_f1", "accuracy")) -> ConfigDict:
  """One ``config.evals`` entry.

  Args:
    split: the prepared split to evaluate (its frames with a label; -1 frames never count).
    every_steps: evaluate every N train steps; -1: once per epoch. The last step is always
      evaluated.
    max_examples: 0 evaluates every labelled frame; N > 0 an evenly spaced subset of N (a
      fixed subset, so evaluations of one run are comparable).
    metrics: which numbers of the evaluation (macro_f1, accuracy) go to TensorBoard and the
      console; the eval JSON always holds them all (per-class F1, confusion, gates).
  """
  return ConfigDict({"split": split, "every_steps": every_steps,
                     "max_examples": max_examples, "metrics": tuple(metrics)})


def base_config() -> ConfigDict:
  """All keys with their defaults (the paper's model at Swin-T / 224)."""
  c = ConfigDict()
  c.seed = 0
  c.model = ConfigDict({
      "num_classes": 8,
      # The precision policy of every layer (mfer_jax/models/layers.py, docs/scaling.md).
      "precision": {
          "compute_dtype": "float32",  # matmul operands: float32 | bfloat16 (f32 accumulate)
          "param_dtype": "float32",    # param storage: float32 | bfloat16
          "matmul": "auto",            # xla | cpu_amx | auto (cpu_amx on the CPU backend)
      },
      # jax.checkpoint per Swin and fusion block: none | block | dots_saveable.
      "remat": "none",
      "modality_dropout": 0.1,    # chance of blanking one modality of a training example
      "image": _encoder(3),
      "audio": _encoder(3),
      "fusion": {
          "name": "mfm",          # one of FUSION_VARIANTS
          "dim": 256,             # common width of both streams
          "num_layers": 2,        # bidirectional cross-attention blocks (mfm*)
          "num_heads": 8,
          "mlp_ratio": 4.0,
          "dropout": 0.1,
          "gate_hidden": 128,     # hidden width of the modality-gate MLP (gated, mfm*)
          # > 0: a linear head on each modality's own pooled feature (before any fusion),
          # trained with this weight next to the fused head's loss, so that each encoder
          # learns its modality's evidence instead of the fit resting on the one that
          # memorises fastest (docs/demo_experiments.md). Prediction uses the fused head only.
          "unimodal_loss_weight": 0.0,
          # > 0: adds this weight times (log 2 - entropy of the softmax modality weights) on
          # frames where both modalities were seen (gated, mfm), against a gate that hands one
          # modality all the weight (docs/method.md, docs/demo_experiments.md).
          "gate_entropy_weight": 0.0,
      },
      # The temporal head over the fused features of a clip's frames (models/temporal.py,
      # docs/temporal.md); any head but none needs data.sequence.length >= 2.
      "temporal": {
          "name": "none",         # none | transformer | tcn
          "num_layers": 2,        # transformer blocks
          "num_heads": 4,         # transformer heads; must divide the fused width
          "mlp_ratio": 2.0,       # hidden width / feature width (transformer MLP, tcn blocks)
          "dropout": 0.1,         # on every residual branch of the head
          "position": "relative",  # transformer: learned (absolute) | relative (bias per head)
          "max_length": 64,       # longest clip the position table holds (>= sequence.length)
          "kernel_size": 3,       # tcn: taps per convolution (odd: centred, non-causal)
          "dilations": (1, 2, 4),  # tcn: one residual block per dilation; receptive field
                                  # 1 + (kernel_size - 1) * sum(dilations) clip slots
      },
  })
  c.data = data_config.default_data_config()
  # Cached encoder features (`python -m mfer_jax.tools.extract`, mfer_jax/features.py): how
  # they are made. Training with data.features_dir checks the cache was made with these values
  # and the encoders and init files of config.model.
  c.features = ConfigDict({
      "dtype": "float16",         # storage: float16 | bfloat16
      "batch_size": 64,           # frames (or audio chunks) per encoder call, over all devices
      "audio_normalize": True,    # wav2vec2/hubert: zero mean, unit variance per track (as HF's
                                  # feature extractor does per utterance)
      "audio_pool_seconds": 0.1,  # wav2vec2/hubert: mean of the 20 ms frames within this span
                                  # centred on the video frame's time t = (i - 1) / fps
      "audio_chunk_seconds": 10.0,  # wav2vec2/hubert: the track runs in chunks this long ...
      "audio_context_seconds": 2.0,  # ... each seeing this much more audio on both sides
  })
  c.train = ConfigDict({
      "num_epochs": 20,           # epochs of data.sampling.epoch_size examples
      "max_steps": -1,            # > 0 caps the run (smoke tests)
      "optimizer": "adamw",       # adamw | adam
      "learning_rate": 1e-4,
      "warmup_steps": 1000,
      "final_lr_ratio": 0.01,     # cosine decays to learning_rate * final_lr_ratio
      "weight_decay": 0.05,
      "layer_decay": 1.0,         # encoder block l of L: lr * layer_decay ** (L + 1 - l);
                                  # 1 = off; 0.65-0.75 fine-tunes ViTs (training/layer_decay.py)
      "b1": 0.9,
      "b2": 0.999,
      "mu_dtype": "float32",      # Adam first moments: float32 | bfloat16 (optax mu_dtype)
      "grad_clip_norm": 1.0,      # 0 disables clipping
      "grad_accum_steps": 1,      # microbatches per step (same global batch, less memory)
      "label_smoothing": 0.0,
      # > 0 keeps an exponential moving average of the params in the train state (decay
      # min(ema_decay, (1 + step) / (10 + step)), training/step.py); it is checkpointed, and
      # the evaluators (so the best checkpoint) and prediction use it instead of the params.
      "ema_decay": 0.0,
      "loss": "cross_entropy",    # cross_entropy | focal (training/losses.py)
      "focal_gamma": 2.0,         # focal: (1 - p_t)^gamma down-weights easy frames; 0 = CE
      "focal_alpha": (),          # focal: () or one weight per class (alpha_c of the target)
      "class_weights": "none",    # none | inverse | inverse_sqrt (loss weights from counts)
      "log_every_steps": 50,
      # "A:B" writes a jax.profiler trace of steps A..B-1 to <workdir>/profile; "" = off.
      "profile_steps": "",
      "checkpoint_every_steps": 500,
      "keep_checkpoints": 3,      # newest N, plus the best by the primary eval's macro-F1
      "async_checkpointing": True,
      # The `evals` entry whose macro-F1 picks the best checkpoint, feeds
      # data.sampling.adaptive_beta, is printed as the run's result and goes to eval/<step>.json
      # (other entries write eval/<name>/<step>.json); --mode=eval runs only this one.
      "primary_eval": "validation",
  })
  # Evaluators, built once per run (mfer_jax/training/evaluator.py), as big_vision's
  # config.evals. Add more in a config file, e.g. train-subset F1 to watch memorisation:
  #   c.evals.train_subset = config_lib.evaluator("train", max_examples=2048)
  c.evals = ConfigDict({"validation": evaluator("validation")})
  c.mesh = ConfigDict({
      "shape": (-1, 1, 1),        # over axes; -1 takes the remaining devices
      "axes": sharding.MESH_AXES,
      "rules": sharding.DEFAULT_RULES,
      # Largest share of param bytes allowed to stay replicated on every device (a mesh axis
      # that does not divide a width leaves it replicated); -1 = 0.1 when fsdp > 1, else off.
      "max_replicated_fraction": -1.0,
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
  c.model.precision.compute_dtype = value


_SWIN_NAMES = {"swin_t": "tiny", "swin_s": "small", "swin_b": "base", "swin_l": "large"}


def _encoder_choice(enc: ConfigDict, value: str, key: str, waveform: bool) -> None:
  """Sets family, variant and input size of an encoder from one name (swin_t, vit_b16, ...)."""
  from mfer_jax.models import vit, wav2vec2  # pylint: disable=g-import-not-at-top
  family, _, rest = value.partition("_")
  if value in _SWIN_NAMES:
    enc.update(family="swin", variant=_SWIN_NAMES[value], img_size=(224, 224))
  elif value in vit.VARIANTS and value != "test":
    enc.update(family="vit", variant=value, img_size=(224, 224), window_size=7)
  elif waveform and (family, rest) in wav2vec2.VARIANTS and not rest.startswith("test"):
    enc.update(family=family, variant=rest)
  else:
    choices = list(_SWIN_NAMES) + [v for v in vit.VARIANTS if v != "test"]
    if waveform:
      choices += [f"{f}_{v}" for f, v in wav2vec2.VARIANTS if not v.startswith("test")]
    raise ValueError(f"{key}={value!r}: choose one of {', '.join(choices)}")


def _image(c: ConfigDict, value: str) -> None:
  _encoder_choice(c.model.image, value, "image", waveform=False)


def _audio(c: ConfigDict, value: str) -> None:
  _encoder_choice(c.model.audio, value, "audio", waveform=True)


def set_clip_length(c: ConfigDict, length: int) -> None:
  """Sets ``data.sequence.length`` and keeps the frames per batch and per epoch.

  ``data.batch_size``, ``data.eval_batch_size`` and a non-zero ``data.sampling.epoch_size``
  count clips (or windows), so they are scaled by old length / new length (at least 1): a
  frame-mode config with batch 32 becomes 2 clips of 16 frames, and its ablation rows compare
  heads at the same compute per step and the same frames per epoch.
  """
  old = int(c.data.sequence.length)
  length = int(length)
  if length < 1:
    raise ValueError(f"clip={length}: the clip length must be >= 1")
  rescale = lambda n: max(1, int(n) * old // length)  # noqa: E731
  c.data.batch_size = rescale(c.data.batch_size)
  c.data.eval_batch_size = rescale(c.data.eval_batch_size)
  if c.data.sampling.epoch_size:
    c.data.sampling.epoch_size = rescale(c.data.sampling.epoch_size)
  c.data.sequence.length = length


def _temporal(c: ConfigDict, value: str) -> None:
  if value not in TEMPORAL_HEADS:
    raise ValueError(f"temporal={value!r}: choose one of {TEMPORAL_HEADS}")
  c.model.temporal.name = value
  if value != "none" and c.data.sequence.length == 1:
    # A temporal head needs clips; 'none' keeps the config's mode (frames by default).
    set_clip_length(c, DEFAULT_CLIP_LENGTH)


def _clip(c: ConfigDict, value: str) -> None:
  set_clip_length(c, int(value))


VARIANT_KEYS: dict[str, Callable[[ConfigDict, str], None]] = {
    "image": _image,
    "audio": _audio,
    "fusion": _fusion,
    "sampling": _sampling,
    "size": _size,
    "seed": _seed,
    "dtype": _dtype,
    "temporal": _temporal,
    "clip": _clip,
}


def validate(c: ConfigDict) -> ConfigDict:
  """Checks the values that config files and ``--config.*`` overrides can get wrong together.

  Called when a run, a prediction or a sweep starts, after every override, so a bad
  combination fails at once with one line instead of minutes into a run.

  Raises:
    errors.UsageError: naming the key and the fix.
  """
  from mfer_jax.data import clips  # pylint: disable=g-import-not-at-top
  from mfer_jax.models import temporal  # pylint: disable=g-import-not-at-top
  from mfer_jax.training import losses  # pylint: disable=g-import-not-at-top
  seq = clips.SequenceOptions.from_config(c.data.sequence)
  temporal.check_config(c.model.temporal)
  head = c.model.temporal.name
  if head != "none" and seq.length < 2:
    raise errors.UsageError(
        f"model.temporal.name={head!r} needs clips: set data.sequence.length >= 2 (e.g. "
        f"--config.data.sequence.length={DEFAULT_CLIP_LENGTH}), or use temporal head 'none'")
  if head == "transformer" and seq.length > c.model.temporal.max_length:
    raise errors.UsageError(
        f"data.sequence.length={seq.length} exceeds model.temporal.max_length="
        f"{c.model.temporal.max_length}; raise model.temporal.max_length")
  losses.check_config(c.train, c.model.num_classes)
  if c.model.fusion.get("gate_entropy_weight", 0.0) < 0:
    raise errors.UsageError(f"model.fusion.gate_entropy_weight="
                            f"{c.model.fusion.gate_entropy_weight}: must be >= 0 (0 is off)")
  return c


def apply_variant_args(c: ConfigDict, arg: str | None) -> ConfigDict:
  """Applies ``key=value,key=value`` from the config argument; unknown keys are errors."""
  if not arg:
    return c
  for item in arg.split(","):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in VARIANT_KEYS:
      close = difflib.get_close_matches(key, VARIANT_KEYS, n=1)
      hint = f"; did you mean {close[0]!r}?" if close and sep else ""
      raise ValueError(f"config argument {item!r}: expected key=value with key in "
                       f"{sorted(VARIANT_KEYS)}{hint} (e.g. configs/abaw.py:fusion=gated)")
    VARIANT_KEYS[key](c, value.strip())
  return c

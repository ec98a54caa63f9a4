"""Optimizer and learning-rate schedule from ``config.train``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from mfer_jax import errors
from mfer_jax.constants import DTYPES
from mfer_jax.training import layer_decay


MU_DTYPES = DTYPES


def learning_rate_schedule(cfg: ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``cfg.learning_rate``, then cosine decay to ``lr * final_lr_ratio``."""
  warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.final_lr_ratio)


def make_optimizer(cfg: ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                               optax.Schedule]:
  """Builds the optimizer named by ``cfg.optimizer`` ('adamw' or 'adam').

  Args:
    cfg: ``config.train``: optimizer, learning_rate, warmup_steps, final_lr_ratio,
      weight_decay, b1, b2, grad_clip_norm, mu_dtype, layer_decay
      (`mfer_jax.training.layer_decay`).
    total_steps: optimizer steps of the whole run (for the cosine decay).

  Returns:
    (transformation, schedule); the schedule is also used to log the learning rate.
  """
  schedule = learning_rate_schedule(cfg, total_steps)
  if cfg.mu_dtype not in MU_DTYPES:
    raise errors.UsageError(f"train.mu_dtype={cfg.mu_dtype!r}: choose one of "
                            f"{', '.join(MU_DTYPES)}")
  # First moments in bf16 save a quarter of the optimizer state; second moments stay float32
  # (their small values underflow in bf16), as optax.adamw's mu_dtype does.
  mu_dtype = jnp.dtype(cfg.mu_dtype)
  parts = []
  if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.optimizer == "adamw":
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, mu_dtype=mu_dtype,
                             weight_decay=cfg.weight_decay, mask=weight_decay_mask))
  elif cfg.optimizer == "adam":
    # The authors' 2022 recipe: Adam with L2 weight decay added to the gradient.
    parts += [optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask),
              optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, mu_dtype=mu_dtype)]
  else:
    raise ValueError(f"train.optimizer {cfg.optimizer!r}: choose 'adamw' or 'adam'")
  decay = float(cfg.get("layer_decay", 1.0))
  if not 0.0 < decay <= 1.0:
    raise errors.UsageError(f"train.layer_decay={decay}: choose a value in (0, 1] (1 = off)")
  if decay != 1.0:
    parts.append(layer_decay.scale_by_layer(decay))
  return optax.chain(*parts), schedule


_NO_DECAY_NAMES = ("relative_position", "modality_embed")


def weight_decay_mask(params):
  """True for leaves that get weight decay: matrices and kernels.

  Biases, norms (1-D) and the embedding-like tables (relative-position bias, modality
  embeddings) are not decayed, following timm's Swin ``no_weight_decay``.
  """

  def decay(path, p):
    name = jax.tree_util.keystr(path)
    return p.ndim >= 2 and not any(n in name for n in _NO_DECAY_NAMES)

  return jax.tree_util.tree_map_with_path(decay, params)

"""Per-frame classification losses, name-keyed by ``config.train.loss``.

  cross_entropy  ``-sum_c q_c log p_c`` (q the one-hot target, optionally label-smoothed)
  focal          ``-sum_c q_c alpha_c (1 - p_c)^gamma log p_c`` (Lin et al., 2017): frames the
                 model already gets right (p_t near 1) are down-weighted by (1 - p_t)^gamma,
                 so the rare, hard expressions carry more of the gradient; ``alpha_c`` is an
                 optional per-class weight (``train.focal_alpha``, default all 1). With
                 gamma 0 and no alpha it is cross-entropy.

Both take logits of any leading shape (frames [B, C] or clips [B, T, C]) and return the loss
of every frame; the train step weights, masks and normalises them. `unimodal_loss_sum` adds
the same loss of the per-modality heads (``model.fusion.unimodal_loss_weight``), and
`gate_entropy_penalty_sum` a penalty on one-sided modality weights
(``model.fusion.gate_entropy_weight``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from mfer_jax import errors

LOSSES = ("cross_entropy", "focal")


def targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
  """One-hot targets, smoothed towards uniform by ``label_smoothing``."""
  q = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    q = q * (1.0 - label_smoothing) + label_smoothing / num_classes
  return q


def focal(logits: jax.Array, q: jax.Array, gamma: float,
          alpha: Sequence[float] | None = None) -> jax.Array:
  """Focal loss of every frame, float32 [...]: ``-sum_c q_c alpha_c (1 - p_c)^gamma log p_c``."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  term = q * logp
  if gamma:
    term = term * (1.0 - jnp.exp(logp)) ** gamma
  if alpha is not None:
    term = term * jnp.asarray(alpha, jnp.float32)
  return -jnp.sum(term, axis=-1)


def check_config(cfg: ConfigDict, num_classes: int) -> None:
  """Validates ``train.loss``, ``focal_gamma`` and ``focal_alpha``."""
  if cfg.loss not in LOSSES:
    raise errors.UsageError(f"train.loss={cfg.loss!r}: choose one of {', '.join(LOSSES)}")
  if cfg.focal_gamma < 0:
    raise errors.UsageError(f"train.focal_gamma={cfg.focal_gamma}: must be >= 0")
  alpha = tuple(cfg.focal_alpha)
  if alpha and (len(alpha) != num_classes or min(alpha) < 0):
    raise errors.UsageError(f"train.focal_alpha={alpha}: give {num_classes} non-negative "
                            "weights, one per class, or () for none")


def make_loss(cfg: ConfigDict, num_classes: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``loss(logits [..., C], labels [...]) -> float32 [...]`` from ``config.train``.

  Labels must be valid class indices (the caller masks -1 frames out afterwards).
  """
  check_config(cfg, num_classes)
  smoothing = float(cfg.label_smoothing)
  if cfg.loss == "cross_entropy":
    return lambda logits, labels: optax.softmax_cross_entropy(
        logits, targets(labels, num_classes, smoothing))
  gamma = float(cfg.focal_gamma)
  alpha = tuple(float(a) for a in cfg.focal_alpha) or None
  return lambda logits, labels: focal(logits, targets(labels, num_classes, smoothing), gamma,
                                      alpha)


def gate_entropy_penalty_sum(gates: jax.Array, available: jax.Array, weights: jax.Array,
                              weight: float) -> jax.Array:
  """The weighted gate-entropy penalty sum, to add to the fused head's loss sum.

  ``weight * sum_frames weights * both_available * (log 2 - H(gates))`` with
  ``H(g) = -sum_m g_m log g_m``: zero for weights of 1/2 each, ``weight * log 2`` per frame for
  a gate that gives one modality everything. Frames with one modality seen have a fixed gate
  (1, 0) and add nothing. Normalised by the step with the fused loss, like the unimodal heads.

  Args:
    gates: float32 [..., 2] (visual, audio) softmax modality weights.
    available: bool [..., 2], whether (visual, audio) was seen.
    weights: float32 [...] per-frame weight (mask times class weight).
    weight: the penalty's weight.
  """
  g = gates.astype(jnp.float32)
  # 0 log 0 = 0; the where keeps log's gradient finite at a gate weight of exactly 0.
  entropy = -jnp.sum(jnp.where(g > 0, g * jnp.log(jnp.where(g > 0, g, 1.0)), 0.0), axis=-1)
  both = jnp.all(available, axis=-1).astype(jnp.float32)
  return weight * jnp.sum((jnp.log(2.0) - entropy) * both * weights)


def unimodal_loss_sum(loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
                      unimodal_logits: jax.Array, labels: jax.Array, weights: jax.Array,
                      available: jax.Array, weight: float) -> jax.Array:
  """The weighted loss sum of the per-modality heads, to add to the fused head's loss sum.

  ``weight * sum_frames weights * sum_m available_m * loss(unimodal_logits_m, label)``: each
  head learns only from the frames where its modality was seen (a blanked or missing face
  teaches the visual head nothing), with the frame's mask and class weight, and the sum is
  normalised by the step with the fused loss's (so the heads add to it rather than average
  with it).

  Args:
    loss_fn: the per-frame loss (`make_loss`).
    unimodal_logits: float32 [..., 2, C] of the (visual, audio) heads.
    labels: valid class indices [...].
    weights: float32 [...] per-frame weight (mask times class weight).
    available: bool [..., 2], whether (visual, audio) was seen.
    weight: the heads' loss weight.
  """
  per_head = loss_fn(unimodal_logits, jnp.broadcast_to(labels[..., None], available.shape))
  return weight * jnp.sum(per_head * available.astype(jnp.float32) * weights[..., None])

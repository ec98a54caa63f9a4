"""Fusion of the visual and audio token grids, and the expression head.

Variants are name-keyed (``config.model.fusion.name``) so ablations are a config change:

  visual_only  face tokens only
  audio_only   audio tokens only
  concat       pooled features concatenated
  sum          pooled features mixed with fixed equal weights (their mean)
  gated        adaptive modality weights on the pooled features, no cross-attention
  mfm          the Modal Fusion Module: L bidirectional cross-attention blocks, then the
               adaptive modality weights (docs/method.md)
  mfm_sigmoid_concat
               the same blocks, but each modality gets its own sigmoid weight (the two do
               not compete for a share), and the weighted features are concatenated
               (docs/demo_experiments.md: why this form was tried)

Every variant returns ``(logits [B, classes], gates [B, 2])``; ``gates`` are the weights given
to (visual, audio) and sum to 1 (for ``mfm_sigmoid_concat`` each is in [0, 1] on its own, and
the head sees ``[2 gates[:, 0] * visual, 2 gates[:, 1] * audio]``: weights of 1/2 are
neutral). A modality that is unavailable for an example (no face crop, or blanked by modality
dropout) gets weight 0 and its tokens are zeroed. For ``gated``,
``mfm`` and ``sum`` the head sees exactly ``gates[:, 0] * visual + gates[:, 1] * audio``:
``sum`` has fixed gates (1/2 each, or 1 for the only available modality), learned ones
otherwise. ``concat`` has no mixing weights (the head sees both features side by side); its
gates are the same fixed availability split, reported so gate statistics line up across an
ablation. The single-modality variants report 1 for their modality.

**Unimodal heads** (``unimodal_loss_weight`` > 0, two-modality variants only): a LayerNorm and
a linear head on each modality's own pooled, projected tokens, taken before the cross-attention
blocks and the gates, so each sees one modality only. The train step adds their losses (over
the examples where that modality is available) with this weight; evaluation and prediction
use the fused head only.

All parts are `mfer_jax.models.layers` primitives and follow the model's precision policy:
matmul operands in the compute dtype, float32 accumulation, and a float32 residual stream,
LayerNorm, softmax and gates, as in the encoders.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from mfer_jax import sharding
from mfer_jax.constants import FUSION_VARIANTS
from mfer_jax.models import layers
from mfer_jax.models.layers import FLOAT32, Precision

LN_EPS = 1e-5
_CROSS_ATTENTION = ("mfm", "mfm_sigmoid_concat")
_LEARNED_GATES = ("gated", "mfm", "mfm_sigmoid_concat")
# Learned weights that sum to 1 over the modalities (softmax), so they have an entropy.
SOFTMAX_LEARNED_GATES = ("gated", "mfm")
_CONCATENATED = ("concat", "mfm_sigmoid_concat")


class BidirectionalBlock(nnx.Module):
  """One pre-LN fusion block: each modality attends to the other, then its own MLP.

  Both directions read the *input* streams, so neither modality sees the other's update from
  the same block: the block is symmetric in its two inputs.
  """

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout_rate: float, *,
               precision: Precision = FLOAT32, rngs: nnx.Rngs):
    kw = dict(precision=precision, rngs=rngs)
    norm = lambda: layers.LayerNorm(dim, eps=LN_EPS, param_dtype=precision.param)  # noqa: E731
    hidden = int(dim * mlp_ratio)
    self.dropout_rate = dropout_rate
    self.norm_v, self.norm_a = norm(), norm()
    self.v_from_a = layers.MultiHeadAttention(dim, num_heads, cross=True, **kw)
    self.a_from_v = layers.MultiHeadAttention(dim, num_heads, cross=True, **kw)
    self.norm_v2, self.norm_a2 = norm(), norm()
    self.ffn_v = layers.Mlp(dim, hidden, **kw)
    self.ffn_a = layers.Mlp(dim, hidden, **kw)

  def __call__(self, v: jax.Array, a: jax.Array, rngs: nnx.Rngs | None = None):
    """v: [B, Nv, D], a: [B, Na, D] -> the updated (v, a), float32."""
    drop = lambda y: layers.dropout(y, self.dropout_rate, rngs)  # noqa: E731
    nv, na = self.norm_v(v), self.norm_a(a)
    v = v + drop(self.v_from_a(nv, na))
    a = a + drop(self.a_from_v(na, nv))
    v = v + drop(self.ffn_v(self.norm_v2(v)))
    a = a + drop(self.ffn_a(self.norm_a2(a)))
    return v, a


class Fusion(nnx.Module):
  """All fusion variants; which parts exist depends on the variant name.

  Args:
    cfg: ``config.model.fusion``: name, dim, num_layers, num_heads, mlp_ratio, dropout,
      gate_hidden.
    visual_dim: channels of the visual token grid (0 if there is no visual encoder).
    audio_dim: channels of the audio token grid (0 if there is no audio encoder).
    num_classes: size of the head.
    precision: the model's `layers.Precision`.
    remat: rematerialisation of each fusion block (`layers.REMAT_POLICIES`).
  """

  def __init__(self, cfg: ConfigDict, visual_dim: int, audio_dim: int, num_classes: int, *,
               rngs: nnx.Rngs, precision: Precision = FLOAT32, remat: str = "none"):
    if cfg.name not in FUSION_VARIANTS:
      raise ValueError(f"unknown fusion {cfg.name!r}; choose one of {FUSION_VARIANTS}")
    self.name = cfg.name
    self.dropout_rate = float(cfg.dropout)
    self.remat = layers.check_remat(remat)
    kw = dict(precision=precision, rngs=rngs)
    d = cfg.dim
    norm = lambda: layers.LayerNorm(d, eps=LN_EPS, param_dtype=precision.param)  # noqa: E731
    self.proj_v = layers.Dense(visual_dim, d, ("embed", None), **kw) if visual_dim else None
    self.proj_a = layers.Dense(audio_dim, d, ("embed", None), **kw) if audio_dim else None
    self.cross_attention = self.name in _CROSS_ATTENTION
    if self.cross_attention:
      # Learned modality embeddings tell the shared-width streams apart.
      self.modality_embed = layers.param(layers.trunc_normal, (None, "embed"), rngs.params(),
                                         (2, d), precision.param)
      self.blocks = nnx.List([
          BidirectionalBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, **kw)
          for _ in range(cfg.num_layers)])
    self.norm_v = norm() if visual_dim else None
    self.norm_a = norm() if audio_dim else None
    if self.name in _LEARNED_GATES:
      self.gate_fc1 = layers.Dense(2 * d, cfg.gate_hidden, ("embed", "mlp"), **kw)
      self.gate_fc2 = layers.Dense(cfg.gate_hidden, 2, ("mlp", None), **kw)
    # The weight itself is the train step's business (step.make_loss_sum); here it only
    # decides whether the heads exist.
    unimodal_weight = float(cfg.get("unimodal_loss_weight", 0.0))
    if unimodal_weight < 0:
      raise ValueError(f"model.fusion.unimodal_loss_weight={unimodal_weight}: must be >= 0")
    self.unimodal = nnx.Dict({
        "norm_v": norm(), "norm_a": norm(),
        "head_v": layers.Dense(d, num_classes, ("embed", "classes"), **kw),
        "head_a": layers.Dense(d, num_classes, ("embed", "classes"), **kw),
    }) if unimodal_weight > 0 and visual_dim and audio_dim else None
    # Width of the fused pre-head feature (what a temporal head models).
    self.feature_dim = 2 * d if self.name in _CONCATENATED else d
    self.head = layers.Dense(self.feature_dim, num_classes, ("embed", "classes"), **kw)

  def _gates(self, pv, pa, avail):
    """Softmax over per-modality gate logits (a sigmoid per modality for
    mfm_sigmoid_concat); unavailable modalities get weight 0."""
    if self.name in _LEARNED_GATES:
      h = jax.nn.gelu(self.gate_fc1(jnp.concatenate([pv, pa], -1)), approximate=False)
      logits = self.gate_fc2(h)
      if self.name == "mfm_sigmoid_concat":
        return jax.nn.sigmoid(logits) * avail
    elif self.name in ("visual_only", "audio_only"):
      # A single-modality model trusts its one modality by construction, face or no face.
      one = jnp.asarray([1.0, 0.0] if self.name == "visual_only" else [0.0, 1.0])
      return jnp.broadcast_to(one, avail.shape)
    else:
      logits = jnp.zeros(avail.shape, jnp.float32)
    # An example with neither modality falls back to equal weights instead of NaN.
    none = ~avail.any(-1, keepdims=True)
    logits = jnp.where(avail | none, logits, -1e9)
    return jax.nn.softmax(logits, axis=-1)

  def __call__(self, v_tokens: jax.Array | None, a_tokens: jax.Array | None,
               avail: jax.Array, *, rngs: nnx.Rngs | None = None):
    """Fuses token grids and classifies: ``classify(*features(...))``.

    Returns:
      (logits float32 [B, num_classes], gates float32 [B, 2]).
    """
    fused, gates, _ = self.features(v_tokens, a_tokens, avail, rngs=rngs)
    return self.classify(fused, rngs=rngs), gates

  def classify(self, fused: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Dropout and the linear head on fused features [..., feature_dim] -> float32 logits."""
    return self.head(layers.dropout(fused, self.dropout_rate, rngs))

  def features(self, v_tokens: jax.Array | None, a_tokens: jax.Array | None,
               avail: jax.Array, *, rngs: nnx.Rngs | None = None):
    """Fuses token grids into the pre-head feature.

    Args:
      v_tokens: visual tokens [B, Nv, Cv], or None for audio_only.
      a_tokens: audio tokens [B, Na, Ca], or None for visual_only.
      avail: bool [B, 2], whether (visual, audio) is available for each example.
      rngs: dropout RNGs (training) or None (deterministic).

    Returns:
      (fused float32 [B, feature_dim], gates float32 [B, 2], unimodal logits float32
      [B, 2, num_classes] of the (visual, audio) heads, or None without unimodal heads).
    """
    v = a = None
    if v_tokens is not None:
      v = self.proj_v(v_tokens) * avail[:, 0, None, None]
    if a_tokens is not None:
      a = self.proj_a(a_tokens) * avail[:, 1, None, None]
    unimodal = None
    if self.unimodal is not None:
      u = self.unimodal
      unimodal = jnp.stack([u["head_v"](u["norm_v"](v.mean(axis=1))),
                            u["head_a"](u["norm_a"](a.mean(axis=1)))], axis=1)
    if self.cross_attention:
      emb = self.modality_embed[...].astype(jnp.float32)
      v, a = v + emb[0], a + emb[1]
      block_call = layers.remat(BidirectionalBlock.__call__, self.remat)
      for block in self.blocks:
        v = sharding.constrain(v, ("batch", None, "embed"))
        a = sharding.constrain(a, ("batch", None, "embed"))
        v, a = block_call(block, v, a, rngs)
    pv = self.norm_v(v.mean(axis=1)) if v is not None else None
    pa = self.norm_a(a.mean(axis=1)) if a is not None else None
    if pv is None:
      pv = jnp.zeros_like(pa)
    if pa is None:
      pa = jnp.zeros_like(pv)
    # Zero an unavailable modality's pooled feature too: LayerNorm's bias would leak a constant.
    pv = pv * avail[:, 0, None]
    pa = pa * avail[:, 1, None]
    gates = self._gates(pv, pa, avail)
    if self.name == "concat":
      fused = jnp.concatenate([pv, pa], axis=-1)
    elif self.name == "mfm_sigmoid_concat":
      fused = jnp.concatenate([2 * gates[:, :1] * pv, 2 * gates[:, 1:] * pa], axis=-1)
    else:
      fused = gates[:, :1] * pv + gates[:, 1:] * pa
    return fused, gates, unimodal

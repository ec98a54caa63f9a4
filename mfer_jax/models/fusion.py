"""Fusion of the visual and audio token grids, and the expression head.

Variants are name-keyed (``config.model.fusion.name``) so ablations are a config change:

  visual_only  face tokens only
  audio_only   audio tokens only
  concat       pooled features concatenated
  sum          pooled features added
  gated        adaptive modality weights on the pooled features, no cross-attention
  mfm          the Modal Fusion Module: L bidirectional cross-attention blocks, then the
               adaptive modality weights (DESIGN.md §1)

Every variant returns ``(logits [B, classes], gates [B, 2])``; ``gates`` are the weights given
to (visual, audio) and sum to 1. Fixed-weight variants report their fixed split, so gate
statistics are comparable across an ablation. A modality that is unavailable for an example
(no face crop, or blanked by modality dropout) gets weight 0 and its tokens are zeroed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from mfer_jax import sharding
from mfer_jax.constants import FUSION_VARIANTS
from mfer_jax.models import fusion_layers as L



class Fusion(nnx.Module):
  """All six fusion variants; which parts exist depends on the variant name.

  Args:
    cfg: ``config.model.fusion``: name, dim, num_layers, num_heads, mlp_ratio, dropout,
      gate_hidden.
    visual_dim: channels of the visual token grid (0 if there is no visual encoder).
    audio_dim: channels of the audio token grid (0 if there is no audio encoder).
    num_classes: size of the head.
  """

  def __init__(self, cfg: ConfigDict, visual_dim: int, audio_dim: int, num_classes: int, *,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    if cfg.name not in FUSION_VARIANTS:
      raise ValueError(f"unknown fusion {cfg.name!r}; choose one of {FUSION_VARIANTS}")
    self.name = cfg.name
    self.dropout_rate = float(cfg.dropout)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    d = cfg.dim
    self.proj_v = L.dense(visual_dim, d, ("embed", None), **kw) if visual_dim else None
    self.proj_a = L.dense(audio_dim, d, ("embed", None), **kw) if audio_dim else None
    if self.name == "mfm":
      # Learned modality embeddings tell the shared-width streams apart.
      init = nnx.with_partitioning(nnx.initializers.truncated_normal(0.02), (None, "embed"))
      self.modality_embed = nnx.Param(init(rngs.params(), (2, d), param_dtype))
      self.blocks = nnx.List([
          L.BidirectionalBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, **kw)
          for _ in range(cfg.num_layers)])
    self.norm_v = L.layer_norm(d, rngs=rngs) if visual_dim else None
    self.norm_a = L.layer_norm(d, rngs=rngs) if audio_dim else None
    self.combine = cfg.get("combine", "sum") if self.name in ("gated", "mfm") else None
    self.gate_kind = cfg.get("gate", "softmax")
    self.pool = cfg.get("pool", "mean")
    if self.pool == "attention":
      init = nnx.with_partitioning(nnx.initializers.truncated_normal(0.02), (None, "embed"))
      self.pool_query = nnx.Param(init(rngs.params(), (2, d), param_dtype))
    if self.name in ("gated", "mfm"):
      self.gate_fc1 = L.dense(2 * d, cfg.gate_hidden, ("embed", "mlp"), **kw)
      self.gate_fc2 = L.dense(cfg.gate_hidden, 2, ("mlp", None), **kw)
      bias = float(cfg.get("gate_bias", 0.0))
      if bias:
        self.gate_fc2.bias[...] = jnp.full((2,), bias, param_dtype)
    head_in = 2 * d if self.name == "concat" or self.combine == "concat" else d
    self.head = L.dense(head_in, num_classes, ("embed", "classes"), **kw)

  def _gates(self, pv, pa, avail):
    """Softmax over per-modality gate logits; unavailable modalities get weight 0."""
    if self.name in ("gated", "mfm") and self.gate_kind != "none":
      h = jax.nn.gelu(self.gate_fc1(jnp.concatenate([pv, pa], -1)), approximate=False)
      logits = self.gate_fc2(h).astype(jnp.float32)
      if self.gate_kind == "sigmoid":
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

  def _pool(self, x, modality: int):
    if self.pool == "mean":
      return x.mean(axis=1)
    q = self.pool_query[...][modality].astype(x.dtype)
    w = jax.nn.softmax(jnp.einsum("bnd,d->bn", x, q, preferred_element_type=jnp.float32)
                       * x.shape[-1] ** -0.5, axis=-1).astype(x.dtype)
    return jnp.einsum("bn,bnd->bd", w, x)

  def __call__(self, v_tokens: jax.Array | None, a_tokens: jax.Array | None,
               avail: jax.Array, *, rngs: nnx.Rngs | None = None):
    """Fuses token grids.

    Args:
      v_tokens: visual tokens [B, Nv, Cv], or None for audio_only.
      a_tokens: audio tokens [B, Na, Ca], or None for visual_only.
      avail: bool [B, 2], whether (visual, audio) is available for each example.
      rngs: dropout RNGs (training) or None (deterministic).

    Returns:
      (logits float32 [B, num_classes], gates float32 [B, 2]).
    """
    v = a = None
    if v_tokens is not None:
      v = self.proj_v(v_tokens) * avail[:, 0, None, None].astype(v_tokens.dtype)
    if a_tokens is not None:
      a = self.proj_a(a_tokens) * avail[:, 1, None, None].astype(a_tokens.dtype)
    if self.name == "mfm":
      emb = self.modality_embed[...].astype(v.dtype)
      v, a = v + emb[0], a + emb[1]
      for block in self.blocks:
        v = sharding.constrain(v, ("batch", None, "embed"))
        a = sharding.constrain(a, ("batch", None, "embed"))
        v, a = block(v, a, rngs=rngs)
    pv = self.norm_v(self._pool(v, 0)).astype(v.dtype) if v is not None else None
    pa = self.norm_a(self._pool(a, 1)).astype(a.dtype) if a is not None else None
    if pv is None:
      pv = jnp.zeros_like(pa)
    if pa is None:
      pa = jnp.zeros_like(pv)
    # Zero an unavailable modality's pooled feature too: LayerNorm's bias would leak a constant.
    pv = pv * avail[:, 0, None].astype(pv.dtype)
    pa = pa * avail[:, 1, None].astype(pa.dtype)
    gates = self._gates(pv, pa, avail)
    if self.name == "concat":
      fused = jnp.concatenate([pv, pa], axis=-1)
    elif self.combine == "concat":
      # Each modality keeps its own head weights; the gates scale them (x2: equal gates = 1).
      fused = jnp.concatenate([2 * gates[:, :1].astype(pv.dtype) * pv,
                               2 * gates[:, 1:].astype(pa.dtype) * pa], axis=-1)
    elif self.name == "sum":
      fused = pv + pa
    else:
      fused = gates[:, :1].astype(pv.dtype) * pv + gates[:, 1:].astype(pa.dtype) * pa
    fused = L.dropout(fused, self.dropout_rate, rngs)
    return self.head(fused).astype(jnp.float32), gates

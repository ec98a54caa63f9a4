"""Layer-wise learning-rate decay (``train.layer_decay``), the ViT fine-tuning recipe.

BEiT / MAE / DINOv2 fine-tuning: an encoder of depth L has L + 1 "layers": its embeddings
(patch embedding, class and register tokens, position embeddings) are layer 0, block i is
layer i + 1, and what comes after the last block (its final norm) is layer L + 1. A param of
layer l gets the learning rate ``lr * decay ** (L + 1 - l)``, so the last layers move most and
the embeddings least. Each encoder is counted on its own; the fusion and the classifier are
above both and keep ``lr``. Swin's blocks are numbered across its stages (stage s, block j ->
sum of earlier stages' depths + j), its patch merging belongs to the first block of its
stage. The decay multiplies the optimizer's whole update, so decoupled weight decay scales
with the learning rate, as in those recipes (PyTorch AdamW per param group).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

ENCODERS = ("image_encoder", "audio_encoder")
_EMBEDDINGS = ("patch_embed", "cls_token", "reg_token", "pos_embed")


def _path(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def _structure(paths: list[list[str]]) -> dict[str, dict]:
  """Per encoder: 'vit' depth, or Swin stage depths, from the param paths themselves."""
  out: dict[str, dict] = {}
  for p in paths:
    if len(p) < 3 or p[0] not in ENCODERS:
      continue
    info = out.setdefault(p[0], {"blocks": -1, "stages": {}})
    if p[1] == "blocks" and p[2].isdigit():
      info["blocks"] = max(info["blocks"], int(p[2]))
    elif p[1] == "layers" and p[2].isdigit() and len(p) > 4 and p[3] == "blocks":
      stages = info["stages"]
      stages[int(p[2])] = max(stages.get(int(p[2]), -1), int(p[4]))
  return out


def layer_id(path: list[str], structure: dict[str, dict]) -> tuple[int, int] | None:
  """(layer id, number of layers L + 1) of a param path, or None outside the encoders."""
  if not path or path[0] not in ENCODERS or path[0] not in structure:
    return None
  info = structure[path[0]]
  stages = [info["stages"][s] + 1 for s in sorted(info["stages"])]
  depth = info["blocks"] + 1 if info["blocks"] >= 0 else sum(stages)
  top = depth + 1
  rest = path[1:]
  if rest[0] in _EMBEDDINGS:
    return 0, top
  if rest[0] == "blocks" and rest[1].isdigit():
    return int(rest[1]) + 1, top
  if rest[0] == "layers" and rest[1].isdigit():
    s = int(rest[1])
    before = sum(stages[:s])
    if len(rest) > 3 and rest[2] == "blocks":
      return before + int(rest[3]) + 1, top
    return before + 1, top   # patch merging: with the stage's first block
  return top, top   # final norms (and anything else after the blocks)


def scales(params: Any, decay: float) -> Any:
  """The learning-rate multiplier of every param leaf (a tree like ``params``)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  structure = _structure([_path(p) for p, _ in leaves])

  def one(path, _):
    found = layer_id(_path(path), structure)
    return 1.0 if found is None else float(decay) ** (found[1] - found[0])

  return jax.tree_util.tree_map_with_path(one, params)


def scale_by_layer(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its layer's ``decay ** (L + 1 - layer)`` (see module doc)."""

  def update(updates, state, params=None):
    del params
    factors = scales(updates, decay)
    return jax.tree.map(lambda u, f: u * f, updates, factors), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def describe(params: Any, decay: float) -> dict[str, float]:
  """'/'-joined path -> multiplier, for logging and tests."""
  leaves = jax.tree_util.tree_flatten_with_path(scales(params, decay))[0]
  return {"/".join(re.sub(r"^\.", "", s) for s in _path(p)): v for p, v in leaves}

"""Pretrained ViT weights: timm checkpoints (DINOv2, MAE, CLIP, ViT) -> `VisionTransformer`.

Reads timm-format state dicts (the ``.safetensors`` timm's hub files hold, or ``.pth`` /
``.bin`` through ``torch.load(weights_only=True)``) and our own converted files, with no
network and no unpickling of code. The mapping follows timm's ``checkpoint_filter_fn``:

* Linear weights are transposed to [in, out]; the patch conv goes OIHW -> HWIO; LayerNorm
  ``weight`` is our ``scale``; LayerScale ``gamma`` and the tokens keep their names.
* The classifier or projection head (``head.*``), an identity ``fc_norm`` and DINOv2's
  ``mask_token`` are dropped: the encoder ends at the final LayerNorm.
* Position embeddings for another input size are resampled to the model's patch grid as
  timm's ``resample_abs_pos_embed`` does (bicubic with antialiasing, the prefix tokens'
  embeddings kept), with the source grid taken as square, timm's fallback rule.

OpenAI-CLIP and original-DINOv2 layouts are converted by timm itself
(``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` then
``safetensors.torch.save_file(model.state_dict(), ...)``); this module reads timm's layout.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
from flax import nnx

from mfer_jax.models import import_common
from mfer_jax.models import swin_import
from mfer_jax.models import vit

CheckpointError = import_common.CheckpointError
Params = import_common.Params

_DROPPED = ("head.", "fc_norm.", "mask_token", "head_drop.")


@functools.lru_cache(maxsize=8)
def expected_shapes(cfg: vit.ViTConfig) -> dict[str, tuple[int, ...]]:
  """Our flat param paths and shapes for ``cfg``, without allocating the model."""
  model = nnx.eval_shape(lambda: vit.VisionTransformer(cfg, rngs=nnx.Rngs(0)))
  return {"/".join(map(str, p)): tuple(v.shape)
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def timm_key(path: str) -> str:
  """timm state-dict key of one of our param paths."""
  parts = path.split("/")
  if parts[0] == "patch_embed":
    parts = ["patch_embed", "proj", parts[1]]
  parts[-1] = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
  return ".".join(parts)


# ----------------------------------------------------------------------------- pos-embed resize


def _cubic_aa(x: np.ndarray) -> np.ndarray:
  """torch's antialiased bicubic filter (Keys, a = -0.5, as PIL)."""
  a = -0.5
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _aa_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] interpolation matrix of ``F.interpolate(bicubic, antialias=True)`` on one axis.

  torch's ``_compute_indices_min_size_weights_aa``: the filter support widens by the
  downscale factor, taps outside the input are dropped and the rest renormalised.
  """
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)   # int() truncates toward zero, as static_cast
    hi = min(int(center + support + 0.5), in_size)
    taps = _cubic_aa((np.arange(lo, hi) - center + 0.5) * invscale)
    total = taps.sum()
    w[i, lo:hi] = taps / total if total != 0 else taps
  return w


def resample_pos_embed(posemb: np.ndarray, new_grid: tuple[int, int],
                       num_prefix_tokens: int, old_grid: tuple[int, int] | None = None
                       ) -> np.ndarray:
  """timm's ``resample_abs_pos_embed``: [1, prefix + h*w, C] -> [1, prefix + H*W, C].

  The prefix tokens' embeddings (class / registers, when they have one) are kept; the patch
  embeddings are resized with torch's antialiased bicubic interpolation
  (``align_corners=False``), computed here as two separable interpolation matrices.

  Raises:
    CheckpointError: if the patch embeddings do not form a square grid and no ``old_grid``
      is given.
  """
  posemb = np.asarray(posemb, np.float32)
  prefix, patches = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
  n = patches.shape[1]
  if old_grid is None:
    side = math.isqrt(n)
    if side * side != n:
      raise CheckpointError(f"position embedding of {n} patch tokens is not a square grid")
    old_grid = (side, side)
  if tuple(old_grid) == tuple(new_grid):
    return posemb
  grid = patches.reshape(old_grid[0], old_grid[1], -1).astype(np.float64)
  wy = _aa_weights(old_grid[0], new_grid[0])
  wx = _aa_weights(old_grid[1], new_grid[1])
  out = np.einsum("oh,hwc,pw->opc", wy, grid, wx).astype(np.float32)
  return np.concatenate([prefix, out.reshape(1, -1, posemb.shape[-1])], axis=1)


# ----------------------------------------------------------------------------- describe


def describe_source(sd: Params) -> str:
  """What a checkpoint looks like, for error messages (family, then the matching variant)."""
  family = import_common.identify_family(sd)
  if family and family != "vit":
    return f"the checkpoint is a {family} checkpoint (convert it with --family={family})"
  keys = [k.replace("/", ".") for k in sd]
  depth = 1 + max((int(m[1]) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))),
                  default=-1)
  patch = sd.get("patch_embed.proj.weight", sd.get("patch_embed/kernel"))
  cls = sd.get("cls_token", None)
  if patch is None or cls is None or depth == 0:
    return "the checkpoint is not a timm Vision Transformer"
  embed = cls.shape[-1]
  p = patch.shape[-1] if patch.shape[0] == embed else patch.shape[0]
  reg = sd["reg_token"].shape[1] if "reg_token" in sd else 0
  scaled = any(".ls1." in k for k in keys)
  pre = any(k.startswith("norm_pre.") for k in keys)
  for name, (timm_name, _) in vit.VARIANTS.items():
    c = vit.vit_config(name)   # 224 px: every variant's patch divides it
    if (c.embed_dim, c.depth, c.patch_size, c.reg_tokens, bool(c.layer_scale), c.pre_norm) == (
        embed, depth, p, reg, scaled, pre):
      return f"the checkpoint looks like {name} ({timm_name})"
  return (f"the checkpoint has embed_dim {embed}, depth {depth}, patch {p}, {reg} registers"
          f"{', LayerScale' if scaled else ''}{', pre-norm' if pre else ''}")


# ----------------------------------------------------------------------------- public API


def load_vit_params(path: str, cfg: vit.ViTConfig) -> Params:
  """Reads a timm or mfer-jax ViT checkpoint as params for ``cfg``.

  Args:
    path: ``.safetensors``, ``.pth`` or ``.bin``.
    cfg: the model to load into; its input size may differ from the checkpoint's (the
      position embeddings are resampled).

  Returns:
    Flat '/'-joined param paths -> float32 arrays, exactly the shapes of ``cfg``'s params.

  Raises:
    CheckpointError: unreadable file, or keys that do not fit ``cfg`` (the message names the
      expected variant, lists missing, unexpected and mis-shaped keys, and says what the
      checkpoint looks like).
  """
  raw = {k.removeprefix("module."): v for k, v in import_common.read_state_dict(path).items()}
  ours = any("/" in k for k in raw)
  want = expected_shapes(cfg)
  if ours:
    source = dict(raw)
    name = {p: p for p in want}
  else:
    source = {k: v for k, v in raw.items() if not k.startswith(_DROPPED)}
    name = {p: timm_key(p) for p in want}
  params, missing, bad = {}, [], []
  for p, shape in want.items():
    if name[p] not in source:
      missing.append(name[p])
      continue
    value = source[name[p]] if ours else swin_import.timm_value_to_ours(p, source[name[p]])
    if p == "pos_embed" and value.shape != shape and value.ndim == 3 and (
        value.shape[-1] == shape[-1]):
      try:
        value = resample_pos_embed(value, cfg.grid_size, cfg.pos_embed_prefix)
      except CheckpointError:
        pass   # reported as mis-shaped below
    if value.shape != shape:
      bad.append(f"{name[p]} {tuple(source[name[p]].shape)} (model wants {shape})")
    params[p] = np.asarray(value, np.float32)
  unexpected = sorted(set(source) - set(name.values()))
  if missing or unexpected or bad:
    head = (f"{path} does not fit the ViT {cfg.describe()} (embed_dim {cfg.embed_dim}, depth "
            f"{cfg.depth}, patch {cfg.patch_size}, {cfg.reg_tokens} registers); "
            f"{describe_source(source)}.")
    raise CheckpointError(import_common.mismatch_message(head, missing, unexpected, bad))
  return params


def save_params(path: str, params: Params, cfg: vit.ViTConfig) -> None:
  """Writes converted params (flat '/' keys) with the architecture as metadata, atomically."""
  import_common.save_params(path, params, {
      "format": "mfer_jax.vit", "variant": cfg.variant, "timm_name": cfg.timm_name,
      "img_size": ",".join(map(str, cfg.img_size)), "in_chans": str(cfg.in_chans),
      "embed_dim": str(cfg.embed_dim), "depth": str(cfg.depth)})

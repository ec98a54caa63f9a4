"""Pretrained Swin weights: timm and Microsoft checkpoints -> `SwinTransformer` params.

Reads, with no network and without unpickling code:
  * ``.safetensors`` (timm's hub format, and our own converted files) via safetensors.numpy;
  * ``.pth`` / ``.bin`` state dicts, timm or the original Microsoft release (``{'model': ...}``)
    via ``torch.load(weights_only=True)``.

Mapping, following timm's ``checkpoint_filter_fn``:
  * Microsoft checkpoints put patch merging at the end of stage N (``layers.N.downsample``);
    timm 1.x and we put it at the start of stage N+1.
  * The ``relative_position_index`` and ``attn_mask`` buffers and the classifier head
    (``head.*``) are dropped: we rebuild the former and have our own head.
  * Linear weights are transposed to [in, out]; the patch conv goes OIHW -> HWIO.
  * A relative-position table for another window size is resized with timm's own method
    (``resize_rel_pos_bias_table``: geometric-progression source grid, bilinear per head).
  * A 3-channel patch embedding loaded into a 1-channel model (spectrograms) is folded into
    one channel together with the input normalisation (`normalisation.fold_rgb_patch_embed`),
    so the 1-channel model computes exactly what the 3-channel one computes on the grey
    image repeated three times.

Our converted files (see `save_params` and ``python -m mfer_jax.tools.convert``) hold flat
'/'-joined param paths and load through the same function, with the same adaptations.
"""

from __future__ import annotations

import math
import os
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfer_jax import errors, files
from mfer_jax.models import normalisation
from mfer_jax.models import swin

Params = dict[str, np.ndarray]

_BUFFERS = ("relative_position_index", "attn_mask")
_SHOWN = 4  # keys listed per problem kind in error messages


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint that cannot be read, or does not fit the requested model."""


# ----------------------------------------------------------------------------- reading


def read_state_dict(path: str) -> Params:
  """Reads every float tensor of a checkpoint as numpy (float32 for torch files).

  Raises:
    CheckpointError: unreadable or truncated file, pickled code, or torch missing for .pth.
  """
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint file")
  try:
    if path.endswith(".safetensors"):
      return _read_safetensors(path)
    return _read_torch(path)
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"{path}: cannot read checkpoint ({type(e).__name__}: {e}). The file is truncated or "
        "corrupt; re-download or re-export it (e.g. `python -m mfer_jax.tools.convert`).") from e


def _read_safetensors(path: str) -> Params:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(path)


def _read_torch(path: str) -> Params:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(
        f"{path}: reading .pth/.bin needs torch, which is not installed. Convert the "
        "checkpoint to .safetensors where torch is available (safetensors.torch.save_file), "
        "or install the test extra.") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
      raise CheckpointError(
          f"{path}: holds pickled objects other than tensors, which are not loaded (no code "
          "from checkpoints is run). Re-export it with torch.save(model.state_dict()) or as "
          ".safetensors.") from e
    raise
  for key in ("model", "state_dict"):  # Microsoft release and training-script wrappers
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()
          if torch.is_tensor(v) and v.is_floating_point()}


# ----------------------------------------------------------------------------- key mapping


def expected_shapes(cfg: swin.SwinConfig) -> dict[str, tuple[int, ...]]:
  """Our flat param paths and shapes for ``cfg``, without allocating the model."""
  model = nnx.eval_shape(lambda: swin.SwinTransformer(cfg, rngs=nnx.Rngs(0)))
  return {_path(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _path(parts) -> str:
  return "/".join(str(p) for p in parts)


def timm_key(path: str) -> str:
  """timm 1.x state-dict key of one of our param paths."""
  parts = path.split("/")
  if parts[0] == "patch_embed" and parts[1] in ("kernel", "bias"):
    parts = ["patch_embed", "proj", parts[1]]
  parts[-1] = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
  return ".".join(parts)


def timm_value_to_ours(path: str, value: np.ndarray) -> np.ndarray:
  """A timm tensor in our layout: conv OIHW -> HWIO, Linear [out, in] -> [in, out] (the same
  for every timm vision model we import: Swin and ViT)."""
  if path == "patch_embed/kernel":
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if path.endswith("/kernel"):
    return value.T  # torch Linear [out, in] -> [in, out]
  return value


def _timm_layout(sd: Params) -> Params:
  """Drops buffers and head, and moves Microsoft-style downsample keys to timm 1.x places."""
  # DataParallel / DDP wrappers prefix every key; strip it before telling the layouts apart.
  sd = {k.removeprefix("module."): v for k, v in sd.items()}
  microsoft = "layers.0.downsample.reduction.weight" in sd
  out = {}
  for k, v in sd.items():
    if any(b in k for b in _BUFFERS) or k.startswith("head."):
      continue
    if microsoft:
      k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", k)
    out[k] = v
  return out


def _describe_source(sd: Params, ours: bool) -> str:
  """Guesses the variant of a checkpoint from its keys, for error messages."""
  sep = "/" if ours else "."
  depth: dict[int, int] = {}
  for k in sd:
    m = re.match(rf"layers\{sep}(\d+)\{sep}blocks\{sep}(\d+)\{sep}", k)
    if m:
      depth[int(m[1])] = max(depth.get(int(m[1]), 0), int(m[2]) + 1)
  kernel = sd.get("patch_embed/kernel" if ours else "patch_embed.proj.weight")
  if kernel is None or not depth:
    return "the checkpoint is not a Swin Transformer"
  embed = kernel.shape[-1] if ours else kernel.shape[0]
  depths = tuple(depth[i] for i in sorted(depth))
  for name, (e, d, _) in swin.VARIANTS.items():
    if (e, d) == (embed, depths):
      return f"the checkpoint looks like swin_{name}"
  return f"the checkpoint has embed_dim {embed}, depths {depths}"


# ----------------------------------------------------------------------------- adaptation


def resize_rel_pos_table(table: np.ndarray, window: tuple[int, int]) -> np.ndarray:
  """Resizes a [(2h-1)(2w-1), heads] bias table to ``window``, as timm does on load.

  The source table is assumed square unless its size says otherwise (timm's rule). Source
  offsets are placed on a geometric progression that stretches them to the new extent, and
  every head is interpolated bilinearly at the integer target offsets (BEiT's method, timm's
  ``resize_rel_pos_bias_table`` without scipy). Computed in float32 like timm.
  """
  dst = (2 * window[0] - 1, 2 * window[1] - 1)
  n, heads = table.shape
  s = math.isqrt(n)
  if s * s == n:
    src = (s, s)
  elif n == dst[0] * dst[1]:
    src = dst
  else:
    raise CheckpointError(f"relative position table of {n} entries is not square")
  if src == dst:
    return table
  ys = np.asarray(_progression(src[0], dst[0]), np.float32)
  xs = np.asarray(_progression(src[1], dst[1]), np.float32)
  ty, tx = dst[0] // 2, dst[1] // 2
  dy = np.arange(-ty, ty + 1, dtype=np.float32)
  dx = np.arange(-tx, tx + 1, dtype=np.float32)
  gy, gx = np.meshgrid(dy, dx, indexing="ij")
  (yl, yr, dyl, dyr), (xl, xr, dxl, dxr) = _bracket(ys, gy), _bracket(xs, gx)
  out = np.empty((dst[0] * dst[1], heads), np.float32)
  for h in range(heads):
    z = table[:, h].reshape(src).astype(np.float32)
    # Same terms, order and float32 arithmetic as timm's RegularGridInterpolator.
    num = (z[yl, xl] * (dyr * dxr) + z[yl, xr] * (dyr * dxl)
           + z[yr, xl] * (dyl * dxr) + z[yr, xr] * (dyl * dxl))
    out[:, h] = (num / ((dyl + dyr) * (dxl + dxr))).reshape(-1)
  return out


def _progression(src: int, dst: int) -> list[float]:
  """Source offsets spaced by a ratio q found by bisection (timm's ``_calc``, in float64)."""
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if (1.0 - q**(src // 2)) / (1.0 - q) > dst // 2:
      right = q
    else:
      left = q
  dis, cur = [], 1.0
  for i in range(src // 2):
    dis.append(cur)
    cur += q**(i + 1)
  return [-d for d in reversed(dis)] + [0.0] + dis


def _bracket(points: np.ndarray, x: np.ndarray):
  """Left/right neighbour indices of x in sorted points and the distances to them."""
  right = np.minimum(np.searchsorted(points, x, side="left"), len(points) - 1)
  left = np.clip(right - 1, 0, len(points) - 1)
  dl = np.maximum(x - points[left], 0).astype(np.float32)
  dr = np.maximum(points[right] - x, 0).astype(np.float32)
  both = (dl == 0) & (dr == 0)
  dl[both] = dr[both] = 1.0
  return left, right, dl, dr


def _adapt(path: str, value: np.ndarray, want: tuple[int, ...],
           windows: dict[int, tuple[int, int]]) -> np.ndarray:
  """Resizes relative-position bias tables to the target windows where needed."""
  if path.endswith("relative_position_bias_table"):
    window = windows[int(path.split("/")[1])]
    if value.shape != want or window[0] != window[1]:
      value = resize_rel_pos_table(value, window)
  return value


def _fold_to_grey(params: Params, want: Mapping[str, tuple[int, ...]]) -> None:
  """Folds an RGB patch embedding into a 1-channel model's kernel and bias, in place."""
  kernel, bias = params.get("patch_embed/kernel"), params.get("patch_embed/bias")
  if (kernel is None or bias is None or kernel.ndim != 4 or kernel.shape[2] != 3
      or want["patch_embed/kernel"][2] != 1):
    return
  params["patch_embed/kernel"], params["patch_embed/bias"] = (
      normalisation.fold_rgb_patch_embed(kernel, bias))


# ----------------------------------------------------------------------------- public API


def load_swin_params(path: str, cfg: swin.SwinConfig) -> Params:
  """Reads a timm, Microsoft or mfer-jax checkpoint as params for ``cfg``.

  Args:
    path: ``.safetensors``, ``.pth`` or ``.bin``.
    cfg: the model to load into; window size, resolution and in_chans may differ from the
      checkpoint's (see the module docstring).

  Returns:
    Flat '/'-joined param paths -> float32 arrays, exactly the shapes of ``cfg``'s params.

  Raises:
    CheckpointError: unreadable file, or keys that do not fit ``cfg`` (the message lists
      missing, unexpected and mis-shaped keys and what the checkpoint looks like).
  """
  raw = read_state_dict(path)
  ours = any("/" in k for k in raw)
  want = expected_shapes(cfg)
  if ours:
    source = dict(raw)
    name = {p: p for p in want}
  else:
    source = _timm_layout(raw)
    name = {p: timm_key(p) for p in want}
  windows = {i: w for i, (w, _) in enumerate(cfg.stage_windows())}
  params, missing, bad = {}, [], []
  for p, shape in want.items():
    if name[p] not in source:
      missing.append(name[p])
      continue
    value = source[name[p]] if ours else timm_value_to_ours(p, source[name[p]])
    params[p] = _adapt(p, value, shape, windows)
  _fold_to_grey(params, want)
  for p, value in params.items():
    if value.shape != want[p]:
      bad.append(f"{name[p]} {tuple(source[name[p]].shape)} (model wants {want[p]})")
    params[p] = np.asarray(value, np.float32)
  unexpected = sorted(set(source) - set(name.values()))
  if missing or unexpected or bad:
    raise CheckpointError(_mismatch_message(path, cfg, source, ours, missing, unexpected, bad))
  return params


def _mismatch_message(path, cfg, source, ours, missing, unexpected, bad) -> str:
  variant = f"swin_{cfg.variant}" if cfg.variant else "the configured Swin"
  lines = [f"{path} does not fit {variant} (embed_dim {cfg.embed_dim}, depths {cfg.depths}, "
           f"img_size {cfg.img_size}, in_chans {cfg.in_chans}); "
           f"{_describe_source(source, ours)}."]
  for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)):
    if keys:
      more = f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
      lines.append(f"  {len(keys)} {what} keys: {', '.join(keys[:_SHOWN])}{more}")
  return "\n".join(lines)


def apply_to_model(model: swin.SwinTransformer, params: Mapping[str, np.ndarray]) -> None:
  """Writes params into ``model`` in place, keeping each param's dtype and sharding.

  ``model`` may be abstract (``nnx.eval_shape``): loading then skips the random init, whose
  compilation costs seconds on CPU.
  """
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  paths = {_path(k): k for k in flat}
  if set(paths) != set(params):
    raise CheckpointError(f"params do not fit the model: missing "
                          f"{sorted(set(paths) - set(params))[:_SHOWN]}, unexpected "
                          f"{sorted(set(params) - set(paths))[:_SHOWN]}")
  for p, k in paths.items():
    old = flat[k].get_value()  # an array, or a ShapeDtypeStruct in an abstract model
    if tuple(params[p].shape) != tuple(old.shape):
      raise CheckpointError(f"{p}: shape {tuple(params[p].shape)}, model wants {old.shape}")
    new = np.asarray(params[p]).astype(old.dtype)
    sharding = getattr(old, "sharding", None)
    flat[k].set_value(jax.device_put(new, sharding) if sharding is not None
                      else jnp.asarray(new))
  nnx.update(model, state)


def import_pretrained(model: swin.SwinTransformer, path: str) -> None:
  """Loads a checkpoint file into ``model`` (`load_swin_params` + `apply_to_model`)."""
  apply_to_model(model, load_swin_params(path, model.cfg))


def save_params(path: str, params: Mapping[str, np.ndarray], cfg: swin.SwinConfig) -> None:
  """Writes params as .safetensors with flat '/' keys and the config as metadata.

  The file is written atomically (temporary name, then rename), its folder created if needed.
  """
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  meta = {"format": "mfer_jax.swin", "variant": cfg.variant,
          "img_size": ",".join(map(str, cfg.img_size)), "window_size": str(cfg.window_size),
          "in_chans": str(cfg.in_chans)}
  files.atomic_write_bytes(
      path, save({k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}, meta))

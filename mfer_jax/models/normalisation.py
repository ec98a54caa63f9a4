"""Encoder input normalisation, and the exact fold of a 3-channel patch kernel into 1 channel.

Faces are RGB in [0, 1], normalised per channel with the ImageNet statistics the pretrained
Swin weights were trained with. Spectrograms are grey images in [0, 1] (docs/method.md):

- ``in_chans=3`` repeats the grey map into three channels, as the authors did, and normalises
  it like a face; pretrained weights apply unchanged.
- ``in_chans=1`` feeds the grey map once, normalised with one mean and std (`GREY_MEAN`,
  `GREY_STD`, the averages of the ImageNet statistics, so a model trained from scratch sees
  inputs on the same scale as the faces). A 3-channel checkpoint is loaded into such a
  model by `fold_rgb_patch_embed`, which makes the 1-channel model compute exactly what the
  3-channel model computes on the grey image repeated three times.

Why the fold is exact: the patch embedding is linear and sees each pixel once (stride = kernel
size, no padding). With grey input x, our input is y = (x - m0) / s0, and the 3-channel model
sees z_c = (x - m_c) / s_c = (s0 y + m0 - m_c) / s_c. So

    sum_c K_c * z_c + b = (sum_c K_c s0 / s_c) * y + (b + sum_{c,h,w} K_c[h, w] (m0 - m_c) / s_c)

which is a 1-channel kernel and a new bias, computed once at import.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = sum(IMAGENET_MEAN) / 3
GREY_STD = sum(IMAGENET_STD) / 3


def input_stats(channels: int, rgb_stats=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel of an encoder input in [0, 1] with ``channels`` channels.

  Args:
    channels: 3 (RGB, or a grey map repeated) or 1 (a grey map fed once).
    rgb_stats: the RGB (mean, std) an encoder family was pretrained with; None: ImageNet's.
      One channel gets their averages, as `GREY_MEAN` / `GREY_STD` are ImageNet's.
  """
  mean, std = (IMAGENET_MEAN, IMAGENET_STD) if rgb_stats is None else rgb_stats
  if channels == 3:
    return tuple(mean), tuple(std)
  if channels == 1:
    return (sum(mean) / len(mean),), (sum(std) / len(std),)
  raise ValueError(f"encoder inputs have 1 or 3 channels, not {channels}")


def fold_rgb_patch_embed(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """An ImageNet-normalised RGB patch embedding as an exact embedding of our 1-channel input.

  Args:
    kernel: float [p, p, 3, D] (HWIO), trained on RGB normalised with the ImageNet statistics.
    bias: float [D].

  Returns:
    (kernel float32 [p, p, 1, D], bias float32 [D]) for a grey input normalised with
    (`GREY_MEAN`, `GREY_STD`), computed in float64.
  """
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 4 or kernel.shape[2] != 3:
    raise ValueError(f"expected an RGB patch kernel [p, p, 3, D], got {kernel.shape}")
  mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
  grey = (kernel * (GREY_STD / std)[None, None, :, None]).sum(axis=2, keepdims=True)
  shift = np.einsum("hwcd,c->d", kernel, (GREY_MEAN - mean) / std)
  return grey.astype(np.float32), (np.asarray(bias, np.float64) + shift).astype(np.float32)

"""Host-side training augmentations on uint8 arrays: face crop/flip/colour, SpecAugment masks.

Everything stays uint8 and at the decoded size: float conversion, resizing to the model's input
and normalisation happen on device, so the host only does cheap OpenCV calls. Randomness comes
from the ``np.random.Generator`` passed in, which the pipeline seeds per example from
(seed, epoch, position in epoch), so an example is augmented the same way whatever the number
of hosts, workers or threads.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import ml_collections
import numpy as np


def random_resized_crop(img: np.ndarray, rng: np.random.Generator,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
  """Crops a random area fraction in ``scale`` with aspect ratio in ``ratio``, resized back.

  The torchvision recipe: up to 10 tries at a box that fits, else the largest centre crop
  with the aspect ratio clamped into ``ratio``.
  """
  h, w = img.shape[:2]
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      break
  else:
    in_ratio = w / h
    if in_ratio < ratio[0]:
      cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
      cw, ch = int(round(h * ratio[1])), h
    else:
      cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
  # cv2 reads the crop as a strided view: no copy before the resize.
  return cv2.resize(img[top:top + ch, left:left + cw], (w, h), interpolation=cv2.INTER_LINEAR)


def color_jitter(img: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float) -> np.ndarray:
  """Random brightness, contrast and saturation factors in [max(0, 1 - a), 1 + a].

  Brightness and contrast are folded into one saturating affine map (one pass, one clip);
  saturation then blends with the grey image. The order is fixed rather than permuted as in
  torchvision: the effect on training is the same and it saves work.
  """
  b = rng.uniform(max(0.0, 1 - brightness), 1 + brightness) if brightness else 1.0
  c = rng.uniform(max(0.0, 1 - contrast), 1 + contrast) if contrast else 1.0
  s = rng.uniform(max(0.0, 1 - saturation), 1 + saturation) if saturation else 1.0
  if b != 1.0 or c != 1.0:
    # contrast(brightness(x)) = c*b*x + (1-c)*mean(b*x); addWeighted saturates to [0, 255].
    mean = cv2.mean(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))[0] if c != 1.0 else 0.0
    img = cv2.addWeighted(img, b * c, img, 0.0, (1 - c) * b * mean)
  if s != 1.0:
    grey = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    img = cv2.addWeighted(img, s, grey, 1 - s, 0.0)
  return img


def spec_masks(mel: np.ndarray, rng: np.random.Generator, *, time_masks: int, time_width: int,
               freq_masks: int, freq_width: int) -> np.ndarray:
  """SpecAugment: zeroes (= silence, -top_db dB) random time and mel bands of [n_mels, T].

  Each mask's width is uniform in [0, max width] and its start uniform over the positions
  where it fits. Returns a new array; the input (often a read-only record view) is untouched.
  """
  mel = np.array(mel, dtype=np.uint8, copy=True)
  n_mels, t = mel.shape
  for count, max_width, size, axis in ((time_masks, time_width, t, 1),
                                       (freq_masks, freq_width, n_mels, 0)):
    if count <= 0 or max_width <= 0:
      continue
    widths = rng.integers(0, min(max_width, size) + 1, size=count)
    starts = (rng.random(count) * (size - widths + 1)).astype(np.int64)
    for start, width in zip(starts, widths):
      if axis == 1:
        mel[:, start:start + width] = 0
      else:
        mel[start:start + width, :] = 0
  return mel


@dataclasses.dataclass(frozen=True)
class Augmenter:
  """The ``config.data.augment`` recipe, applied to one decoded example."""

  enabled: bool = True
  random_resized_crop: bool = True
  crop_scale: tuple[float, float] = (0.8, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: float = 0.5
  brightness: float = 0.2
  contrast: float = 0.2
  saturation: float = 0.2
  spec_time_masks: int = 2
  spec_time_width: int = 10
  spec_freq_masks: int = 2
  spec_freq_width: int = 8

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "Augmenter":
    kwargs = {f.name: cfg[f.name] for f in dataclasses.fields(cls)}
    kwargs["crop_scale"] = tuple(kwargs["crop_scale"])
    kwargs["crop_ratio"] = tuple(kwargs["crop_ratio"])
    return cls(**kwargs)

  def __call__(self, face: np.ndarray, has_face: bool, mel: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Returns augmented (face, mel). A missing face (all zeros) is left as it is."""
    if not self.enabled:
      return face, mel
    return self.face(face, has_face, rng), self.mel(mel, rng)

  def face(self, face: np.ndarray, has_face: bool, rng: np.random.Generator) -> np.ndarray:
    """The face part: random resized crop, flip, colour jitter (nothing without a face).

    The draws depend only on ``rng`` and the face size, so the frames of a clip given
    generators in the same state get the same crop, flip and colours.
    """
    if not self.enabled or not has_face:
      return face
    if self.random_resized_crop:
      face = random_resized_crop(face, rng, self.crop_scale, self.crop_ratio)
    if self.hflip and rng.random() < self.hflip:
      face = cv2.flip(face, 1)
    if self.brightness or self.contrast or self.saturation:
      face = color_jitter(face, rng, self.brightness, self.contrast, self.saturation)
    return face

  def mel(self, mel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The audio part: SpecAugment time and frequency masks."""
    if not self.enabled:
      return mel
    return spec_masks(mel, rng, time_masks=self.spec_time_masks, time_width=self.spec_time_width,
                      freq_masks=self.spec_freq_masks, freq_width=self.spec_freq_width)

"""Imports torch and timm as parity references (tests and bench only, never the library).

PyPI's torchvision wheel does not match the CPU torch 2.13 build and fails at import with
"operator torchvision::nms does not exist"; timm imports torchvision. Declaring the two op
schemas it looks up first lets the import succeed. Nothing here calls them.
"""

import torch


def _declare_torchvision_ops():
  """Returns the Library holding the declarations (it must stay alive), or None."""
  try:
    torch.ops.torchvision.nms  # pylint: disable=pointless-statement
    return None  # a working torchvision, or declared by an earlier import
  except (AttributeError, RuntimeError):
    pass
  lib = torch.library.Library("torchvision", "DEF")
  lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  return lib


_TORCHVISION_OPS = _declare_torchvision_ops()

import timm  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from timm.models import swin_transformer as timm_swin  # noqa: E402

__all__ = ["timm", "timm_swin", "torch"]

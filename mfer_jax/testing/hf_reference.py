"""Imports torch and Hugging Face ``transformers`` as parity references (tests and bench only).

``transformers`` imports torchvision when it is installed, which fails on this machine's CPU
torch build ("operator torchvision::nms does not exist"); `timm_reference` declares the two op
schemas first (DESIGN.md §6), so import through here. Never imported by the library.
"""

from mfer_jax.testing.timm_reference import torch  # noqa: F401  (declares torchvision ops)

import transformers  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

__all__ = ["torch", "transformers"]

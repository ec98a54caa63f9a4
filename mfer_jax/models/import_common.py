"""What every pretrained-weight importer shares: reading, family detection, messages, saving.

The importers (`swin_import`, `vit_import`, `wav2vec2_import`) map one checkpoint format to
one encoder. This module holds the parts that do not depend on the architecture:

* `read_state_dict`: ``.safetensors`` through safetensors.numpy, ``.pth`` / ``.bin`` through
  ``torch.load(weights_only=True)``, so no checkpoint can run code (pickled objects other
  than tensors are refused with a message).
* `identify_family`: which encoder family a state dict holds, so that a checkpoint given to
  the wrong importer is named in the error ("this is a Swin checkpoint; use --family=swin").
* `mismatch_message`: the missing / unexpected / mis-shaped key lists of an import error.
* `save_params` / `read_params_meta`: our converted files, flat '/' param paths plus the
  architecture as safetensors metadata, written atomically.
* `sha256_file`: the weights hash that feature caches record.
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping, Sequence

import numpy as np

from mfer_jax import files
from mfer_jax.models import swin_import

CheckpointError = swin_import.CheckpointError
Params = dict[str, np.ndarray]

SHOWN = 4  # keys listed per problem kind in error messages


def read_state_dict(path: str) -> Params:
  """Every float tensor of a checkpoint as numpy (see `swin_import.read_state_dict`)."""
  return swin_import.read_state_dict(path)


def identify_family(keys) -> str:
  """'swin', 'vit', 'wav2vec2', 'hubert' or '' for the checkpoint whose keys are ``keys``.

  Works on timm / Hugging Face keys ('.'-joined, optionally prefixed) and on our converted
  files ('/'-joined).
  """
  keys = [k.replace("/", ".").removeprefix("module.") for k in keys]
  joined = "\n".join(keys)

  def has(fragment: str) -> bool:
    return fragment in joined

  if has("relative_position_bias_table") or has("layers.0.blocks.0."):
    return "swin"
  if has("feature_extractor.conv_layers") or has("pos_conv_embed"):
    # HuBERT has no quantizer / project_q; wav2vec 2.0 pretraining checkpoints do, and HF
    # names the base model after its class ("hubert." / "wav2vec2." prefixes).
    if any(k.startswith("hubert.") for k in keys):
      return "hubert"
    return "wav2vec2"
  if has("blocks.0.attn.qkv") or has("cls_token"):
    return "vit"
  return ""


def mismatch_message(head: str, missing: Sequence[str], unexpected: Sequence[str],
                     bad: Sequence[str]) -> str:
  """``head`` then one line per non-empty kind: '<n> missing keys: a, b, ... (k more)'."""
  lines = [head]
  for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)):
    if keys:
      more = f", ... ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
      lines.append(f"  {len(keys)} {what} keys: {', '.join(keys[:SHOWN])}{more}")
  return "\n".join(lines)


def save_params(path: str, params: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> None:
  """Writes params as .safetensors with flat '/' keys and ``meta`` (strings), atomically."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  data = save({k: np.ascontiguousarray(v, np.float32) for k, v in params.items()},
              {k: str(v) for k, v in meta.items()})
  files.atomic_write_bytes(path, data)


def read_params_meta(path: str) -> dict[str, str]:
  """The metadata of a .safetensors file ({} for other files or none)."""
  if not str(path).endswith(".safetensors") or not os.path.isfile(path):
    return {}
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(path, framework="numpy") as f:
      return dict(f.metadata() or {})
  except Exception:  # pylint: disable=broad-except  (read errors surface on the real read)
    return {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  """Hex SHA-256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()

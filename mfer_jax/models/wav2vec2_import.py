"""Pretrained wav2vec 2.0 / HuBERT weights: Hugging Face checkpoints -> `Wav2Vec2Model`.

Reads ``transformers``-format state dicts (``model.safetensors``, or ``pytorch_model.bin`` /
``.pth`` through ``torch.load(weights_only=True)``) of a bare ``Wav2Vec2Model`` /
``HubertModel`` or of a model with a head (``Wav2Vec2ForCTC``, ``...ForPreTraining``,
``HubertForCTC``, ...: the ``wav2vec2.`` / ``hubert.`` base model is taken, the heads,
quantizer and projections are dropped), and our own converted files. The mapping:

* convolution weights [out, in, k] -> [k, in, out]; Linear weights transposed to [in, out];
  LayerNorm / GroupNorm ``weight`` is our ``scale``;
* the position convolution's weight normalisation, saved either as ``weight_g`` /
  ``weight_v`` (older checkpoints) or as ``parametrizations.weight.original0`` /
  ``original1`` (torch's parametrisation), keeps g and v separate;
* an attention's ``q_proj``, ``k_proj``, ``v_proj`` are concatenated into ``qkv`` and
  ``out_proj`` is ``proj``; the feed-forward's ``intermediate_dense`` / ``output_dense`` are
  ``fc1`` / ``fc2``;
* ``masked_spec_embed`` (the pretraining mask vector) is dropped.
"""

from __future__ import annotations

import functools
import re

import numpy as np
from flax import nnx

from mfer_jax.models import import_common
from mfer_jax.models import wav2vec2

CheckpointError = import_common.CheckpointError
Params = import_common.Params

_DROPPED = ("masked_spec_embed",)
_RENAMES = (
    (".parametrizations.weight.original0", ".weight_g"),
    (".parametrizations.weight.original1", ".weight_v"),
)
_OURS_TO_HF = (
    ("attention/proj/", "attention/out_proj/"),
    ("feed_forward/fc1/", "feed_forward/intermediate_dense/"),
    ("feed_forward/fc2/", "feed_forward/output_dense/"),
    ("pos_conv_embed/", "pos_conv_embed/conv/"),
)


@functools.lru_cache(maxsize=8)
def expected_shapes(cfg: wav2vec2.Wav2Vec2Config) -> dict[str, tuple[int, ...]]:
  """Our flat param paths and shapes for ``cfg``, without allocating the model."""
  model = nnx.eval_shape(lambda: wav2vec2.Wav2Vec2Model(cfg, rngs=nnx.Rngs(0)))
  return {"/".join(map(str, p)): tuple(v.shape)
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def hf_layout(sd: Params) -> Params:
  """The base model's keys of a HF state dict, with weight-norm names made uniform."""
  sd = {k.removeprefix("module."): v for k, v in sd.items()}
  for prefix in ("wav2vec2.", "hubert."):
    if any(k.startswith(prefix) for k in sd):
      sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
      break
  out = {}
  for k, v in sd.items():
    if k.startswith(_DROPPED):
      continue
    for old, new in _RENAMES:
      k = k.replace(old, new)
    out[k] = v
  return out


def hf_key(path: str) -> str:
  """The HF key of one of our param paths (for ``qkv``: the ``q_proj`` key)."""
  for ours, theirs in _OURS_TO_HF:
    path = path.replace(ours, theirs)
  path = path.replace("attention/qkv/", "attention/q_proj/")
  parts = path.split("/")
  parts[-1] = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
  return ".".join(parts)


def _value(path: str, sd: Params, used: set[str]) -> np.ndarray | None:
  """Our value for ``path`` from the HF dict (None if a source key is missing)."""
  key = hf_key(path)
  if "/attention/qkv/" in path:
    keys = [key.replace("q_proj", n) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(k in sd for k in keys):
      return None
    used.update(keys)
    parts = [sd[k] for k in keys]
    return np.concatenate([p.T for p in parts], axis=1) if path.endswith("kernel") \
        else np.concatenate(parts)
  if key not in sd:
    return None
  used.add(key)
  v = sd[key]
  if path.endswith("conv/kernel") or path.endswith("weight_v"):
    return v.transpose(2, 1, 0)   # [out, in, k] -> [k, in, out]
  if path.endswith("weight_g"):
    return v.reshape(-1)
  if path.endswith("/kernel"):
    return v.T
  return v


def describe_source(sd: Params) -> str:
  """What a checkpoint looks like, for error messages."""
  family = import_common.identify_family(sd)
  if family not in ("wav2vec2", "hubert"):
    what = f"a {family} checkpoint" if family else "not a wav2vec 2.0 / HuBERT checkpoint"
    hint = f" (convert it with --family={family})" if family else ""
    return f"the checkpoint is {what}{hint}"
  ours = any("/" in k for k in sd)
  flat = {hf_key(k): v for k, v in sd.items()} if ours else hf_layout(sd)
  depth = 1 + max((int(m[1]) for k in flat if (m := re.match(r"encoder\.layers\.(\d+)\.", k))),
                  default=-1)
  proj = flat.get("feature_projection.projection.weight")
  hidden = 0 if proj is None else proj.shape[1] if ours else proj.shape[0]
  norm = "layer" if "feature_extractor.conv_layers.1.layer_norm.weight" in flat else "group"
  # The detected family first: HF names a HuBERT model with a head "hubert.".
  ranked = sorted(wav2vec2.VARIANTS.items(), key=lambda item: item[0][0] != family)
  for (fam, name), (hf_name, arch) in ranked:
    if hf_name and (arch["hidden_size"], arch["num_layers"], arch["feat_extract_norm"]) == (
        hidden, depth, norm):
      return f"the checkpoint looks like {fam} {name} ({hf_name})"
  return (f"the checkpoint has hidden size {hidden}, {depth} layers, {norm}-norm feature "
          "encoder")


def load_wav2vec2_params(path: str, cfg: wav2vec2.Wav2Vec2Config) -> Params:
  """Reads a Hugging Face or mfer-jax wav2vec 2.0 / HuBERT checkpoint as params for ``cfg``.

  Raises:
    CheckpointError: unreadable file, or keys that do not fit ``cfg`` (the message names the
      expected variant, lists missing, unexpected and mis-shaped keys, and says what the
      checkpoint looks like).
  """
  raw = import_common.read_state_dict(path)
  want = expected_shapes(cfg)
  ours = any("/" in k for k in raw)
  params, missing, bad = {}, [], []
  used: set[str] = set()
  source = dict(raw) if ours else hf_layout(raw)
  for p, shape in want.items():
    if ours:
      value = source.get(p)
      if value is not None:
        used.add(p)
    else:
      value = _value(p, source, used)
    name = p if ours else hf_key(p)
    if value is None:
      missing.append(name)
      continue
    if tuple(value.shape) != shape:
      bad.append(f"{name} {tuple(value.shape)} (model wants {shape})")
    params[p] = np.asarray(value, np.float32)
  unexpected = sorted(set(source) - used)
  if missing or unexpected or bad:
    head = (f"{path} does not fit the {cfg.describe()} encoder (hidden size "
            f"{cfg.hidden_size}, {cfg.num_layers} layers, {cfg.feat_extract_norm}-norm "
            f"feature encoder); {describe_source(raw)}.")
    raise CheckpointError(import_common.mismatch_message(head, missing, unexpected, bad))
  return params


def save_params(path: str, params: Params, cfg: wav2vec2.Wav2Vec2Config) -> None:
  """Writes converted params (flat '/' keys) with the architecture as metadata, atomically."""
  import_common.save_params(path, params, {
      "format": "mfer_jax.wav2vec2", "family": cfg.family, "variant": cfg.variant,
      "hf_name": cfg.hf_name, "hidden_size": str(cfg.hidden_size),
      "num_layers": str(cfg.num_layers)})

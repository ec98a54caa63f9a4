r"""Converts a pretrained encoder checkpoint to mfer-jax params (.safetensors, flat '/' keys).

Families (``--family``) and the checkpoints each reads:

  swin      timm (.safetensors, .pth, .bin) and the original Microsoft release (.pth with a
            'model' key); adapted to the target window size, resolution and in_chans
  vit       timm ViTs: DINOv2 (with or without registers), MAE, CLIP, plain ViT; position
            embeddings resampled to --img_size as timm does
  wav2vec2  Hugging Face transformers wav2vec 2.0 (model.safetensors, pytorch_model.bin),
  hubert    bare or with a head (ForCTC, ForPreTraining: the base model is taken)

  python -m mfer_jax.tools.convert --family=swin --in=swin_tiny_patch4_window7_224.pth \
      --variant=tiny --img_size=224,224 --window=7 --in_chans=3 --out=visual_init.safetensors
  python -m mfer_jax.tools.convert --family=vit --variant=dinov2_s14_reg --img_size=224,224 \
      --in=vit_small_patch14_reg4_dinov2.safetensors --out=dinov2_s14_reg.safetensors
  python -m mfer_jax.tools.convert --family=wav2vec2 --variant=base \
      --in=wav2vec2-base/model.safetensors --out=wav2vec2_base.safetensors

A checkpoint of another family or size is refused with the expected variant, the missing,
unexpected and mis-shaped keys, and what the checkpoint looks like. Torch files are read with
``torch.load(weights_only=True)``: a file holding pickled objects other than tensors is
refused. No network access: download the checkpoint yourself first. The output is written
under a temporary name and renamed when complete; its folder is created if needed.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from mfer_jax import cli, errors
from mfer_jax.models import import_common
from mfer_jax.models import swin
from mfer_jax.models import swin_import
from mfer_jax.models import vit
from mfer_jax.models import vit_import
from mfer_jax.models import wav2vec2
from mfer_jax.models import wav2vec2_import

FAMILIES = ("swin", "vit", "wav2vec2", "hubert")
_DEFAULT_VARIANT = {"swin": "tiny", "vit": "vit_b16", "wav2vec2": "base", "hubert": "base"}

_IN = flags.DEFINE_string("in", None, "Checkpoint to read (.safetensors, .pth or .bin).",
                          required=True)
_OUT = flags.DEFINE_string("out", None, "Output .safetensors path.", required=True)
_FAMILY = flags.DEFINE_enum("family", "swin", list(FAMILIES), "Encoder family.")
_VARIANT = flags.DEFINE_string(
    "variant", "", "Variant of the family (default: swin tiny, vit vit_b16, wav2vec2/hubert "
    f"base). swin: {', '.join(swin.VARIANTS)}; vit: {', '.join(vit.VARIANTS)}; wav2vec2 / "
    f"hubert: {', '.join(sorted({v for _, v in wav2vec2.VARIANTS}))}.")
_IMG_SIZE = flags.DEFINE_list("img_size", ["224", "224"], "Target input H,W (swin, vit).")
_WINDOW = flags.DEFINE_integer("window", 7, "Target attention window size (swin).")
_IN_CHANS = flags.DEFINE_integer("in_chans", 3,
                                 "Target input channels (swin: 1 folds the RGB patch embedding "
                                 "exactly into one grey channel, see "
                                 "mfer_jax/models/normalisation.py).")


def _known(family: str) -> list[str]:
  if family == "swin":
    return list(swin.VARIANTS)
  if family == "vit":
    return list(vit.VARIANTS)
  return [v for f, v in wav2vec2.VARIANTS if f == family]


def _check_family(path: str, family: str) -> None:
  """Refuses a checkpoint of another family before the per-family key matching."""
  found = import_common.identify_family(import_common.read_state_dict(path))
  same = found == family or {found, family} <= {"wav2vec2", "hubert"}
  if found and not same:
    raise errors.UsageError(f"--in={path} holds a {found} checkpoint, not {family}; rerun with "
                            f"--family={found} and one of its variants")


def main() -> None:
  family = _FAMILY.value
  variant = _VARIANT.value or _DEFAULT_VARIANT[family]
  if variant not in _known(family):
    raise errors.UsageError(f"--variant={variant}: not a {family} variant; choose one of "
                            f"{', '.join(_known(family))}")
  try:
    img_size = tuple(int(v) for v in _IMG_SIZE.value)
  except ValueError:
    img_size = ()
  if len(img_size) != 2:
    raise errors.UsageError(f"--img_size={','.join(_IMG_SIZE.value)}: expected H,W such as "
                            "224,224")
  if not _OUT.value.endswith(".safetensors"):
    raise errors.UsageError(f"--out={_OUT.value}: the output is a .safetensors file; name it "
                            "<something>.safetensors")
  _check_family(_IN.value, family)
  try:
    if family == "swin":
      cfg = swin.swin_config(variant, img_size=img_size, window_size=_WINDOW.value,
                             in_chans=_IN_CHANS.value)
    elif family == "vit":
      cfg = vit.vit_config(variant, img_size=img_size, in_chans=_IN_CHANS.value)
    else:
      cfg = wav2vec2.wav2vec2_config(family, variant)
  except ValueError as e:
    raise errors.UsageError(str(e)) from e
  if family == "swin":
    params = swin_import.load_swin_params(_IN.value, cfg)
    save = lambda: swin_import.save_params(_OUT.value, params, cfg)  # noqa: E731
    what = (f"swin_{cfg.variant} {cfg.img_size[0]}x{cfg.img_size[1]}, window "
            f"{cfg.window_size}, in_chans {cfg.in_chans}")
  elif family == "vit":
    params = vit_import.load_vit_params(_IN.value, cfg)
    save = lambda: vit_import.save_params(_OUT.value, params, cfg)  # noqa: E731
    what = f"{cfg.describe()} {cfg.img_size[0]}x{cfg.img_size[1]}"
  else:
    params = wav2vec2_import.load_wav2vec2_params(_IN.value, cfg)
    save = lambda: wav2vec2_import.save_params(_OUT.value, params, cfg)  # noqa: E731
    what = cfg.describe()
  try:
    save()   # a missing folder is created; a path that cannot be written is the user's to fix
  except OSError as e:
    raise errors.UserError(f"--out={_OUT.value}: cannot write it ({type(e).__name__}: "
                           f"{e.strerror or e}: {e.filename}); choose a writable path") from e
  count = sum(int(np.prod(v.shape)) for v in params.values())
  print(f"wrote {len(params)} tensors ({count / 1e6:.2f}M params) for {what} to {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)

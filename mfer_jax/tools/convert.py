r"""Converts a pretrained Swin checkpoint to mfer-jax params (.safetensors, flat '/' keys).

Reads timm checkpoints (.safetensors, .pth, .bin) and the original Microsoft release (.pth
with a 'model' key), adapts them to the target model (window size, resolution, 1-channel
spectrogram input) and writes a file that configs name as the visual or audio encoder init:

  python -m mfer_jax.tools.convert --in=swin_tiny_patch4_window7_224.pth --variant=tiny \
      --img_size=224,224 --window=7 --in_chans=3 --out=visual_init.safetensors

No network access: download the checkpoint yourself first. The output is written under a
temporary name and renamed when complete; its folder is created if needed.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from mfer_jax import cli, errors
from mfer_jax.models import swin
from mfer_jax.models import swin_import

_IN = flags.DEFINE_string("in", None, "Checkpoint to read (.safetensors, .pth or .bin).",
                          required=True)
_OUT = flags.DEFINE_string("out", None, "Output .safetensors path.", required=True)
_VARIANT = flags.DEFINE_enum("variant", "tiny", list(swin.VARIANTS), "Swin variant.")
_IMG_SIZE = flags.DEFINE_list("img_size", ["224", "224"], "Target input H,W.")
_WINDOW = flags.DEFINE_integer("window", 7, "Target attention window size.")
_IN_CHANS = flags.DEFINE_integer("in_chans", 3,
                                 "Target input channels (1: the RGB patch embedding is folded exactly into one grey "
                                 "channel, see mfer_jax/models/normalisation.py).")


def main() -> None:
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
  try:
    cfg = swin.swin_config(_VARIANT.value, img_size=img_size, window_size=_WINDOW.value,
                           in_chans=_IN_CHANS.value)
  except ValueError as e:
    raise errors.UsageError(str(e)) from e
  params = swin_import.load_swin_params(_IN.value, cfg)
  swin_import.save_params(_OUT.value, params, cfg)
  count = sum(int(np.prod(v.shape)) for v in params.values())
  print(f"wrote {len(params)} tensors ({count / 1e6:.2f}M params) for swin_{cfg.variant} "
        f"{cfg.img_size[0]}x{cfg.img_size[1]}, window {cfg.window_size}, "
        f"in_chans {cfg.in_chans} to {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)

"""train.layer_decay: every param's learning rate is lr * decay ** (L + 1 - layer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfer_jax import config_lib, errors
from mfer_jax.training import optimizer
from mfer_jax.training import state as state_lib


def _model_config():
  c = config_lib.base_config()
  c.model.image.update(family="vit", variant="test", img_size=(32, 32))            # 2 blocks
  c.model.audio.update(family="swin", variant="test", img_size=(16, 32), window_size=4)  # 2+2
  c.model.fusion.update(dim=32, num_layers=1, num_heads=4, gate_hidden=16)
  return c


def _expected(path: str, decay: float) -> float:
  """The recipe written out by hand for these two encoders."""
  if path.startswith("image_encoder/"):            # ViT, depth 2: layers 0..3
    rest = path.split("/")[1:]
    layer = (0 if rest[0] in ("patch_embed", "cls_token", "reg_token", "pos_embed")
             else int(rest[1]) + 1 if rest[0] == "blocks" else 3)
    return decay ** (3 - layer)
  if path.startswith("audio_encoder/"):            # Swin, depths (2, 2): layers 0..5
    rest = path.split("/")[1:]
    if rest[0] == "patch_embed":
      layer = 0
    elif rest[0] == "layers":
      stage = int(rest[1])
      layer = 2 * stage + (int(rest[3]) + 1 if rest[2] == "blocks" else 1)
    else:
      layer = 5
    return decay ** (5 - layer)
  return 1.0                                        # fusion and head


@pytest.mark.parametrize("decay", [0.65, 1.0])
def test_per_layer_learning_rates_equal_the_formula(decay):
  c = _model_config()
  c.train.update(layer_decay=decay, weight_decay=0.0, grad_clip_norm=0.0, warmup_steps=0,
                 learning_rate=1e-3)
  spec = state_lib.ModelSpec(c.model)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec.abstract_params)
  tx, schedule = optimizer.make_optimizer(c.train, total_steps=10)
  grads = jax.tree.map(jnp.ones_like, params)
  # Adam's first step moves every param by lr * g / (|g| + eps): with g = 1, by lr * scale.
  updates, _ = tx.update(grads, tx.init(params), params)
  lr = float(schedule(0))
  assert lr == pytest.approx(1e-3)
  seen = set()
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    name = name.removesuffix("/value")
    want = _expected(name, decay)
    np.testing.assert_allclose(np.asarray(u), -lr * want, rtol=2e-5, err_msg=name)  # float32
    seen.add(round(want, 8))
  if decay != 1.0:   # every layer of both encoders is present
    assert len(seen) == len({round(decay ** k, 8) for k in range(6)})


def test_layer_decay_out_of_range_is_refused():
  c = _model_config()
  c.train.layer_decay = 1.5
  with pytest.raises(errors.UsageError, match="train.layer_decay=1.5"):
    optimizer.make_optimizer(c.train, total_steps=10)


def test_image_variant_argument_selects_a_vit():
  c = config_lib.apply_variant_args(config_lib.base_config(), "image=dinov2_b14_reg,audio=swin_t")
  assert (c.model.image.family, c.model.image.variant) == ("vit", "dinov2_b14_reg")
  assert (c.model.audio.family, c.model.audio.variant) == ("swin", "tiny")
  c = config_lib.apply_variant_args(config_lib.base_config(), "audio=hubert_base")
  assert (c.model.audio.family, c.model.audio.variant) == ("hubert", "base")
  with pytest.raises(ValueError, match="image='wav2vec2_base'.*vit_b16"):
    config_lib.apply_variant_args(config_lib.base_config(), "image=wav2vec2_base")


def test_vit_fine_tunes_end_to_end_from_an_init_file(tiny_data_dir, tmp_path):
  """configs like abaw.py:image=<vit>: the ViT starts from its init file and trains."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from mfer_jax.models import vit, vit_import  # pylint: disable=g-import-not-at-top
  from mfer_jax.training import loop  # pylint: disable=g-import-not-at-top
  cfg = vit.vit_config("test", img_size=32)
  model = vit.VisionTransformer(cfg, rngs=nnx.Rngs(3))
  params = {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  vit_import.save_params(str(tmp_path / "vit.safetensors"), params, cfg)
  c = tiny_config(tiny_data_dir)
  c.model.image.update(family="vit", variant="test", img_size=(32, 32),
                       init_file=str(tmp_path / "vit.safetensors"))
  c.model.fusion.name = "visual_only"   # the ViT alone: one encoder to compile
  c.train.update(layer_decay=0.75, max_steps=2)
  run = loop.build_run(c, str(tmp_path / "run"))
  try:
    loaded = run.spec.merge(run.state.params).image_encoder
    np.testing.assert_array_equal(np.asarray(loaded.pos_embed.get_value()),
                                  params["pos_embed"])
  finally:
    run.checkpointer.close()
    run.train_iter.close()
  result = loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert 0.0 <= result["macro_f1"] <= 1.0

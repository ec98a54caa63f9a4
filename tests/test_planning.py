"""The planner: exact per-device bytes from shardings, batch search, accelerators, bad input."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from mfer_jax import accelerators, planning, sharding
from mfer_jax.training import optimizer, state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fsdp4():
  """The tiny model on mesh (data 2, fsdp 4), fusion width 34 so that fsdp cannot split it."""
  config = tiny_config("")
  config.model.fusion.update(dim=34, num_heads=2)
  mesh = planning.make_plan_mesh((2, 4, 1), jax.devices())
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 10)
  state_sh = state_lib.state_shardings(spec, tx, mesh, config.mesh.rules)
  return config, mesh, spec, state_sh, state_lib.abstract_state(state_sh, spec, tx)


def test_fsdp_param_bytes_are_total_over_fsdp_plus_replicated(fsdp4):
  """Per-device param bytes under fsdp 4: the sharded params' bytes / 4, plus every replicated
  param whole, checked against the shards a device really holds."""
  _, mesh, spec, state_sh, abstract = fsdp4
  report = sharding.replication_report(spec.abstract_params, state_sh.params, mesh)

  nbytes = lambda x: int(np.prod(x.shape)) * x.dtype.itemsize  # noqa: E731
  total = sum(nbytes(p) for p in jax.tree.leaves(spec.abstract_params))
  replicated = report.replicated_bytes
  assert report.total_bytes == total and 0 < replicated < total
  names = [n for n, _ in report.replicated]
  for name in ("fusion/modality_embed", "fusion/blocks/0/v_from_a/q/kernel",
               "image_encoder/layers/0/blocks/0/attn/relative_position_bias_table"):
    assert name in names, names
  assert "image_encoder/layers/1/blocks/0/mlp/fc1/kernel" not in names
  want = (total - replicated) // 4 + replicated
  assert planning.per_device_bytes(abstract.params) == want

  # Independently: place real arrays with those shardings and count device 0's shards.
  placed = jax.tree.map(lambda s, sh: jax.device_put(np.zeros(s.shape, s.dtype), sh),
                        nnx.to_pure_dict(spec.abstract_params),
                        nnx.to_pure_dict(state_sh.params))
  on_device0 = sum(shard.data.nbytes for leaf in jax.tree.leaves(placed)
                   for shard in leaf.addressable_shards if shard.device == jax.devices()[0])
  assert on_device0 == want
  # Adam keeps two moments like the params, plus replicated scalars (counts).
  assert planning.per_device_bytes(abstract.opt_state) >= 2 * want


def test_too_much_replication_is_an_error_naming_the_largest(fsdp4, capsys):
  config, mesh, spec, state_sh, _ = fsdp4
  report = sharding.replication_report(spec.abstract_params, state_sh.params, mesh)
  assert report.fraction > 0.1  # the unsplittable fusion
  with pytest.raises(sharding.ShardingError) as e:
    sharding.check_replication(spec.abstract_params, state_sh.params, mesh)  # auto: 0.1
  message = str(e.value)
  assert "mesh.max_replicated_fraction=0.1" in message and "\n" not in message
  assert report.replicated[0][0] in message  # the largest offender is named
  # An explicit limit above the share passes, and the run says what stays replicated.
  sharding.check_replication(spec.abstract_params, state_sh.params, mesh,
                             max_fraction=report.fraction + 0.01)
  assert "stay replicated on every device" in capsys.readouterr().err
  # Data-parallel: replication is the design, nothing is checked.
  dp = planning.make_plan_mesh((-1, 1, 1), jax.devices())
  dp_sh = state_lib.state_shardings(spec, optimizer.make_optimizer(config.train, 10)[0], dp,
                                    config.mesh.rules)
  sharding.check_replication(spec.abstract_params, dp_sh.params, dp, max_fraction=0.0)


def test_largest_batch_bisection():
  budget = 1000.0
  for fixed, slope in ((100.0, 7.0), (999.0, 1.0), (0.0, 0.0009765625), (10.0, 2000.0)):
    calls = []

    def total(b, fixed=fixed, slope=slope):
      calls.append(b)
      return fixed + slope * b

    want = max(int((budget - fixed) // slope), 0)
    assert planning.largest_batch(total, budget, limit=1 << 20) == min(want, 1 << 20)
    assert len(calls) < 50


def test_batch_model_is_exact_where_compiled_and_affine_between():
  plans = {}

  def fake_plan(b):  # bytes 10 + 3b with a bump at b = 5, flops 2b
    plans[b] = plans.get(b, 0) + 1
    return planning.StepPlan({}, b, b, "none", None, 10, 0, 0, 3 * b + (50 if b == 5 else 0),
                             0, 2.0 * b, 0.0, sharding.ReplicationReport(0, ()))

  model = planning.BatchModel(fake_plan, 2)
  assert sorted(plans) == [2, 4]
  assert model.total_bytes(5) == 25.0 and model.flops(10) == 20.0  # affine: no compile
  assert sorted(plans) == [2, 4]
  exact = planning.BatchModel(fake_plan, 2, exact=True)
  assert exact.total_bytes(5) == 75 and plans[5] == 1
  assert all(n == 2 for b, n in plans.items() if b in (2, 4))


def test_accelerator_lookup_by_device_kind():
  kinds = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA A100-SXM4-40GB": "a100-40",
           "NVIDIA A100-SXM4-80GB": "a100-80", "TPU v4": "v4", "TPU v5 lite": "v5e",
           "TPU v5p": "v5p", "TPU v5": "v5p", "TPU v6 lite": "v6e"}
  for kind, name in kinds.items():
    assert accelerators.for_device_kind(kind).name == name, kind
  assert accelerators.for_device_kind("cpu") is None
  v5e = accelerators.BY_NAME["v5e"]
  assert v5e.memory_bytes == 16 * 2**30 and v5e.peak_bf16_flops == 197e12


def test_bad_mesh_and_batch_name_the_flag():
  devices = jax.devices()
  cases = [
      (lambda: planning.make_plan_mesh((3, 1, 1), devices),
       "--mesh=(3, 1, 1) with --devices=8: mesh shape (3, 1, 1) needs 3 devices"),
      (lambda: planning.make_plan_mesh((-1, 3, 1), devices),
       "8 devices cannot fill mesh shape (-1, 3, 1)"),
      (lambda: planning.check_batch(12, planning.make_plan_mesh((1, 8, 1), devices)),
       "--batch_size=12 does not split over the 8 data-parallel devices"),
      (lambda: planning.parse_mesh("1,x"), "--mesh=1,x: expected 3 sizes"),
      (lambda: planning.parse_mesh("(0,1,1)"), "--mesh=(0,1,1): expected 3 sizes"),
      (lambda: planning.check_remat("full"), "--remat=full: choose one of none, block"),
      (lambda: planning.use_cpu_devices(16), "--devices=16: this process has only 8"),
  ]
  for fn, message in cases:
    with pytest.raises(planning.PlanError) as e:
      fn()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_input_is_one_line_and_exit_2():
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)  # the tool makes its own devices
  out = subprocess.run([sys.executable, "-m", "mfer_jax.tools.plan", "--config=configs/abaw.py",
                        "--mesh=(1,8,1)", "--batch_size=12"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines() == [
      "error: --batch_size=12 does not split over the 8 data-parallel devices of mesh "
      "{'data': 1, 'fsdp': 8, 'model': 1}; use a multiple of 8"]


def test_the_ema_copy_of_the_params_is_planned_like_the_params():
  """train.ema_decay > 0: the compiled step is training's (it carries the EMA), and the plan
  counts that copy at exactly the params' per-device bytes. Planned on a feature-cache config
  (fusion and head only), so the two compiles are cheap."""
  config = tiny_config("")
  config.data.features_dir = "/nonexistent/features"   # shapes only: nothing is read
  mesh = planning.make_plan_mesh((2, 4, 1), jax.devices())
  plain = planning.plan_step(config, mesh, 8)
  config.train.ema_decay = 0.99
  with_ema = planning.plan_step(config, mesh, 8)
  assert plain.ema_bytes == 0 and with_ema.ema_bytes == with_ema.param_bytes > 0
  assert with_ema.param_bytes == plain.param_bytes and with_ema.opt_bytes == plain.opt_bytes

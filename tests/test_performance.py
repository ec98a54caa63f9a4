"""FLOPs, MFU, the step-time split, the profiler window, and remat's effect on compiled memory."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mfer_jax import errors, planning
from mfer_jax.models import swin
from mfer_jax.training import observability, performance

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_swin_t_forward_flops_match_the_published_count():
  """Swin-T at 224: 4.5 GMAC (Liu et al. 2021, Table 1; timm) = 9.0 GFLOP per image."""
  model = nnx.eval_shape(lambda: swin.SwinTransformer(swin.swin_config("tiny"),
                                                      rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  lowered = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[1]).lower(params, x)
  per_image = performance.cost_flops(lowered) / 2
  assert abs(per_image - 9.0e9) <= 0.1 * 9.0e9, per_image


def test_step_timer_splits_time_and_computes_mfu(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(performance.time, "monotonic", lambda: clock[0])
  flops = 0.5 * 197e12 * 0.2  # a step of 0.2 s at 50% of a v5e's peak
  timer = performance.StepTimer(flops, "TPU v5 lite")
  for _ in range(4):
    timer.add_wait(0.05)
    timer.add_step()
  clock[0] += 0.8
  row = timer.row()
  assert row["step_time_s"] == pytest.approx(0.2)
  assert row["data_wait_s"] == pytest.approx(0.05)
  assert row["compute_s"] == pytest.approx(0.15)
  assert row["data_wait_fraction"] == pytest.approx(0.25)
  assert row["tflops_per_device"] == pytest.approx(flops / 1e12)
  assert row["mfu"] == pytest.approx(0.5)
  # A CPU run has no peak to compare with: no MFU, but achieved TFLOP/s.
  cpu = performance.StepTimer(1e12, "cpu")
  cpu.add_step()
  clock[0] += 2.0
  row = cpu.row()
  assert "mfu" not in row and row["tflops_per_s_per_device"] == pytest.approx(0.5)


def test_input_bound_warning_is_printed_once(capsys):
  bar = observability.ProgressBar(10, enabled=True)
  bar.warn_once("input_bound", "input-bound: waited 40%")
  bar.warn_once("input_bound", "input-bound: waited 50%")
  assert capsys.readouterr().err.count("warning: input-bound") == 1


@pytest.mark.parametrize("spec", ["10", "5:5", "a:b", "-1:3"])
def test_bad_profile_steps_are_usage_errors(spec):
  with pytest.raises(errors.UsageError, match=f"train.profile_steps='{spec}'"):
    performance.parse_profile_steps(spec)


def test_run_logs_flops_time_split_and_writes_a_trace(tiny_run):
  rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == 12
  flops = {r["tflops_per_device"] for r in rows}
  assert len(flops) == 1 and flops.pop() > 0
  for r in rows:
    assert r["data_wait_s"] + r["compute_s"] == pytest.approx(r["step_time_s"], rel=1e-6)
    assert 0 <= r["data_wait_fraction"] <= 1
    assert r["tflops_per_s_per_device"] == pytest.approx(r["tflops_per_device"]
                                                         / r["step_time_s"], rel=1e-6)
    assert "mfu" not in r  # CPU
  traces = list((tiny_run / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_block_remat_shrinks_the_compiled_train_step():
  """The abaw train step (Swin-T/224 encoders cut to the test depth, MFM, AdamW, batch 16)
  compiled with remat=block needs less temporary memory than without remat."""
  spec = importlib.util.spec_from_file_location("abaw_config", ROOT / "configs" / "abaw.py")
  abaw = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(abaw)
  config = abaw.get_config()
  for enc in (config.model.image, config.model.audio):
    enc.variant = "test"
  mesh = planning.make_plan_mesh((1, 1, 1), jax.devices()[:1])
  temp = {r: planning.plan_step(config, mesh, 16, remat=r).temp_bytes
          for r in ("none", "block")}
  assert temp["block"] < 0.7 * temp["none"], temp

"""bench/accelerator.py's CPU dry run: every stage runs, so the script is ready for hardware."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_stage(tmp_path):
  out_json = tmp_path / "check.json"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-m", "bench.accelerator", "--dry_run", "--steps=2",
                        f"--json={out_json}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1800)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  result = json.loads(out_json.read_text())
  assert result["backend"] == "cpu" and result["devices"] == 2
  assert result["tests"]["passed"], result["tests"]
  assert "1 passed" in result["tests"]["summary"]
  plan = result["plan"]["plan"]
  assert plan["per_device_bytes"]["total"] > plan["per_device_bytes"]["params"] > 0
  assert plan["flops_per_device"] > 0
  timings = {r["variant"]: r for r in result["timings"]}
  assert set(timings) == {"float32", "bfloat16_xla", "bfloat16_cpu_amx"}
  for r in timings.values():
    assert r["loss_finite"] and r["step_s"] > 0 and r["compile_s"] > 0
    assert r["batch_size"] == 4 and r["mfu"] is None  # CPU: no peak in the table
  assert "cpu_amx" in timings["bfloat16_cpu_amx"]["precision"]
  # The printed table has one row per variant.
  assert sum(line.startswith("| bfloat16_") for line in out.stdout.splitlines()) == 2

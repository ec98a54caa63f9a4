"""Temporal runs end to end: windowed evaluation against scikit-learn, training and resume."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn.metrics import f1_score

from conftest import tiny_config
from mfer_jax import evaluation, sharding
from mfer_jax.data import pipeline, store
from mfer_jax.prediction import predictor as predictor_lib
from mfer_jax.training import checkpointing, loop, optimizer, state as state_lib
from mfer_jax.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def temporal_config(data_dir, head="transformer", length=4, hop=2):
  config = tiny_config(data_dir)
  config.data.sequence.update(length=length, stride=1, hop=hop)
  config.data.sampling.epoch_size = 16          # 2 steps of 8 clips per epoch
  config.data.eval_batch_size = 8
  config.model.temporal.update(name=head, num_heads=4, num_layers=1, dilations=(1, 2))
  return config


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_window_eval_on_devices_matches_sklearn(tiny_data_dir, hosts):
  """Global batches assembled from 1, 2 or 3 simulated hosts' windows, scatter-averaged on 6
  devices: every valid frame is scored once, and macro-F1 equals scikit-learn's on a host-side
  average of the same windows' logits."""
  config = temporal_config(tiny_data_dir)
  config.data.eval_batch_size = 6        # divisible by 1, 2 and 3 hosts and by 6 devices
  mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:6])
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 10)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  # Spread the logits so that frames get different classes.
  params = jax.tree.map(lambda p: p, state.params)
  kernel = params["fusion"]["head"]["kernel"]
  kernel[...] = kernel[...] * 300
  index = store.load_split(config.data.data_dir, "validation")
  pipes = [pipeline.make_eval_pipeline(config.data, index, process_index=p, process_count=hosts)
           for p in range(hosts)]
  acc = step_lib.empty_window_accumulator(len(index), 8, mesh)
  eval_step = None
  forward = jax.jit(lambda p, *inputs: spec.merge(p)(*inputs)["logits"])
  host_params = jax.device_get(params)
  sums = np.zeros((len(index), 8))
  counts = np.zeros(len(index))
  for host_batches in zip(*pipes):
    # What to_global_batch assembles from the hosts' blocks, in process order.
    local = {k: np.concatenate([b[k] for b in host_batches])
             for k in (*step_lib.BATCH_KEYS, "index")}
    batch = pipeline.to_global_batch(local, mesh)
    if eval_step is None:
      eval_step = step_lib.make_window_eval_step(spec, config, mesh, state_sh.params,
                                                 jax.tree.map(lambda x: x.sharding, batch))
    acc = eval_step(params, acc, batch)
    # Reference: one forward per window on the host, summed per frame in numpy.
    logits = np.asarray(forward(host_params, local["face"], local["mel"], local["has_face"],
                                local["present"]))
    np.add.at(sums, local["index"][local["mask"]], logits[local["mask"]])
    np.add.at(counts, local["index"][local["mask"]], 1)
  totals = step_lib.summarize_windows(acc, index.label)
  valid = index.label >= 0
  np.testing.assert_array_equal(counts > 0, valid)        # every valid frame is scored...
  assert totals["confusion"].sum() == valid.sum()          # ...and counted once
  preds = sums[valid].argmax(-1)
  labels = index.label[valid]
  assert len(set(preds.tolist())) > 1
  ref_cm = np.zeros((8, 8), int)
  np.add.at(ref_cm, (labels, preds), 1)
  np.testing.assert_array_equal(totals["confusion"], ref_cm)
  result = evaluation.summarize(totals["confusion"], totals["gate_sum"])
  ref = f1_score(labels, preds, average="macro", labels=list(range(8)), zero_division=0)
  assert result["macro_f1"] == pytest.approx(ref, abs=1e-9)
  if hosts == 1:   # the loop's evaluation is this same computation
    run = loop.Run(config, pathlib.Path("."), mesh, spec, tx, None, state, state_sh, 1, 1, None,
                   index, None)
    assert loop.evaluate(run, params)["macro_f1"] == result["macro_f1"]


@pytest.fixture(scope="module")
def tcn_run(tiny_data_dir, tmp_path_factory):
  """A finished 4-step temporal run (TCN head, T=4, focal loss), evaluated at steps 2 and 4."""
  config = temporal_config(tiny_data_dir, head="tcn")
  config.train.update(num_epochs=2, checkpoint_every_steps=2, eval_every_steps=2, loss="focal")
  workdir = tmp_path_factory.mktemp("tcn_run")
  result = loop.train_and_evaluate(config, str(workdir))
  return workdir, config, result


def test_temporal_run_trains_evaluates_and_reports(tcn_run, tiny_data_dir):
  workdir, config, first = tcn_run
  assert first["num_examples"] == int((store.load_split(tiny_data_dir, "validation").label
                                       >= 0).sum())
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
  # A finished run reports its final evaluation again instead of training.
  again = loop.train_and_evaluate(config, str(workdir))
  assert again["macro_f1"] == first["macro_f1"]


def test_temporal_prediction_scores_every_frame_from_its_windows(tcn_run):
  workdir, config, _ = tcn_run
  predictor = predictor_lib.Predictor(workdir, batch_size=8)
  assert predictor.sequence.length == 4 and predictor.sequence.window_hop == 2
  rng = np.random.default_rng(0)
  n = 11                                   # not a multiple of the window or the batch
  face = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
  mel = rng.integers(0, 256, (n, 16, 32), np.uint8)
  has_face = rng.random(n) < 0.7
  probs, gates = predictor.predict(face, mel, has_face)
  assert probs.shape == (n, 8) and gates.shape == (n, 2)
  # Reference: the windows of frames 1..n, T=4 hop 2, written out by hand; mean logits.
  windows = [[-1, -1, 0, 1], [0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9],
             [8, 9, 10, -1], [10, -1, -1, -1]]    # every frame in exactly T / hop = 2
  spec = state_lib.ModelSpec(config.model)
  forward = jax.jit(lambda p, *inputs: spec.merge(p)(*inputs)["logits"])
  sums = np.zeros((n, 8))
  for w in windows:
    w = np.asarray(w)
    p = w >= 0
    take = np.maximum(w, 0)
    logits = forward(predictor._params,   # pylint: disable=protected-access
                     np.where(p[:, None, None, None], face[take], 0)[None],
                     np.where(p[:, None, None], mel[take], 0)[None], (has_face[take] & p)[None],
                     p[None])
    sums[w[p]] += np.asarray(logits)[0][p]
  mean = sums / np.bincount(np.concatenate(windows)[np.concatenate(windows) >= 0])[:, None]
  ref = np.exp(mean - mean.max(-1, keepdims=True))
  np.testing.assert_allclose(probs, ref / ref.sum(-1, keepdims=True), atol=1e-5)


def test_a_checkpoint_of_another_mode_is_a_one_line_error(tcn_run, tmp_path):
  workdir, _, _ = tcn_run
  saved = json.loads((workdir / "config.json").read_text())
  for name, length, message in (
      ("none", 1, "temporal head 'tcn', but the config asks for frame mode"),
      ("transformer", 4, "temporal head 'tcn', but the config asks for temporal head "
                         "'transformer'")):
    other = tmp_path / name
    other.mkdir()
    (other / "checkpoints").symlink_to(workdir / "checkpoints")
    (other / "features.json").write_bytes((workdir / "features.json").read_bytes())
    edited = json.loads(json.dumps(saved))
    edited["model"]["temporal"]["name"] = name
    edited["data"]["sequence"].update(length=length, hop=0)
    (other / "config.json").write_text(json.dumps(edited))
    with pytest.raises(checkpointing.CheckpointMismatchError, match=message):
      predictor_lib.Predictor(other)
  # The reverse direction (a frame checkpoint, a temporal config) reads the same params tree.
  assert checkpointing._temporal_head_of({"fusion": {}}) == "none"   # pylint: disable=protected-access
  proc = subprocess.run([sys.executable, "-m", "mfer_jax.tools.predict",
                         f"--workdir={tmp_path / 'none'}", f"--video={tmp_path / 'x.mp4'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: checkpoint ")

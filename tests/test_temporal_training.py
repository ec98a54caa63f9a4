"""Temporal runs end to end: windowed evaluation against scikit-learn, training and resume."""

import json
import pathlib

import jax
import numpy as np
import pytest
from sklearn.metrics import f1_score

from conftest import tiny_config
from mfer_jax import sharding
from mfer_jax.data import pipeline, store
from mfer_jax.training import loop, optimizer, state as state_lib


def temporal_config(data_dir, head="transformer", length=4, hop=2):
  config = tiny_config(data_dir)
  config.data.sequence.update(length=length, stride=1, hop=hop)
  config.data.sampling.epoch_size = 16          # 2 steps of 8 clips per epoch
  config.data.eval_batch_size = 8
  config.model.temporal.update(name=head, num_heads=4, num_layers=1, dilations=(1, 2))
  return config


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_window_eval_on_devices_matches_sklearn(tiny_data_dir, hosts):
  """Scatter-averaged logits on 8 devices = a host-side average of the same windows' logits;
  macro-F1 over every valid frame once = scikit-learn's, for 1, 2 and 3 simulated hosts."""
  config = temporal_config(tiny_data_dir)
  config.data.eval_batch_size = 6        # divisible by 1, 2 and 3 hosts and by 6 devices
  mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:6])
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 10)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  # Spread the logits so that frames get different classes.
  params = jax.tree.map(lambda p: p, state.params)
  params["fusion"]["head"]["kernel"].value = params["fusion"]["head"]["kernel"].value * 300
  index = store.load_split(config.data.data_dir, "validation")
  run = loop.Run(config, pathlib.Path("."), mesh, spec, tx, None, state, state_sh, 1, 1, None,
                 index, None)
  result = loop.evaluate(run, params)
  # Reference: every simulated host's windows, one forward each on the host, averaged per frame.
  model = spec.merge(jax.device_get(params))
  sums = np.zeros((len(index), 8))
  counts = np.zeros(len(index))
  pipes = [pipeline.make_eval_pipeline(config.data, index, process_index=p, process_count=hosts)
           for p in range(hosts)]
  for host_batches in zip(*pipes):
    for b in host_batches:
      logits = np.asarray(model(b["face"], b["mel"], b["has_face"], b["present"])["logits"])
      np.add.at(sums, b["index"][b["mask"]], logits[b["mask"]])
      np.add.at(counts, b["index"][b["mask"]], 1)
  valid = index.label >= 0
  np.testing.assert_array_equal(counts > 0, valid)       # every valid frame scored...
  assert result["num_examples"] == valid.sum()           # ...and counted once
  preds = sums[valid].argmax(-1)
  labels = index.label[valid]
  assert len(set(preds.tolist())) > 1
  ref = f1_score(labels, preds, average="macro", labels=list(range(8)), zero_division=0)
  assert result["macro_f1"] == pytest.approx(ref, abs=1e-9)
  ref_cm = np.zeros((8, 8), int)
  np.add.at(ref_cm, (labels, preds), 1)
  np.testing.assert_array_equal(result["confusion"], ref_cm)


def test_tcn_run_trains_evaluates_and_resumes(tiny_data_dir, tmp_path):
  config = temporal_config(tiny_data_dir, head="tcn")
  config.train.update(num_epochs=2, checkpoint_every_steps=2, eval_every_steps=4, loss="focal")
  first = loop.train_and_evaluate(config, str(tmp_path))
  assert first["num_examples"] == int((store.load_split(tiny_data_dir, "validation").label
                                       >= 0).sum())
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
  # A finished run reports its final evaluation again instead of training.
  again = loop.train_and_evaluate(config, str(tmp_path))
  assert again["macro_f1"] == first["macro_f1"]

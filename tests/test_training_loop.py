"""The training loop and evaluation: NaN stop, metrics vs scikit-learn, evaluators built
once, init files, --mode=eval, a finished run, and the loop's errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import f1_score

from conftest import tiny_config
from mfer_jax import config_lib, evaluation, sharding
from mfer_jax.data import pipeline, reader, store
from mfer_jax.models import model as model_lib
from mfer_jax.models import swin_import
from mfer_jax.training import evaluator as evaluator_lib, init_files, loop
from mfer_jax.training import optimizer
from mfer_jax.training import state as state_lib
from training_helpers import ROOT, TINY, run_main


def test_loop_stops_on_nan_with_a_clear_message(data_dir, tmp_path, monkeypatch):
  # Same config (and so the same compiled step) as the shared tiny run; the NaN stops it at
  # the first check.
  config = tiny_config(data_dir)

  def poison(config, spec, state):
    del config, spec
    return state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))

  monkeypatch.setattr(loop.init_files, "apply_init_files", poison)
  with pytest.raises(loop.NonFiniteLossError, match=r"NaN/Inf at step 0.*last good checkpoint"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))


def test_macro_f1_matches_sklearn_with_absent_classes():
  rng = np.random.default_rng(0)
  labels = rng.choice([0, 1, 4, 5, 7], size=500)          # classes 2, 3, 6 absent
  preds = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 8, 500))
  preds[:3] = 6                                          # predicted but never true
  ours = evaluation.summarize(evaluation.confusion_matrix(labels, preds, 8))
  ref = f1_score(labels, preds, average="macro", labels=list(range(8)), zero_division=0)
  assert ours["macro_f1"] == pytest.approx(ref, abs=1e-12)
  ref_per_class = f1_score(labels, preds, average=None, labels=list(range(8)), zero_division=0)
  np.testing.assert_allclose(list(ours["per_class_f1"].values()), ref_per_class, atol=1e-12)


def test_device_eval_matches_sklearn_and_compiles_once(data_dir, monkeypatch):
  """The on-device confusion accumulation over padded batches equals sklearn on the same
  predictions made one example at a time on the host; an evaluator built once opens its
  shards once and traces its step once however often it evaluates."""
  config = tiny_config(data_dir)
  mesh = sharding.make_mesh((2, 2, 2))
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 10)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  readers = []
  real_init = reader.SplitReader.__init__

  def counting_init(self, *args, **kwargs):
    readers.append(1)   # each construction opens and checks every shard of the split
    real_init(self, *args, **kwargs)

  monkeypatch.setattr(reader.SplitReader, "__init__", counting_init)
  evaluators = evaluator_lib.build_evaluators(config, mesh, spec, state_sh.params)
  ev = evaluators["validation"]
  result = ev(state.params)
  index = store.load_split(config.data.data_dir, "validation")
  model = spec.merge(jax.device_get(state.params))
  labels, preds = [], []
  for b in pipeline.make_eval_pipeline(config.data, index, process_index=0, process_count=1):
    logits = model(b["face"], b["mel"], b["has_face"])["logits"]
    keep = b["mask"]
    labels += list(b["label"][keep])
    preds += list(np.asarray(logits).argmax(-1)[keep])
  assert result["num_examples"] == ev.num_examples == int((index.label >= 0).sum())
  ref = f1_score(labels, preds, average="macro", labels=list(range(8)), zero_division=0)
  assert result["macro_f1"] == pytest.approx(ref, abs=1e-9)
  # A second evaluation, of other params, reuses the pipeline and the compiled step.
  readers.clear()
  shifted = jax.tree.map(lambda p: p * 0.5, state.params)
  again = ev(shifted)
  assert ev.traces == 1 and not readers
  assert again["num_examples"] == result["num_examples"]
  assert again["confusion"] != result["confusion"]


def test_a_train_subset_evaluator_sees_a_fixed_evenly_spaced_subset(data_dir):
  config = tiny_config(data_dir)
  config.evals.train_subset = config_lib.evaluator("train", every_steps=3, max_examples=20)
  specs = evaluator_lib.specs_from_config(config)
  assert list(specs) == ["validation", "train_subset"]     # the primary comes first
  sub = specs["train_subset"]
  assert [s for s in range(1, 13) if sub.due(s, 6, 12)] == [3, 6, 9, 12]
  assert [s for s in range(1, 13) if specs["validation"].due(s, 6, 12)] == [6, 12]
  index = store.load_split(config.data.data_dir, "train")
  labelled = np.flatnonzero(index.label >= 0)
  pipe = pipeline.make_eval_pipeline(config.data, index, max_examples=20,
                                     process_index=0, process_count=1)
  seen = np.concatenate([b["index"][b["mask"]] for b in pipe])
  expected = labelled[np.linspace(0, labelled.size - 1, 20).round().astype(int)]
  np.testing.assert_array_equal(seen, expected)
  config.evals.train_subset.metrics = ("macro_f1", "loss")
  with pytest.raises(evaluator_lib.EvalConfigError, match="config.evals.train_subset.metrics"):
    evaluator_lib.specs_from_config(config)


def test_unknown_config_key_is_an_error(data_dir, tmp_path):
  proc = run_main(f"--config={TINY}:{data_dir}", f"--workdir={tmp_path}",
               "--config.train.lerning_rate=0.1", check=False)
  assert proc.returncode != 0
  assert "lerning_rate" in proc.stderr


def test_missing_data_dir_says_how_to_prepare(tmp_path):
  proc = run_main(f"--config={ROOT / 'configs' / 'abaw.py'}", f"--workdir={tmp_path / 'run'}",
               f"--config.data.data_dir={tmp_path / 'nowhere'}", check=False)
  assert proc.returncode == 1
  assert "python -m data_prep.build" in proc.stderr and "configs/demo.py" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_unreadable_init_file_names_the_key(data_dir, tmp_path):
  bad = tmp_path / "swin.safetensors"
  bad.write_bytes(b"not a checkpoint at all")
  proc = run_main(f"--config={TINY}:{data_dir}", f"--workdir={tmp_path / 'run'}",
               f"--config.model.image.init_file={bad}", check=False)
  assert proc.returncode == 1
  assert "model.image.init_file" in proc.stderr and str(bad) in proc.stderr
  assert "Traceback" not in proc.stderr


def test_init_file_loads_into_an_fsdp_sharded_state(data_dir, tmp_path):
  """model.image.init_file into a state sharded over an fsdp axis of 8 devices: the encoder
  holds the file's values exactly, every param keeps its sharding, and the EMA of the params
  starts from the loaded values."""
  config = tiny_config(data_dir)
  config.train.ema_decay = 0.9
  enc_cfg = model_lib.image_arch(config.model)   # a SwinConfig for the tiny config
  rng = np.random.default_rng(1)
  values = {p: rng.normal(size=s).astype(np.float32)
            for p, s in swin_import.expected_shapes(enc_cfg).items()}
  path = tmp_path / "image_encoder.safetensors"
  swin_import.save_params(str(path), values, enc_cfg)
  config.model.image.init_file = str(path)
  mesh = sharding.make_mesh((1, 8, 1))
  spec = state_lib.ModelSpec(config.model)
  tx, _ = optimizer.make_optimizer(config.train, 10)
  state, state_sh = state_lib.create_train_state(config, spec, tx, mesh)
  loaded = init_files.apply_init_files(config, spec, state)
  encoder = nnx.state(spec.merge(loaded.params).image_encoder, nnx.Param)
  got = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(encoder)}
  assert set(got) == set(values)
  split = 0
  for p, value in got.items():
    np.testing.assert_array_equal(np.asarray(value), values[p])
    split += not value.sharding.is_fully_replicated
  assert split > 10   # the fsdp axis really splits the encoder's kernels
  same = jax.tree.map(lambda a, s: a.sharding == s, loaded.params, state_sh.params)
  assert all(jax.tree.leaves(same))
  for ema, param in zip(jax.tree.leaves(loaded.ema_params), jax.tree.leaves(loaded.params),
                        strict=True):
    assert ema.sharding == param.sharding
    np.testing.assert_array_equal(np.asarray(ema), np.asarray(param))


def test_eval_mode_needs_only_the_eval_split_and_writes_beside_its_checkpoint(
    data_dir, tiny_run, tmp_path):
  """--mode=eval evaluates the best checkpoint (by the primary eval's macro-F1) with no train
  split present, equals the training run's own evaluation of that step, writes
  checkpoints/<step>/eval_validation.json and leaves config.json and eval/ untouched."""
  data = tmp_path / "validation_only"
  shutil.copytree(data_dir, data)
  shutil.rmtree(data / "train")
  (data / "train.index.npz").unlink()
  run = tmp_path / "run"
  shutil.copytree(tiny_run, run)
  kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  result = loop.evaluate_workdir(tiny_config(data), str(run))
  best = max(evaluation.read_evals(tiny_run), key=lambda e: e["macro_f1"])
  assert result["step"] == best["step"]
  assert {k: v for k, v in result.items() if k != "path"} == best
  written = run / "checkpoints" / str(best["step"]) / "eval_validation.json"
  assert result["path"] == str(written) and json.loads(written.read_text()) == best
  assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p != written} == kept


def test_rerunning_a_finished_run_reports_its_final_eval(data_dir, tiny_run, tmp_path):
  run = shutil.copytree(tiny_run, tmp_path / "run")   # tiny_run is read-only (conftest)
  before = sorted(p.name for p in (run / "checkpoints").iterdir())
  result = loop.train_and_evaluate(tiny_config(data_dir), str(run))
  assert result == evaluation.read_evals(run)[-1] and result["step"] == 12
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before

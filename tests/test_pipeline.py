"""Train/eval pipelines on a small fake dataset: content, hosts, workers, resume, errors, sharding."""

import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

from array_record.python import array_record_module
import grain
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mfer_jax.testing import fake_data
from mfer_jax import sharding
from mfer_jax.data import augment
from mfer_jax.data import config
from mfer_jax.data import pipeline
from mfer_jax.data import reader
from mfer_jax.data import records
from mfer_jax.data import sampling
from mfer_jax.data import store

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return fake_data.make_fake_dataset(
      tmp_path_factory.mktemp("data"), splits={"train": 6, "validation": 3, "test": 2},
      frames_per_video=(30, 50), invalid_fraction=0.1, no_face_fraction=0.1, seed=0)


def _cfg(data_dir, **overrides):
  cfg = config.default_data_config()
  cfg.data_dir = str(data_dir)
  cfg.batch_size = 8
  cfg.eval_batch_size = 6
  cfg.sampling.epoch_size = 48          # 6 steps per epoch: tests cross epoch boundaries
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def _train(cfg, process_index=0, process_count=1):
  return pipeline.make_train_iterator(cfg, store.load_split(cfg.data_dir, "train"),
                                      process_index=process_index, process_count=process_count)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _digest(batch):
  h = hashlib.sha256()
  for k in sorted(batch):
    h.update(k.encode())
    h.update(np.ascontiguousarray(batch[k]).tobytes())
  return h.hexdigest()


def _read_directly(index, i):
  """Record i decoded straight from its shard file, without the pipeline's reader."""
  shard = array_record_module.ArrayRecordReader(index.paths[index.video_id[i]])
  # The fake shards hold frames 1..n in order, so frame f is record f - 1.
  raw = shard.read([int(index.frame[i]) - 1])[0]
  shard.close()
  return records.decode_record(raw)


def test_default_config_matches_the_consumers():
  cfg = config.default_data_config()
  assert set(cfg.sampling.keys()) == {f.name for f in
                                      sampling.dataclasses.fields(sampling.SamplingOptions)}
  assert set(cfg.augment.keys()) == {f.name for f in
                                     augment.dataclasses.fields(augment.Augmenter)}


def test_train_batches_follow_the_epoch_draws(data_dir):
  cfg = _cfg(data_dir, **{"augment.enabled": False})
  index = store.load_split(data_dir, "train")
  it = _train(cfg)
  assert (it.steps_per_epoch, it.local_batch_size) == (6, 8)
  for step in range(8):   # into the second epoch
    batch = next(it)
    epoch, s = divmod(step, 6)
    rows = it.sampler.epoch_indices(epoch)[s * 8:(s + 1) * 8]
    assert batch["face"].shape == (8, 112, 112, 3) and batch["face"].dtype == np.uint8
    assert batch["mel"].shape == (8, 64, 100) and batch["mel"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["mask"].all()
    np.testing.assert_array_equal(batch["label"], index.label[rows])
    np.testing.assert_array_equal(batch["has_face"], index.has_face[rows])
    assert (batch["label"] >= 0).all()
    for j in (0, 7):
      ref = _read_directly(index, rows[j])
      np.testing.assert_array_equal(batch["face"][j], ref["face"])
      np.testing.assert_array_equal(batch["mel"][j], ref["mel"])
  assert it.step == 8 and it.epoch == 1


def test_hosts_read_disjoint_blocks_of_the_same_global_batches(data_dir):
  cfg = _cfg(data_dir)   # default augmentation on: seeded by position, not by host
  single = _take(_train(cfg), 7)
  for count in (2, 4):
    hosts = [_take(_train(cfg, p, count), 7) for p in range(count)]
    for step in range(7):
      for k in single[step]:
        np.testing.assert_array_equal(
            np.concatenate([h[step][k] for h in hosts]), single[step][k], err_msg=k)
  with pytest.raises(ValueError, match="multiple of the process count"):
    _train(cfg, 0, 3)
  with pytest.raises(ValueError, match="smaller than one global batch"):
    _train(_cfg(data_dir, **{"sampling.epoch_size": 4}))


def test_state_restore_and_class_f1_feedback(data_dir):
  cfg = _cfg(data_dir, **{"sampling.adaptive_beta": 2.0})
  index = store.load_split(data_dir, "train")
  f1 = [0.9, 0.1, 0.2, 0.0, 0.8, 0.6, 0.3, 0.9]
  it = _train(cfg)
  assert it.set_class_f1(f1) == 0        # at an epoch boundary: applies to the coming epoch
  first = _take(it, 2)
  assert it.set_class_f1([0.5] * 8) == 1  # mid-epoch: applies from the next epoch
  _take(it, 3)
  state = it.get_state()
  saved = json.loads(state)
  assert (saved["step"], saved["epoch"], saved["position"]) == (5, 0, 40)
  assert saved["class_f1_schedule"] == [[0, f1], [1, [0.5] * 8]]
  expected = _take(it, 4)                 # crosses into epoch 1
  restored = _train(cfg)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 4), expected)
  assert restored.step == 9 and restored.epoch == 1

  # Each epoch used the F1 in force for it, and the batches follow those draws.
  plain = _train(cfg).sampler
  for epoch, class_f1 in ((0, f1), (1, [0.5] * 8)):
    np.testing.assert_allclose(it.sampler.distribution(epoch)[1],
                               plain.with_class_f1(class_f1, 0).distribution(epoch)[1],
                               rtol=1e-12)
  assert not np.array_equal(it.sampler.epoch_indices(0), plain.epoch_indices(0))
  np.testing.assert_array_equal(first[0]["label"],
                                index.label[it.sampler.epoch_indices(0)[:8]])
  np.testing.assert_array_equal(expected[-1]["label"],
                                index.label[it.sampler.epoch_indices(1)[16:24]])  # step 8


_RESTORE_SCRIPT = """
import json, sys
from absl import flags
flags.FLAGS.mark_as_parsed()
import grain, ml_collections
import orbax.checkpoint as ocp
sys.path.insert(0, {tests!r})
import test_pipeline
from mfer_jax.data import pipeline, store

cfg = ml_collections.ConfigDict(json.loads({cfg!r}))
it = pipeline.make_train_iterator(cfg, store.load_split(cfg.data_dir, "train"),
                                  process_index=0, process_count=1)
mngr = ocp.CheckpointManager({ckpt!r})
mngr.restore(mngr.latest_step(),
             args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
print(json.dumps([test_pipeline._digest(next(it)) for _ in range({n})]))
"""


def test_orbax_checkpoint_restores_in_a_new_process(data_dir, tmp_path):
  cfg = _cfg(data_dir, **{"sampling.adaptive_beta": 1.0})
  it = _train(cfg)
  _take(it, 4)
  it.set_class_f1([0.3] * 8)
  _take(it, 4)                             # step 8: mid-epoch 1, after an F1 update
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(8, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  mngr.close()
  expected = [_digest(b) for b in _take(it, 5)]
  script = _RESTORE_SCRIPT.format(tests=str(REPO / "tests"), cfg=cfg.to_json(),
                                  ckpt=str(tmp_path / "ckpt"), n=5)
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


_NO_SIMD_SCRIPT = """
import json, sys
from absl import flags
flags.FLAGS.mark_as_parsed()
import cv2, ml_collections, numpy as np
sys.path.insert(0, {tests!r})
import test_pipeline
from mfer_jax.data import pipeline, store

# The switches below must have taken effect, or the comparison would prove nothing.
info = np.lib.introspect.opt_func_info(func_name="add|multiply|divide|floor_divide")
current = {{t["current"] for loops in info.values() for t in loops.values()}}
assert all(t.startswith("baseline") for t in current), current
assert not cv2.checkHardwareSupport(10) and not cv2.checkHardwareSupport(11)  # AVX, AVX2
cfg = ml_collections.ConfigDict(json.loads({cfg!r}))
it = pipeline.make_train_iterator(cfg, store.load_split(cfg.data_dir, "train"),
                                  process_index=0, process_count=1)
print(json.dumps([test_pipeline._digest(next(it)) for _ in range({n})]))
"""


def test_batches_are_the_same_bytes_without_simd(data_dir, tmp_path):
  """Data order and augmentation do not depend on the processor: rebuilt in a process whose
  NumPy, OpenCV and libjpeg-turbo vector code paths are switched off (as on an older CPU),
  the augmented train batches are the same bytes (docs/resume.md#what-is-deterministic)."""
  cfg = _cfg(data_dir, **{"sampling.stratify_chunk": 4})   # default augmentation is on
  expected = [_digest(b) for b in _take(_train(cfg), 7)]   # into the second epoch
  script = _NO_SIMD_SCRIPT.format(tests=str(REPO / "tests"), cfg=cfg.to_json(), n=7)
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
         # Every dispatched NumPy target above the baseline, on x86-64 and on Arm.
         "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR ASIMDHP ASIMDDP "
                                     "ASIMDFHM SVE",
         "OPENCV_CPU_DISABLE": "AVX,AVX2,FMA3,FP16", "JSIMD_FORCENONE": "1"}
  out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_eval_sees_every_valid_frame_once(data_dir, hosts):
  cfg = _cfg(data_dir)                     # global eval batch 6
  for split, selected in (("validation", lambda lab: lab >= 0),
                          ("test", lambda lab: np.ones(lab.shape, bool))):
    index = store.load_split(data_dir, split)
    want = np.flatnonzero(selected(index.label))
    if split == "validation":
      assert 0 < want.size < len(index)   # the fixture has -1 frames to skip
    pipes = [pipeline.make_eval_pipeline(cfg, index, process_index=p, process_count=hosts)
             for p in range(hosts)]
    n_batches = -(-want.size // 6)
    assert all(len(pp) == n_batches for pp in pipes)   # same count on every host
    per_host = [list(pp) for pp in pipes]
    assert all(len(b) == n_batches for b in per_host)
    rows = {k: np.concatenate([b[k] for bs in zip(*per_host) for b in bs])
            for k in per_host[0][0]}
    assert rows["label"].shape == (n_batches * 6,)
    assert rows["face"].shape[1:] == (112, 112, 3)
    real = rows["mask"]
    np.testing.assert_array_equal(rows["index"][real], want)   # in order, each exactly once
    np.testing.assert_array_equal(rows["label"][real], index.label[want])
    np.testing.assert_array_equal(rows["video_id"][real], index.video_id[want])
    np.testing.assert_array_equal(rows["frame"][real], index.frame[want])
    np.testing.assert_array_equal(rows["has_face"][real], index.has_face[want])
    pad = ~real
    assert pad.sum() == n_batches * 6 - want.size
    assert (rows["label"][pad] == -1).all() and (rows["index"][pad] == -1).all()
    assert (rows["video_id"][pad] == -1).all() and not rows["face"][pad].any()
    j = int(np.flatnonzero(real)[-1])
    ref = _read_directly(index, rows["index"][j])
    np.testing.assert_array_equal(rows["face"][j], ref["face"])   # no augmentation
    np.testing.assert_array_equal(rows["mel"][j], ref["mel"])


def test_worker_processes_give_the_same_batches(data_dir):
  cfg = _cfg(data_dir)
  expected = _take(_train(cfg), 5)
  it = _train(_cfg(data_dir, num_workers=2))
  try:
    _assert_batches_equal(_take(it, 5), expected)
  finally:
    it.close()


def _copy_dataset(data_dir, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(data_dir, dst)
  return dst


def test_truncated_shard_is_named(data_dir, tmp_path):
  dst = _copy_dataset(data_dir, tmp_path)
  index = store.load_split(dst, "validation")
  victim = index.paths[1]
  os.truncate(victim, os.path.getsize(victim) // 2)
  with pytest.raises(reader.ShardReadError, match="data_prep.build") as e:
    pipeline.make_eval_pipeline(_cfg(dst), index)
  assert victim in str(e.value) and "truncated" in str(e.value)


def test_corrupt_shard_is_named(data_dir, tmp_path):
  dst = _copy_dataset(data_dir, tmp_path)
  index = store.load_split(dst, "validation")
  victim = index.paths[0]
  raw = bytearray(pathlib.Path(victim).read_bytes())
  raw[200:400] = bytes(b ^ 0xFF for b in raw[200:400])   # inside the first record's chunk
  pathlib.Path(victim).write_bytes(bytes(raw))
  with pytest.raises(reader.ShardReadError, match="data_prep.build") as e:
    list(pipeline.make_eval_pipeline(_cfg(dst), index))
  assert f"record 0 of shard {victim}" in str(e.value)


@pytest.mark.parametrize("mesh_shape", [(-1, 1, 1), (2, 2, 2)])
def test_global_batch_sharding_and_content(data_dir, mesh_shape):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(mesh_shape)
  batch = next(_train(_cfg(data_dir, batch_size=16)))
  glob = pipeline.to_global_batch(batch, mesh)
  rows_per_shard = 16 // (mesh.shape["data"] * mesh.shape["fsdp"])
  for k, x in batch.items():
    g = glob[k]
    assert g.shape == x.shape and g.dtype == x.dtype
    assert g.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), x.ndim)
    np.testing.assert_array_equal(np.asarray(g), x)
    assert len(g.addressable_shards) == 8
    for shard in g.addressable_shards:
      assert shard.data.shape == (rows_per_shard,) + x.shape[1:]
      np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
  total = jax.jit(lambda b: jnp.sum(jnp.where(b["mask"], b["label"], 0)))(glob)
  assert int(total) == int(batch["label"].sum())
  with pytest.raises(ValueError, match="'label'"):
    pipeline.to_global_batch({"label": batch["label"][:6]}, mesh)


_HOST_SCRIPT = """
import hashlib, json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                           process_id=int(sys.argv[1]))
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from mfer_jax import sharding
from mfer_jax.data import pipeline, store

cfg = ml_collections.ConfigDict(json.loads({cfg!r}))
mesh = sharding.make_mesh((-1, 1, 1))
it = pipeline.make_train_iterator(cfg, store.load_split(cfg.data_dir, "train"))
out = {{"local_batch": it.local_batch_size, "train": []}}
for _ in range(2):
  full = multihost_utils.process_allgather(pipeline.to_global_batch(next(it), mesh), tiled=True)
  out["train"].append({{k: hashlib.sha256(np.asarray(v).tobytes()).hexdigest()
                       for k, v in full.items()}})
ev = pipeline.make_eval_pipeline(cfg, store.load_split(cfg.data_dir, "validation"))
index = []
for local in ev:
  g = multihost_utils.process_allgather(pipeline.to_global_batch(local, mesh), tiled=True)
  index.extend(np.asarray(g["index"])[np.asarray(g["mask"])].tolist())
out["eval_index"] = index
print(json.dumps(out))
"""


def test_two_real_processes_build_the_single_host_global_batches(data_dir, tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  cfg = _cfg(data_dir, eval_batch_size=16)   # global batches must split over 8 devices
  script = _HOST_SCRIPT.format(port=port, cfg=cfg.to_json())
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", script, str(p)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for p in range(2)]
  outs = [p.communicate(timeout=180) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
  expected = [{k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
               for k, v in b.items()} for b in _take(_train(cfg), 2)]
  val = store.load_split(data_dir, "validation")
  for r in results:
    assert r["local_batch"] == 4
    assert r["train"] == expected
    assert r["eval_index"] == np.flatnonzero(val.label >= 0).tolist()

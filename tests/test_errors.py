"""Every command on every bad input: one ``error:`` line naming the culprit, the documented exit
code (1 data or run error, 2 usage error), and no traceback.

The commands run as a user runs them, each in its own process (`tests/commands.py`), several
at a time: most of their time is importing JAX.
"""

import concurrent.futures
import json
import pathlib
import shutil

import numpy as np
import pytest

from conftest import TESTS
from mfer_jax import evaluation
from mfer_jax.data import store
from mfer_jax.models import swin, swin_import
from mfer_jax.training import run_status
import commands

ROOT = TESTS.parent
TINY = TESTS / "configs" / "tiny.py"
SWEEP = TESTS / "configs" / "tiny_sweep.py"


def _damage_record(path: str) -> None:
  """Flips bytes inside the first record's chunk: the shard opens, that record cannot be read."""
  raw = bytearray(pathlib.Path(path).read_bytes())
  raw[200:400] = bytes(b ^ 0xFF for b in raw[200:400])
  pathlib.Path(path).write_bytes(bytes(raw))


def _insert_bytes(path: str) -> None:
  raw = bytearray(pathlib.Path(path).read_bytes())
  raw[300:300] = b"\0" * 64
  pathlib.Path(path).write_bytes(bytes(raw))


def _truncate(path: str) -> None:
  raw = pathlib.Path(path).read_bytes()
  pathlib.Path(path).write_bytes(raw[:len(raw) // 2])


def _dataset(src, dst, split, damage):
  shutil.copytree(src, dst)
  victim = store.load_split(dst, split).paths[0]
  damage(victim)
  return dst, pathlib.Path(victim).name


def _truncated_arrays_run(tiny_run, dst, step):
  """A copy of the tiny run whose checkpoint ``step`` has every array file cut in half (the
  damage that leaves Orbax's other pending reads to be garbage-collected)."""
  shutil.copytree(tiny_run, dst)
  for path in (dst / "checkpoints" / str(step) / "state" / "ocdbt.process_0" / "d").iterdir():
    _truncate(str(path))
  return dst


def _unreadable_run(tiny_run, dst):
  """A copy of the tiny run whose every checkpoint lost its manifest."""
  shutil.copytree(tiny_run, dst)
  for step in (6, 8, 12):
    (dst / "checkpoints" / str(step) / "state" / "manifest.ocdbt").unlink()
  return dst


@pytest.fixture(scope="module")
def cases(tiny_run, tiny_data_dir, tmp_path_factory):
  """(name, command, args, exit code, fragments of the error line)."""
  tmp = tmp_path_factory.mktemp("bad_inputs")
  data = tiny_data_dir
  work = lambda name: str(tmp / name)  # noqa: E731 a fresh workdir per case
  inserted, inserted_name = _dataset(data, tmp / "inserted", "train", _insert_bytes)
  overwritten, overwritten_name = _dataset(data, tmp / "overwritten", "train", _damage_record)
  truncated, truncated_name = _dataset(data, tmp / "truncated", "validation", _truncate)
  bad_eval = tmp / "bad_eval_run"
  shutil.copytree(tiny_run, bad_eval)
  (bad_eval / "eval" / "6.json").write_text('{"step": 6, "macro_f')
  not_an_eval = tmp / "not_an_eval_run"   # parses as JSON, but is no evaluation result
  shutil.copytree(tiny_run, not_an_eval)
  (not_an_eval / "eval" / "6.json").write_text("[]")
  no_per_class = tmp / "no_per_class_run"
  shutil.copytree(tiny_run, no_per_class)
  for step in (6, 12):
    path = no_per_class / "eval" / f"{step}.json"
    result = json.loads(path.read_text())
    del result["per_class_f1"]
    path.write_text(json.dumps(result))
  best = max(evaluation.read_evals(tiny_run), key=lambda e: e["macro_f1"])["step"]
  a_file = tmp / "a_file"
  a_file.write_text("")
  swin_cfg = swin.swin_config("test", img_size=(32, 32), window_size=4)
  weights = tmp / "weights.safetensors"
  swin_import.save_params(str(weights), {
      p: np.zeros(s, np.float32)
      for p, s in swin_import.expected_shapes(swin_cfg).items()}, swin_cfg)
  main = "main.py"
  config = f"--config={TINY}:{data}"
  no_checkpoint = "no readable checkpoint"
  return [
      # Config keys, values and arguments: usage errors (2) with the key and a hint.
      ("misspelt key", main, (config, f"--workdir={work('a')}",
                              "--config.train.lerning_rate=0.1"), 2,
       ("lerning_rate", "did you mean 'learning_rate'")),
      ("unknown section", main, (config, f"--workdir={work('b')}", "--config.nosuch.key=1"), 2,
       ("--config.nosuch.key=1", "unknown config key 'nosuch'")),
      ("bad config argument", main, ("--config=configs/demo.py:fusoin=mfm",
                                     f"--workdir={work('c')}"), 2,
       ("fusoin=mfm", "did you mean 'fusion'")),
      ("bad config value", main, (config, f"--workdir={work('d')}",
                                  "--config.train.learning_rate=fast"), 2,
       ("--config.train.learning_rate=fast",)),
      ("bad class_weights", main, (config, f"--workdir={work('e')}",
                                   "--config.train.class_weights=square"), 2,
       ("train.class_weights='square'",)),
      ("bad mode", main, (config, f"--workdir={work('f')}", "--mode=evl"), 2, ("--mode",)),
      # Damaged data: the shard is named, with the fix.
      ("train shard with bytes inserted", main, (f"--config={TINY}:{inserted}",
                                                 f"--workdir={work('g')}"), 1,
       (inserted_name, "data_prep.build")),
      ("train shard with bytes overwritten", main, (f"--config={TINY}:{overwritten}",
                                                    f"--workdir={work('h')}"), 1,
       ("record 0 of shard", overwritten_name, "data_prep.build")),
      ("validation shard truncated", main, (f"--config={TINY}:{truncated}",
                                            f"--workdir={work('i')}"), 1,
       (truncated_name, "data_prep.build")),
      # Checkpoints none of which can be read: never a fresh start over them.
      ("unreadable checkpoints, train", main, (config, "--workdir="
                                               f"{_unreadable_run(tiny_run, tmp / 'u1')}"), 1,
       (no_checkpoint, "12.corrupt")),
      ("unreadable checkpoints, eval", main, (config, "--mode=eval", "--workdir="
                                              f"{_unreadable_run(tiny_run, tmp / 'u2')}"), 1,
       (no_checkpoint,)),
      ("eval without checkpoints", main, (config, "--mode=eval", f"--workdir={work('j')}"), 1,
       ("has no checkpoint to evaluate",)),
      ("unreadable checkpoints, predict", "mfer_jax.tools.predict", (
          f"--workdir={_unreadable_run(tiny_run, tmp / 'u3')}", f"--video={tmp / 'x.mp4'}"), 1,
       (no_checkpoint,)),
      # A damaged newest (for eval and predict: best) checkpoint: one warning line, then the
      # previous one is used (the 'warned' cases below).
      ("truncated arrays, resumed", main, (config, "--workdir="
                                           f"{_truncated_arrays_run(tiny_run, tmp / 't1', 12)}"),
       0, ()),
      ("truncated arrays, eval", main, (config, "--mode=eval", "--workdir="
                                        f"{_truncated_arrays_run(tiny_run, tmp / 't2', best)}"),
       0, ()),
      ("truncated arrays, predict", "mfer_jax.tools.predict", (
          f"--workdir={_truncated_arrays_run(tiny_run, tmp / 't3', best)}",
          f"--video={tmp / 'x.mp4'}"), 1, ("--video=", "no such file")),
      ("predict without a workdir", "mfer_jax.tools.predict", (
          f"--workdir={tmp / 'nowhere'}", f"--video={tmp / 'x.mp4'}"), 1, ("config.json",)),
      ("report on a damaged eval", "mfer_jax.tools.report", (f"--workdir={bad_eval}",), 1,
       ("eval/6.json", "cannot be read")),
      ("report on an eval that is no result", "mfer_jax.tools.report", (
          f"--workdir={not_an_eval}",), 1, ("eval/6.json", "not an evaluation result")),
      ("report on evals without per-class F1", "mfer_jax.tools.report", (
          f"--workdir={no_per_class}",), 1, ("per_class_f1", "cannot be read")),
      ("report into a file", "mfer_jax.tools.report", (
          f"--workdir={tiny_run}", f"--out={a_file / 'report'}"), 1,
       ("cannot make the report folder", "a_file")),
      # Not an error: the report reads JSON files only, never the checkpoints.
      ("report on damaged checkpoints", "mfer_jax.tools.report", (
          f"--workdir={_unreadable_run(tiny_run, tmp / 'u4')}",), 0, ()),
      ("ablate with a misspelt override", "mfer_jax.tools.ablate", (
          f"--config={SWEEP}", f"--workdir={work('k')}", f"--override=data.data_dir={data}",
          "--override=train.lerning_rate=0.1", "--dry_run"), 2,
       ("train.lerning_rate", "did you mean 'learning_rate'")),
      ("ablate with an unknown fusion", "mfer_jax.tools.ablate", (
          f"--config={SWEEP}", f"--workdir={work('l')}", "--sweep=mfm,fusoin", "--dry_run"), 2,
       ("fusoin",)),
      ("convert a missing file", "mfer_jax.tools.convert", (
          f"--in={tmp / 'missing.pth'}", f"--out={tmp / 'o.safetensors'}"), 1,
       ("missing.pth",)),
      ("convert into a file's folder", "mfer_jax.tools.convert", (
          f"--in={weights}", "--variant=test", "--img_size=32,32", "--window=4",
          f"--out={a_file / 'w.safetensors'}"), 1, ("--out=", "cannot write it")),
      ("convert to a non-safetensors name", "mfer_jax.tools.convert", (
          f"--in={weights}", f"--out={tmp / 'o.pth'}"), 2, ("--out=",)),
      ("build from a missing root", "data_prep.build", (
          f"--root={tmp / 'no_root'}", f"--out={tmp / 'built'}", "--workers=1"), 1,
       ("no_root", "data_prep/README.md")),
      ("tfds build from a missing root", "data_prep.tfds_affwild2", (
          f"--manual_dir={tmp / 'no_root'}", f"--data_dir={tmp / 'tfds'}"), 1,
       ("no_root", "data_prep/README.md")),
      ("extract a misspelt split", "mfer_jax.tools.extract", (
          "--config=configs/abaw_features.py", f"--out={tmp / 'features'}",
          "--splits=train,validaton"), 2, ("validaton", "did you mean 'validation'")),
      ("synth with too few videos", "data_prep.synth", (
          f"--out={tmp / 'synth'}", "--num_videos=1"), 2, ("num_videos",)),
      # Not an error: convert creates the missing folder of --out.
      ("convert into a missing folder", "mfer_jax.tools.convert", (
          f"--in={weights}", "--variant=test", "--img_size=32,32", "--window=4",
          f"--out={tmp / 'new' / 'folder' / 'w.safetensors'}"), 0, ()),
  ]


# What a failed checkpoint restore's leftover reads print when nothing drops them
# (checkpointing._silence_failed_restore_leftovers).
NOISE = ("Exception ignored in", "exception was never retrieved", "was never awaited")


def test_every_command_turns_each_bad_input_into_one_line(cases, tmp_path):
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    procs = list(pool.map(lambda c: commands.run(c[1], *c[2], cwd=ROOT), cases))
  # Cases that fall back past a damaged checkpoint: the one warning line they print.
  warned = {"truncated arrays, resumed": ("step 12", "12.corrupt"),
            "truncated arrays, eval": (".corrupt",), "truncated arrays, predict": (".corrupt",)}
  failures = []
  for (name, _, _, code, fragments), proc in zip(cases, procs):
    try:
      if code == 0:
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
      else:
        commands.assert_user_error(proc, code, *fragments)
      noise = [n for n in NOISE if n in proc.stderr]
      assert not noise, (noise, proc.stderr[-2000:])
      if name in warned:
        lines = [l for l in proc.stderr.splitlines() if "cannot be read" in l]
        assert len(lines) == 1 and all(f in lines[0] for f in warned[name]), proc.stderr[-2000:]
    except AssertionError as e:
      failures.append(f"{name}: {e}")
  assert not failures, "\n\n".join(failures)
  # The resumed run went on from step 8 to the end; --mode=eval evaluated the next best step.
  resumed = pathlib.Path([c for c in cases if c[0] == "truncated arrays, resumed"][0][2][1]
                         .split("=", 1)[1])
  assert run_status.finished(resumed)["step"] == 12
  assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == [
      "12", "12.corrupt", "6", "8"]
  converted = [c for c in cases if c[0] == "convert into a missing folder"][0]
  assert pathlib.Path(converted[2][-1].split("=", 1)[1]).is_file()
  # A failed run never looks preempted.
  for c in cases:
    workdir = [a.split("=", 1)[1] for a in c[2] if a.startswith("--workdir=")]
    if c[1] == "main.py" and workdir and pathlib.Path(workdir[0]).is_dir():
      assert not run_status.preempted(workdir[0])

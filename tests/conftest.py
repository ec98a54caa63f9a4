"""Test-wide set-up: 8 fake CPU devices, float32 matmuls, parsed absl flags."""

import os

# Must happen before jax is imported anywhere: sharding tests need 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU aborts the process when a device waits more than 40 s for the others at a
# collective. The 8 fake devices are threads sharing the machine's cores, so on a loaded
# machine one of them can lag that long and an innocent eval step dies. Raise the limit (the
# Makefile's `make test` sets the same); the subprocesses tests start inherit it.
_COLLECTIVE_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds=600"
if "collective_call_terminate_timeout" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + _COLLECTIVE_TIMEOUT
# Compiling is most of the suite's time and the programs are tiny: skip LLVM's optimisation
# passes, as the Makefile does (its comment has the measurement).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

from absl import flags  # pylint: disable=g-import-not-at-top

# Grain's multiprocess workers read absl flags; outside app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()

# Compiled executables are cached on disk and shared with the subprocesses some tests start
# (main.py runs), so each distinct program compiles once per machine instead of once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import contextlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import fcntl  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import shutil  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import schedule  # pylint: disable=g-import-not-at-top,wrong-import-position

TESTS = pathlib.Path(__file__).resolve().parent


def pytest_configure(config):
  # Under xdist, hand out files in the collected order (below), not xdist's default of the
  # files with the most tests first.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  """Longest files first (tests/schedule.py), each file's tests in their written order."""
  items.sort(key=lambda item: -schedule.file_seconds(item.path.name))


@contextlib.contextmanager
def _built_once(tmp_path_factory, name):
  """Yields (directory, whether it still has to be built) for a session-wide directory.

  Under pytest-xdist every worker has its own session, so a session fixture would be built
  once per worker; the directory is instead built by the first worker that asks, under a
  lock, in the run's temporary root that all workers share, and read by the others. Tests
  must treat it as read-only (copy it to change it). Without xdist it is an ordinary
  temporary directory.
  """
  if "PYTEST_XDIST_WORKER" not in os.environ:
    yield tmp_path_factory.mktemp(name), True
    return
  root = tmp_path_factory.getbasetemp().parent   # this run's, shared by its workers
  path, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
    if done.exists():
      yield path, False
      return
    shutil.rmtree(path, ignore_errors=True)   # a previous worker's failed attempt
    path.mkdir()
    yield path, True
    done.touch()


def tiny_config(data_dir):
  """tests/configs/tiny.py on ``data_dir``: test-size Swins, 12 steps."""
  sys.path.insert(0, str(TESTS / "configs"))
  import tiny  # pylint: disable=g-import-not-at-top
  return tiny.get_config(str(data_dir))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """The small fake prepared dataset most training-side tests read (one per run, read-only)."""
  from mfer_jax.testing import fake_data  # pylint: disable=g-import-not-at-top
  with _built_once(tmp_path_factory, "tiny_data") as (d, build):
    if build:
      fake_data.make_fake_dataset(d, splits={"train": 4, "validation": 2},
                                  frames_per_video=60, mel_shape=(16, 32), face_size=32,
                                  invalid_fraction=0.1, no_face_fraction=0.1, seed=0)
  return d


@pytest.fixture(scope="session")
def data_dir(tiny_data_dir):
  """`tiny_data_dir` under the name the training tests use (a module may define its own)."""
  return tiny_data_dir


@pytest.fixture(scope="session")
def tiny_run(tiny_data_dir, tmp_path_factory):
  """One finished 12-step tiny training run (evals at steps 6 and 12), shared by the tools'
  tests (report, predict, performance metrics), so the suite trains it once. It also traces
  steps 3 and 4 with the profiler (train.profile_steps). Read-only: tests copy it to change
  it, since under xdist both workers read this one run."""
  from mfer_jax.training import loop  # pylint: disable=g-import-not-at-top
  with _built_once(tmp_path_factory, "tiny_run") as (run, build):
    if build:
      config = tiny_config(tiny_data_dir)
      config.train.profile_steps = "3:5"
      loop.train_and_evaluate(config, str(run))
  return run

"""Test-wide set-up: 8 fake CPU devices, float32 matmuls, parsed absl flags."""

import os

# Must happen before jax is imported anywhere: sharding tests need 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # pylint: disable=g-import-not-at-top

# Grain's multiprocess workers read absl flags; outside app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()

# Compiled executables are cached on disk and shared with the subprocesses some tests start
# (main.py runs), so each distinct program compiles once per machine instead of once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

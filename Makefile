# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: demo test bench clean-venv

# Re-install whenever setup.py changes. The install log is kept because pip's local-index
# warnings are noisy; it is printed when the install fails.
$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing mfer-jax and its test extras into $(VENV) (about 2 minutes on a fresh machine)..."
	@$(BIN)/pip install -e ".[test]" > $(VENV)/install.log 2>&1 || (tail -n 40 $(VENV)/install.log; exit 1)
	@touch $@

demo: $(STAMP)
	$(BIN)/python main.py --config=configs/demo.py --workdir=$(WORKDIR)

# 8 fake CPU devices for the sharding tests. They are threads sharing the cores, so on a busy
# machine one can lag behind the others at a collective for longer than XLA:CPU's 40 s
# default, which then aborts the process: the timeout is raised to 10 minutes. The tests'
# programs are tiny and compiling them is most of the suite's time, so LLVM's optimisation
# passes are skipped (level 0): measured on this 2-core machine, 411 passed in 1,190 s against
# 1,448 s at the default level; compile of the tiny train step 23.4 against 39.7 CPU s.
TEST_XLA_FLAGS := --xla_force_host_platform_device_count=8 \
	--xla_cpu_collective_call_terminate_timeout_seconds=600 --xla_backend_optimization_level=0

# Two pytest workers (pytest-xdist), one test file per worker at a time so a file's module
# fixtures are built once. Much of the suite is single-threaded XLA compilation, which the
# second worker overlaps: on the 2-core development machine the suite took 27.7 min against
# 35.6 in one process (dbb3766, README, Tests). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	XLA_FLAGS="$(TEST_XLA_FLAGS)" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

clean-venv:
	rm -rf $(VENV)

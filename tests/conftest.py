"""Shared test settings: small CPU runs, deterministic."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")


# Most of the suite's time is XLA compiling the same programs (a mechanism at the test games' shape, a round
# at the tests' pool) in different test files, which xdist runs in different processes: JAX's persistent
# compilation cache lets a program compiled by one worker be loaded by the other (measured: test_baselines.py
# takes ~45% less CPU after test_misreport/test_outcomes/test_leader ran). Results are the same executables.
# The first process of a run (the xdist controller) makes the folder; workers and the programs tests start
# inherit it through the environment; the process that made it removes it when the run ends. An explicitly
# set JAX_COMPILATION_CACHE_DIR is kept (and never removed).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fcfn_jax-test-jit-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402  (after XLA_FLAGS: the device count is read when jax starts)
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Runs a test with float64 enabled (``jax.enable_x64``), leaving the global flag alone."""
  with jax.enable_x64(True):
    yield


# The longest files first (measured with --durations on 2 cores), the rest in collection order: under
# `pytest -n 2 --dist loadfile` a long file started last leaves the other worker idle at the end.
LONGEST_FIRST = (
  "test_federated.py",
  "test_simulation.py",
  "test_solver.py",
  "test_misreport.py",
  "test_baselines.py",
  "test_leader.py",
  "test_accounting.py",
  "test_sharding.py",
  "test_replicas.py",
  "test_per_example.py",
  "test_sweep.py",
  "test_study.py",
  "test_audit.py",
  "test_outcomes.py",
  "test_cli.py",
  "test_inversion.py",
  "test_tuning.py",
  "test_clipping.py",
  "test_checkpoint.py",
  "test_multihost.py",
  "test_models.py",
  "test_equilibrium.py",
  "test_robustness.py",
  "test_valuation.py",
  "test_data.py",
  "test_distributed.py",
)


def pytest_collection_modifyitems(items):
  """Runs the files of ``LONGEST_FIRST`` first, in that order (a stable sort: tests keep their order)."""
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session):
  """The run's compilation cache goes with the run (removed by the process that made it)."""
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)

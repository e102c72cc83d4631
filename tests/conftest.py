"""Shared test settings: small CPU runs, deterministic."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")


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

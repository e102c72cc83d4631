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

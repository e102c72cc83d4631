"""epsilon <-> noise: the differentiable surrogate, dp-accounting, the ledger and the calibration."""

from __future__ import annotations

import functools
import math
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from dp_accounting.rdp import rdp_privacy_accountant

from fcfn_jax.privacy import accounting
from fcfn_jax.validate import ConfigError

# Surrogate budgets where the surrogate is documented to upper-bound the accountants.
CONSERVATIVE_RANGE = (0.02, 220.0)


def _random_run(rng: np.random.Generator) -> tuple[float, int, float, float]:
  """(q, steps, z, delta): q in (0, 1] with q = 1 a third of the time, steps 1..1000, z 0.5..20."""
  q = float(rng.choice([1.0, rng.uniform(1e-3, 1.0), 10 ** rng.uniform(-3, 0)]))
  steps = int(np.exp(rng.uniform(0, math.log(1000))))
  z = float(np.exp(rng.uniform(math.log(0.5), math.log(20))))
  return q, steps, z, float(10 ** rng.uniform(-9, -3))


def _check_calibrated(z, eps, q, steps, delta, accountant, rtol):
  """The calibration's guarantee, checked by the accountant itself at every client."""
  for zi, ei, qi in zip(z, eps, np.broadcast_to(q, np.shape(eps))):
    if ei == 0:
      assert zi == np.inf
      continue
    spent = accounting.accountant_epsilon(zi, qi, steps, delta, accountant)
    assert spent <= ei, (zi, ei, qi, spent)
    if spent < ei * (1 - rtol):  # Allowed only where one lattice step down already exceeds eps_i.
      below = accounting.accountant_epsilon(zi / (1 + rtol / 4), qi, steps, delta, accountant)
      assert below > ei, (zi, ei, qi, spent, below)


class SurrogateTest(chex.TestCase):
  def test_closed_form_inverse_round_trips_in_float64(self):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
      for _ in range(20):
        steps, delta = int(rng.integers(1, 100_000)), float(10 ** rng.uniform(-12, -0.3))
        z = jnp.asarray(np.exp(rng.uniform(math.log(0.05), math.log(1e3), 64)))
        eps = accounting.surrogate_epsilon(z, steps, delta)
        chex.assert_trees_all_close(accounting.surrogate_noise_multiplier(eps, steps, delta), z, rtol=1e-12)
        chex.assert_trees_all_close(accounting.noise_variance(eps, steps, delta), z**2, rtol=1e-11)

  def test_closed_form_is_the_optimal_order_rdp_bound(self):
    # eps(z) = min over alpha > 1 of k alpha / (2 z^2) + log(1/delta) / (alpha - 1).
    alpha = 1 + np.exp(np.linspace(math.log(1e-4), math.log(1e5), 400_001))
    for steps, z, delta in ((1, 1.0, 1e-5), (1000, 0.7, 1e-6), (50, 20.0, 1e-3), (10_000, 3.0, 0.1)):
      grid_min = np.min(steps * alpha / (2 * z * z) + math.log(1 / delta) / (alpha - 1))
      with jax.enable_x64(True):
        closed = float(accounting.surrogate_epsilon(z, steps, delta))
      np.testing.assert_allclose(closed, grid_min, rtol=1e-8)

  def test_zero_budget_is_infinite_noise_with_zero_gradient(self):
    eps = jnp.array([0.0, 0.5, 4.0])
    for fn in (accounting.surrogate_noise_multiplier, accounting.noise_variance):
      value = fn(eps, 100, 1e-5)
      assert value[0] == jnp.inf and bool(jnp.all(jnp.isfinite(value[1:])))
      grad = jax.jit(jax.grad(lambda e, fn=fn: jnp.sum(jnp.where(e > 0, fn(e, 100, 1e-5), 0.0))))(eps)
      assert bool(jnp.all(jnp.isfinite(grad))) and grad[0] == 0 and bool(jnp.all(grad[1:] < 0))
    self.assertEqual(float(accounting.surrogate_epsilon(jnp.inf, 100, 1e-5)), 0.0)

  def test_gradient_matches_finite_differences_in_float64(self):
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
      for _ in range(10):
        steps, delta = int(rng.integers(1, 5000)), float(10 ** rng.uniform(-9, -2))
        eps = float(np.exp(rng.uniform(math.log(0.01), math.log(50))))
        for fn in (accounting.surrogate_noise_multiplier, accounting.noise_variance):
          f = functools.partial(fn, steps=steps, delta=delta)
          h = 1e-6 * eps
          fd = (f(eps + h) - f(eps - h)) / (2 * h)
          grad = jax.grad(f)(eps)
          assert np.isfinite(grad)
          np.testing.assert_allclose(grad, fd, rtol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_matches_eager(self):
    eps = jnp.array([0.0, 0.1, 1.0, 8.0, 300.0])
    for fn in (accounting.surrogate_noise_multiplier, accounting.noise_variance):
      fast = self.variant(functools.partial(fn, steps=250, delta=1e-5))
      chex.assert_trees_all_close(fast(eps), fn(eps, 250, 1e-5), rtol=1e-6)
    z = jnp.array([0.3, 1.0, jnp.inf])
    chex.assert_trees_all_close(
      self.variant(functools.partial(accounting.surrogate_epsilon, steps=250, delta=1e-5))(z),
      accounting.surrogate_epsilon(z, 250, 1e-5),
      rtol=1e-6,
    )

  def test_vmap_over_clients_and_games(self):
    eps = jnp.linspace(0.0, 8.0, 12).reshape(3, 4)
    z = jax.vmap(functools.partial(accounting.surrogate_noise_multiplier, steps=40, delta=1e-5))(eps)
    chex.assert_trees_all_close(z, accounting.surrogate_noise_multiplier(eps, 40, 1e-5))
    chex.assert_shape(z, (3, 4))


class ConservativeTest(chex.TestCase):
  """docs/model.md: the surrogate is never below the accountant's epsilon (in its documented range)."""

  @parameterized.parameters(0.5, 1e-2, 1e-5, 1e-7, 1e-9)
  def test_full_batch_rdp_exhaustively(self, delta):
    # At q = 1 both sides depend only on delta and beta = alpha* - 1 = z sqrt(2 log(1/delta) / k):
    # surrogate = L (1 + 2 beta) / beta^2, RDP at order a = a L / beta^2 (L = log(1/delta)).
    orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    log_inv = math.log(1 / delta)
    for beta in np.exp(np.linspace(math.log(0.05), math.log(5000), 3000)):
      surrogate = log_inv * (1 + 2 * beta) / beta**2
      if CONSERVATIVE_RANGE[0] <= surrogate <= CONSERVATIVE_RANGE[1]:
        rdp, _ = rdp_privacy_accountant.compute_epsilon(orders, orders * log_inv / beta**2, delta)
        assert rdp <= surrogate, (beta, surrogate, rdp)

  @parameterized.parameters("rdp", "pld")
  def test_randomized_runs(self, accountant):
    rng = np.random.default_rng(2 if accountant == "rdp" else 3)
    compared = 0
    while compared < (30 if accountant == "rdp" else 12):
      q, steps, z, delta = _random_run(rng)
      surrogate = float(accounting.surrogate_epsilon(z, steps, delta))
      if not CONSERVATIVE_RANGE[0] <= surrogate <= CONSERVATIVE_RANGE[1]:
        continue
      compared += 1
      exact = accounting.accountant_epsilon(z, q, steps, delta, accountant)
      assert exact <= surrogate, (q, steps, z, delta, surrogate, exact)

  def test_known_failure_beyond_the_range(self):
    # Budget ~2300: the continuous optimal order 1.07 lies below dp-accounting's smallest order 1.1.
    surrogate = float(accounting.surrogate_epsilon(0.5, 1000, 1e-5))
    rdp = accounting.accountant_epsilon(0.5, 1.0, 1000, 1e-5, "rdp")
    np.testing.assert_allclose([surrogate, rdp], [2303.49, 2311.78], atol=0.01)


class LedgerTest(chex.TestCase):
  def test_rdp_ledger_equals_the_full_accountant(self):
    # The ledger evaluates only the orders that can attain the minimum; it must not change the value.
    rng = np.random.default_rng(4)
    for _ in range(10):
      q, steps, _, delta = _random_run(rng)
      z = np.exp(rng.uniform(math.log(0.5), math.log(20), 2))
      spent = accounting.epsilon_spent(z, q, steps, delta)
      full = [accounting.accountant_epsilon(zi, q, steps, delta) for zi in z]
      np.testing.assert_allclose(spent, full, rtol=1e-12)

  @parameterized.parameters("rdp", "pld")
  def test_per_client_steps_and_silent_clients(self, accountant):
    z = np.array([1.1, np.inf, 0.9, 2.0])
    q = np.array([0.02, 0.02, 0.05, 1.0])
    t = np.array([300, 300, 0, 40])
    spent = accounting.epsilon_spent(z, q, t, 1e-5, accountant)
    chex.assert_shape(spent, (4,))
    self.assertEqual(spent[1], 0.0)
    self.assertEqual(spent[2], 0.0)
    for i in (0, 3):
      self.assertAlmostEqual(
        spent[i], accounting.accountant_epsilon(z[i], q[i], int(t[i]), 1e-5, accountant), places=10
      )

  def test_monotone_in_noise_steps_and_rate(self):
    spent = accounting.epsilon_spent(np.array([0.7, 1.0, 1.5, 3.0]), 0.05, 200, 1e-5)
    assert np.all(np.diff(spent) < 0)
    spent = accounting.epsilon_spent(1.0, 0.05, np.array([1, 10, 100, 1000]), 1e-5)
    assert np.all(np.diff(spent) > 0)
    spent = accounting.epsilon_spent(1.0, np.array([0.001, 0.01, 0.1, 1.0]), 100, 1e-5)
    assert np.all(np.diff(spent) > 0)


class CalibrationTest(chex.TestCase):
  @parameterized.parameters((1, 0), (50, 1), (1000, 2))
  def test_rdp_is_admissible_and_tight(self, steps, seed):
    rng = np.random.default_rng(10 + seed)
    eps = np.concatenate([[0.0, 0.0], np.exp(rng.uniform(math.log(0.1), math.log(10), 16))])
    q = rng.choice([0.004, 0.02, 0.1, 0.5, 1.0], eps.size)
    q[:6] = rng.uniform(0.01, 0.3, 6)  # Some clients with a sampling rate of their own.
    delta = float(10 ** rng.uniform(-8, -4))
    z = accounting.calibrate_noise_multipliers(eps, q, steps, delta, "rdp")
    chex.assert_shape(z, eps.shape)
    _check_calibrated(z, eps, q, steps, delta, "rdp", 1e-3)

  def test_pld_is_admissible_and_tight(self):
    eps = np.array([0.0, 0.3, 1.0, 2.5, 6.0, 9.0])
    q = np.array([0.02, 0.02, 0.05, 1.0, 0.05, 0.3])
    z = accounting.calibrate_noise_multipliers(eps, q, 100, 1e-5, "pld", rtol=1e-3)
    _check_calibrated(z, eps, q, 100, 1e-5, "pld", 1e-3)
    # PLD is tighter than RDP, so it needs less noise.
    z_rdp = accounting.calibrate_noise_multipliers(eps, q, 100, 1e-5, "rdp")
    assert np.all(z[1:] < z_rdp[1:])

  def test_monotone_and_deduplicated(self):
    eps = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 4.0, 1.0])
    z = accounting.calibrate_noise_multipliers(eps, 0.02, 500, 1e-5)
    assert np.all(np.diff(z[:5]) > 0)
    self.assertEqual(z[1], z[5])
    self.assertEqual(z[3], z[6])

  def test_coarser_tolerance(self):
    eps = np.array([0.5, 3.0])
    z = accounting.calibrate_noise_multipliers(eps, 0.05, 200, 1e-6, rtol=0.05)
    _check_calibrated(z, eps, 0.05, 200, 1e-6, "rdp", 0.05)

  @pytest.mark.slow
  def test_timing_thousands_of_clients(self):
    # Distinct budgets; sampling rates shared, or q_i = 16 / n_i for ~200 distinct client sizes n_i.
    rng = np.random.default_rng(30)
    for n, accountant in ((1000, "rdp"), (10_000, "rdp"), (1000, "pld")):
      eps = rng.uniform(0.5, 8.0, n)
      rates = (("one rate", np.full(n, 0.02)), ("~200 rates", 16 / rng.integers(50, 250, n)))
      for label, q in rates[:1] if accountant == "pld" else rates:
        start = time.perf_counter()
        z = accounting.calibrate_noise_multipliers(eps, q, 500, 1e-5, accountant)
        print(f"calibrate {n} clients, {label}, {accountant}: {time.perf_counter() - start:.1f} s")
        idx = rng.choice(n, 5, replace=False)
        _check_calibrated(z[idx], eps[idx], q[idx], 500, 1e-5, accountant, 1e-3)


class InputTest(chex.TestCase):
  @parameterized.named_parameters(
    (
      "nan_eps",
      lambda: accounting.surrogate_noise_multiplier(jnp.array([1.0, jnp.nan]), 10, 1e-5),
      r"eps\[1\]=nan",
    ),
    (
      "negative_eps",
      lambda: accounting.calibrate_noise_multipliers([1.0, -0.5], 0.1, 10, 1e-5),
      r"eps\[1\]=-0.5 .*>= 0",
    ),
    ("infinite_eps", lambda: accounting.noise_variance(np.inf, 10, 1e-5), r"eps=inf .*finite"),
    ("delta_zero", lambda: accounting.surrogate_epsilon(1.0, 10, 0.0), r"delta=0.0 .*\(0, 1\)"),
    ("delta_one", lambda: accounting.accountant_epsilon(1.0, 0.1, 10, 1.0), r"delta=1.0"),
    ("delta_nan", lambda: accounting.epsilon_spent([1.0], 0.1, 10, math.nan), r"delta=nan"),
    ("rate_zero", lambda: accounting.accountant_epsilon(1.0, 0.0, 10, 1e-5), r"sampling_rate=0.0 .*\(0, 1\]"),
    (
      "rate_above_one",
      lambda: accounting.calibrate_noise_multipliers([1.0], [1.5], 10, 1e-5),
      r"sampling_rate\[0\]=1.5",
    ),
    ("rate_nan", lambda: accounting.epsilon_spent([1.0], [math.nan], 10, 1e-5), r"sampling_rate\[0\]=nan"),
    ("steps_zero", lambda: accounting.calibrate_noise_multipliers([1.0], 0.1, 0, 1e-5), r"steps=0 .*>= 1"),
    ("steps_float", lambda: accounting.surrogate_epsilon(1.0, 2.5, 1e-5), r"steps=2.5 .*integer"),
    ("negative_steps_done", lambda: accounting.epsilon_spent([1.0], 0.1, [-1], 1e-5), r"steps_done\[0\]=-1"),
    ("zero_noise", lambda: accounting.epsilon_spent([0.0], 0.1, 10, 1e-5), r"noise_multiplier\[0\]=0.0"),
    ("accountant", lambda: accounting.accountant_epsilon(1.0, 0.1, 10, 1e-5, "gdp"), r"accountant='gdp'"),
    ("rtol", lambda: accounting.calibrate_noise_multipliers([1.0], 0.1, 10, 1e-5, rtol=0.0), r"rtol=0.0"),
    (
      "shapes",
      lambda: accounting.calibrate_noise_multipliers([1.0, 2.0], [0.1, 0.2, 0.3], 10, 1e-5),
      r"share one length",
    ),
    (
      "unreachable_budget",
      lambda: accounting.calibrate_noise_multipliers([1e-4], 1.0, 10, 1e-5),
      r"eps\[0\]=0.0001 .*noise multiplier outside",
    ),
  )
  def test_bad_input_raises_config_error(self, call, message):
    with self.assertRaisesRegex(ConfigError, message):
      call()


if __name__ == "__main__":
  absltest.main()

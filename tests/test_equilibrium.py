"""Closed-form proportional-share equilibrium (fcfn_jax/game/equilibrium.py), docs/model.md "The game"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax.game import equilibrium, solver
from fcfn_jax.validate import ConfigError
from tests.games import paid_games

pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64


budgets = jax.jit(jax.vmap(equilibrium.closed_form_budgets))
participation = jax.jit(jax.vmap(equilibrium.participation))


def test_participation_bound_is_independent_of_payment():
  payment, costs, weights = paid_games(0, 256, 12)
  k = costs / weights
  part = participation(k)
  assert np.all(part.size >= 2)
  # k_i >= K_S / (|S| - 1) <=> eps_i = 0, for every payment.
  np.testing.assert_array_equal(part.mask, k < part.threshold[:, None])
  for scale in (1e-3, 1.0, 1e3):
    eps = np.asarray(budgets(scale * payment, costs, weights))
    np.testing.assert_array_equal(eps > 0, part.mask)
    np.testing.assert_array_equal(eps[k >= part.threshold[:, None]], 0.0)


def test_participant_set_is_the_largest_feasible_prefix():
  _, costs, weights = paid_games(1, 256, 9)
  k = np.sort(costs / weights, axis=-1)
  part = participation(k)
  prefix = np.cumsum(k, -1)
  m = np.arange(1, 10)
  with np.errstate(divide="ignore"):
    feasible = k < prefix / np.maximum(m - 1, 0)
  feasible[:, :2] = True
  np.testing.assert_array_equal(part.size, feasible.cumprod(-1).sum(-1))


def test_closed_form_has_no_profitable_deviation():
  payment, costs, weights = paid_games(2, 256, 10)
  eps = budgets(payment, costs, weights)
  grid = jnp.linspace(0.0, 1.0, 2001)[:, None] * 1.5 * jnp.max(eps, -1)[:, None, None]
  gains = jax.jit(jax.vmap(solver.unilateral_gains, in_axes=(None, 0, 0, 0, 0)), static_argnums=0)(
    solver.proportional_share_utility, eps, weights, solver.ShareParams(payment, costs), grid
  )
  utility = jax.vmap(equilibrium.follower_utilities)(payment, weights * eps, costs / weights)
  assert np.all(gains <= 1e-6 * np.maximum(np.abs(utility), 1e-9 * payment[:, None]))


def test_follower_utilities_match_the_solver_utility():
  payment, costs, weights = paid_games(3, 16, 6)
  eps = budgets(payment, costs, weights)
  aggregate = jnp.broadcast_to(jnp.sum(weights * eps, -1, keepdims=True), eps.shape)
  np.testing.assert_allclose(
    jax.vmap(equilibrium.follower_utilities)(payment, weights * eps, costs / weights),
    jax.vmap(solver.proportional_share_utility)(eps, aggregate, weights, solver.ShareParams(payment, costs)),
    rtol=1e-12,
    atol=1e-12,
  )


def test_aggregate_response_and_closed_form_payment():
  lam = np.random.default_rng(4).uniform(0.1, 20.0, 256)
  payment, costs, weights = paid_games(4, 256, 8)
  k = costs / weights
  np.testing.assert_allclose(
    jax.vmap(equilibrium.aggregate_response)(payment, k),
    np.sum(weights * budgets(payment, costs, weights), -1),
    rtol=1e-12,
  )
  best = jax.vmap(equilibrium.closed_form_payment)(lam, costs, weights)
  slope = jax.vmap(equilibrium.aggregate_response)(np.ones(256), k)  # X(R) = R (|S| - 1) / K_S
  grid = np.linspace(0.0, 1.0, 4001)[:, None] * (lam + 1.0)
  utility = equilibrium.log_server_utility(lam, grid, grid * slope)
  optimum = equilibrium.log_server_utility(lam, best, jax.vmap(equilibrium.aggregate_response)(best, k))
  assert np.all(optimum >= utility.max(0) - 1e-12)
  assert np.any(best == 0.0) and np.any(best > 0.0)


def test_vmap_over_64_games_equals_a_python_loop():
  payment, costs, weights = paid_games(5, 64, 7)
  single = jax.jit(equilibrium.closed_form_budgets)
  looped = np.stack([single(*args) for args in zip(payment, costs, weights)])
  np.testing.assert_allclose(budgets(payment, costs, weights), looped, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
  "costs, weights, message",
  [
    ([1.0], [1.0], "at least 2 clients"),
    ([1.0, 0.0], [1.0, 1.0], r"costs\[1\]=0.0"),
    ([1.0, np.nan], [1.0, 1.0], r"costs\[1\]=nan"),
    ([1.0, 2.0], [1.0, -1.0], r"weights\[1\]=-1.0"),
  ],
)
def test_invalid_clients_raise_config_error(costs, weights, message):
  with pytest.raises(ConfigError, match=message):
    equilibrium.closed_form_budgets(1.0, np.asarray(costs), np.asarray(weights))
  with pytest.raises(ConfigError, match=message):
    equilibrium.closed_form_payment(1.0, np.asarray(costs), np.asarray(weights))


def test_capped_level_gives_the_capped_equilibrium_and_its_least_payment():
  """x_i = clip(X - k_i y, 0, cap_i) with P = X^2 / y reproduces the generic solver's capped equilibrium;
  where several payments support the same profile, y is the largest (the least payment)."""
  payment, costs, weights = paid_games(6, 64, 7)
  closed = np.asarray(budgets(payment, costs, weights))
  eps_max = closed.max(-1) * np.random.default_rng(7).uniform(0.1, 1.5, 64)
  eps = np.asarray(jax.jit(jax.vmap(solver.share_equilibrium))(payment, costs, weights, eps_max))
  x, caps = weights * eps, weights * eps_max[:, None]
  total = x.sum(-1)
  level = np.asarray(jax.jit(jax.vmap(equilibrium.capped_level))(total, costs / weights, caps))
  np.testing.assert_allclose(
    jax.vmap(equilibrium.capped_contributions)(total, level, costs / weights, caps), x, atol=1e-9
  )
  assert np.all(total**2 / level <= payment * (1 + 1e-9))  # the least payment that supports it
  moved = np.all(x < caps * (1 - 1e-9), axis=-1) | np.any((x > 0) & (x < caps * (1 - 1e-9)), axis=-1)
  np.testing.assert_allclose((total**2 / level)[moved], payment[moved], rtol=1e-7)

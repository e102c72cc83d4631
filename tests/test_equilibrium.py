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


def _capped_level_by_full_sort(total, k, caps):
  """The reference capped_level (before k_sorted): binary search over all 2K + 1 breakpoints, sorted."""
  breaks = jnp.sort(
    jax.lax.stop_gradient(jnp.maximum(jnp.concatenate([(total - caps) / k, total / k, jnp.zeros(1)]), 0.0))
  )
  slack = 64 * jnp.finfo(k.dtype).eps * total

  def halve(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    up = jnp.sum(jnp.clip(total - k * breaks[mid], 0.0, caps)) - total >= -slack
    return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

  n = breaks.shape[-1]
  lo, hi = jax.lax.fori_loop(0, int(np.ceil(np.log2(n))), halve, (0, n - 1))
  inside = jax.lax.stop_gradient(0.5 * (breaks[lo] + breaks[hi]))
  capped = total - k * inside >= caps
  interior = ~capped & (total - k * inside > 0)
  slope = jnp.sum(jnp.where(interior, k, 0.0))
  level = (jnp.sum(jnp.where(capped, caps, 0.0)) + (jnp.sum(interior) - 1) * total) / jnp.where(
    slope > 0, slope, 1.0
  )
  return jnp.where(slope > 0, level, inside)


def _group_costs_and_slopes(level_fn, total, k, caps):
  """(C(X) = X^2 / y(X), C'(X), C''(X)) per group, as the three-party aggregators' solver sees them."""

  def cost(t):
    return t**2 / level_fn(t, k, caps)

  def slope(t):
    return jax.jvp(cost, (t,), (jnp.ones_like(t),))[1]

  return (cost(total), *jax.jvp(slope, (total,), (jnp.ones_like(total),)))


@pytest.mark.parametrize("slots", [7, 64])
def test_capped_level_with_sorted_k_is_the_full_sort_search(slots):
  """k_sorted (only the K cap breakpoints sorted, the entry breakpoints X / k_i in order) gives the level
  of the search over all 2K + 1 sorted breakpoints and the same first and second derivatives in X, also
  with tied k, padding slots (cap 0, largest k) and totals on flat stretches (a sum of caps)."""
  rng = np.random.default_rng(slots)
  groups = 96
  k = np.sort(rng.uniform(0.2, 5.0, (groups, slots)) / rng.lognormal(0.0, 1.0, (groups, slots)), axis=-1)
  k[::4, 1:3] = k[::4, 1:2]  # ties
  caps = rng.lognormal(1.0, 1.0, (groups, slots))
  caps[1::4, -2:] = 0.0  # padding
  k[1::4, -2:] = k[1::4, -3:-2]
  full = caps.sum(-1)
  totals = full[:, None] * np.concatenate([rng.uniform(1e-4, 1.0, (groups, 6)), np.ones((groups, 1))], -1)
  firsts = np.cumsum(caps, -1)[:, : min(slots, 6)]  # every client of a prefix at its cap
  totals = np.concatenate([totals, firsts], -1)
  k, caps, totals = (jnp.asarray(a) for a in (k, caps, totals))
  sorted_level = lambda t, k, c: equilibrium.capped_level(t, k, c, k_sorted=True)
  fns = {"old": _capped_level_by_full_sort, "sorted": sorted_level, "generic": equilibrium.capped_level}
  run = lambda fn: jax.jit(
    jax.vmap(jax.vmap(lambda t, k, c: _group_costs_and_slopes(fn, t, k, c), (0, None, None)))
  )
  old, *news = (np.asarray(run(fn)(totals, k, caps)) for fn in fns.values())
  assert np.all(np.isfinite(old)) and np.all(old[0] > 0)
  for new in news:
    np.testing.assert_array_equal(new, old)


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

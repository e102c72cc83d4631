"""Tests of the shared outcome accounting (fcfn_jax/game/outcome.py, docs/model.md "Metrics"), in float64."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax.config import MECHANISMS, GameConfig
from fcfn_jax.game import baselines
from fcfn_jax.game.outcome import Outcome, build_outcome, log_valuation
from tests.games import costs_and_weights

pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64


def test_build_outcome_matches_hand_computation():
  budgets, payments = jnp.array([1.0, 2.0, 0.0]), jnp.array([3.0, 1.0, 0.0])
  costs, weights = jnp.array([1.0, 0.25, 4.0]), jnp.array([1.0, 2.0, 0.5])
  out = build_outcome(budgets, payments, costs, weights, log_valuation(2.0))
  value = 2.0 * math.log(1.0 + 1.0 + 4.0)
  chex.assert_trees_all_close(out.client_utilities, jnp.array([2.0, 0.5, 0.0]))
  chex.assert_trees_all_close(out.server_utility, value - 4.0)
  chex.assert_trees_all_close(out.total_payment, 4.0)
  chex.assert_trees_all_close(out.intermediary_utility, 0.0)
  chex.assert_trees_all_close(out.social_welfare, value - 1.0 - 0.5)
  chex.assert_trees_all_close(out.mean_client_utility, 2.5 / 3)
  chex.assert_trees_all_close(out.average_utility, (value - 1.5) / 4)
  assert int(out.participants) == 2


def test_intermediaries_are_paid_by_the_server_and_count_as_parties():
  budgets, payments = jnp.array([1.0, 2.0]), jnp.array([3.0, 1.0])
  costs, weights = jnp.array([1.0, 0.25]), jnp.array([1.0, 2.0])
  margins = jnp.array([0.5, 0.25, 0.0])
  out = build_outcome(budgets, payments, costs, weights, log_valuation(2.0), margins)
  value = 2.0 * math.log(6.0)
  chex.assert_trees_all_close(out.intermediary_utility, 0.75)
  chex.assert_trees_all_close(out.total_payment, 4.75)
  chex.assert_trees_all_close(out.server_utility, value - 4.75)
  chex.assert_trees_all_close(out.social_welfare, value - 1.5)  # margins are transfers too
  chex.assert_trees_all_close(out.average_utility, (value - 1.5) / (2 + 1 + 3))


def test_valuation_is_pluggable():
  linear = lambda budgets, weights: 3.0 * jnp.sum(weights * budgets)
  out = build_outcome(
    jnp.array([1.0, 0.5]), jnp.array([0.5, 0.5]), jnp.array([0.2, 0.4]), jnp.array([1.0, 2.0]), linear
  )
  chex.assert_trees_all_close(out.server_utility, 3.0 * 2.0 - 1.0)
  chex.assert_trees_all_close(out.social_welfare, 6.0 - 0.2 - 0.2)


@pytest.mark.parametrize("name", MECHANISMS)
def test_accounting_identities_hold_for_every_mechanism(name):
  cfg = GameConfig(num_aggregators=3)
  costs, weights = costs_and_weights(seed=1, games=32, clients=9)
  out = jax.vmap(lambda c, w: baselines.solve_mechanism(name, c, w, cfg))(costs, weights)
  assert isinstance(out, Outcome)
  chex.assert_shape([out.budgets, out.payments, out.client_utilities], (32, 9))
  chex.assert_shape([out.server_utility, out.social_welfare, out.participants], (32,))
  eps = np.asarray(out.budgets)
  cost_paid = np.sum(costs * eps, axis=1)
  value = cfg.lam * np.log1p(np.sum(weights * eps, axis=1))
  np.testing.assert_allclose(out.social_welfare, value - cost_paid, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(out.client_utilities, out.payments - costs * eps, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(
    out.total_payment, np.sum(out.payments, axis=1) + out.intermediary_utility, rtol=1e-12, atol=1e-12
  )
  np.testing.assert_allclose(out.server_utility, value - out.total_payment, rtol=1e-10, atol=1e-10)
  intermediaries = min(cfg.num_aggregators, 9 // 2) if name == "three_party" else 0
  parties = 9 + 1 + intermediaries
  np.testing.assert_allclose(
    out.average_utility,
    (out.server_utility + np.sum(out.client_utilities, axis=1) + out.intermediary_utility) / parties,
    rtol=1e-12,
    atol=1e-12,
  )
  np.testing.assert_allclose(out.mean_client_utility, np.mean(out.client_utilities, axis=1), rtol=1e-12)
  np.testing.assert_array_equal(out.participants, np.sum(eps > 0, axis=1))
  if name != "three_party":
    np.testing.assert_array_equal(out.intermediary_utility, 0.0)
  assert np.all(eps >= 0) and np.all(eps <= cfg.eps_max)


def test_mechanisms_run_in_float32():
  costs, weights = costs_and_weights(seed=2, games=4, clients=6)
  with jax.enable_x64(False):
    for name in MECHANISMS:
      out = jax.vmap(lambda c, w, n=name: baselines.solve_mechanism(n, c, w, GameConfig()))(
        jnp.asarray(costs, jnp.float32), jnp.asarray(weights, jnp.float32)
      )
      assert out.budgets.dtype == jnp.float32, name
      assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out)), name

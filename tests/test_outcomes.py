"""Tests of the shared outcome accounting (fcfn_jax/game/outcome.py, docs/model.md "Metrics"), in float64."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax.config import MECHANISMS
from fcfn_jax.game import baselines, valuation
from fcfn_jax.game.outcome import Outcome, build_outcome
from tests.games import costs_and_weights, game, spec, take

pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64


LOG = spec("log")


def test_build_outcome_matches_hand_computation():
  budgets, payments = jnp.array([1.0, 2.0, 0.0]), jnp.array([3.0, 1.0, 0.0])
  g = game(np.array([1.0, 0.25, 4.0]), np.array([1.0, 2.0, 0.5]), lam=2.0)
  out = build_outcome(budgets, payments, g, LOG)
  value = 2.0 * math.log(1.0 + 1.0 + 4.0)
  chex.assert_trees_all_close(out.client_utilities, jnp.array([2.0, 0.5, 0.0]))
  chex.assert_trees_all_close(out.quality, math.log(6.0))
  chex.assert_trees_all_close(out.server_utility, value - 4.0)
  chex.assert_trees_all_close(out.total_payment, 4.0)
  chex.assert_trees_all_close(out.intermediary_utility, 0.0)
  chex.assert_trees_all_close(out.social_welfare, value - 1.0 - 0.5)
  chex.assert_trees_all_close(out.mean_client_utility, 2.5 / 3)
  chex.assert_trees_all_close(out.average_utility, (value - 1.5) / 4)
  assert int(out.participants) == 2


def test_intermediaries_are_paid_by_the_server_and_count_as_parties():
  budgets, payments = jnp.array([1.0, 2.0]), jnp.array([3.0, 1.0])
  g = game(np.array([1.0, 0.25]), np.array([1.0, 2.0]), lam=2.0)
  margins = jnp.array([0.5, 0.25, 0.0])
  out = build_outcome(budgets, payments, g, LOG, margins)
  value = 2.0 * math.log(6.0)
  chex.assert_trees_all_close(out.intermediary_utility, 0.75)
  chex.assert_trees_all_close(out.total_payment, 4.75)
  chex.assert_trees_all_close(out.server_utility, value - 4.75)
  chex.assert_trees_all_close(out.social_welfare, value - 1.5)  # margins are transfers too
  chex.assert_trees_all_close(out.average_utility, (value - 1.5) / (2 + 1 + 3))


def test_the_server_values_budgets_with_the_game_valuation():
  budgets, payments = jnp.array([1.0, 0.5, 0.0]), jnp.array([0.5, 0.5, 0.0])
  g = game(np.array([0.2, 0.4, 1.0]), np.array([1.0, 2.0, 1.0]), lam=3.0)
  out = build_outcome(budgets, payments, g, spec("dp"))
  q = valuation.quality(budgets, g, spec("dp"))
  chex.assert_trees_all_close(out.quality, q)
  chex.assert_trees_all_close(out.server_utility, 3.0 * q - 1.0)
  chex.assert_trees_all_close(out.social_welfare, 3.0 * q - 0.2 - 0.2)
  nobody = build_outcome(jnp.zeros(3), jnp.zeros(3), g, spec("dp"))
  assert nobody.quality == -jnp.inf and nobody.server_utility == -jnp.inf  # no model at all


@pytest.mark.parametrize("valuation_name", ["dp", "log"])
@pytest.mark.parametrize("name", MECHANISMS)
def test_accounting_identities_hold_for_every_mechanism(name, valuation_name):
  costs, weights = costs_and_weights(seed=1, games=4, clients=8)
  gs = game(costs, weights)
  s = spec(valuation_name, name)
  out = jax.tree.map(lambda *a: jnp.stack(a), *[baselines.solve(take(gs, i), s) for i in range(4)])
  assert isinstance(out, Outcome)
  chex.assert_shape([out.budgets, out.payments, out.client_utilities], (4, 8))
  chex.assert_shape([out.server_utility, out.social_welfare, out.participants], (4,))
  eps = np.asarray(out.budgets)
  value = 50.0 * np.asarray(jax.vmap(valuation.quality, in_axes=(0, 0, None))(out.budgets, gs, s))
  cost_paid = np.sum(costs * eps, axis=1)
  np.testing.assert_allclose(out.social_welfare, value - cost_paid, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(out.client_utilities, out.payments - costs * eps, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(
    out.total_payment, np.sum(out.payments, axis=1) + out.intermediary_utility, rtol=1e-12, atol=1e-12
  )
  np.testing.assert_allclose(out.server_utility, value - out.total_payment, rtol=1e-10, atol=1e-10)
  parties = 8 + 1 + (4 if name == "three_party" else 0)  # M = min(num_aggregators = 4, N // 2)
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
  assert np.all(eps >= 0) and np.all(eps <= 8.0)


@pytest.mark.parametrize("name", MECHANISMS)
def test_mechanisms_run_in_float32(name):
  costs, weights = costs_and_weights(seed=2, games=1, clients=8)
  with jax.enable_x64(False):
    g = game(costs[0], weights[0], dtype=np.float32)
    out = baselines.solve(g, spec("dp", name))
  assert out.budgets.dtype == jnp.float32, name
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out)), name

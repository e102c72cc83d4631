"""The valuation (fcfn_jax/game/valuation.py): one aggregation rule, Q of the aggregate, docs/model.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax import simulation
from fcfn_jax.game import valuation
from fcfn_jax.privacy import accounting
from tests.games import costs_and_weights, game, spec

pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64

DP, FEDAVG, LOG = spec("dp"), spec("dp", aggregation="fedavg"), spec("log")


def _variances(budgets, g, s):
  """sigma_i^2 = z(eps_i)^2 + z(data_epsilon)^2 / w_i, written out from the accountant's surrogate."""
  z = accounting.surrogate_noise_multiplier(budgets, s.steps, s.delta)
  return z**2 + accounting.surrogate_noise_multiplier(g.data_epsilon, s.steps, s.delta) ** 2 / g.weights


def test_noise_aware_weights_are_inverse_variance_and_sum_to_one():
  costs, weights = costs_and_weights(seed=0, games=1, clients=6)
  g = game(costs[0], weights[0])
  budgets = jnp.array([0.0, 0.3, 8.0, 2.0, 0.0, 5.0])
  a = np.asarray(valuation.aggregation_weights(budgets, g, DP))
  inside = np.asarray(budgets) > 0
  sigma2 = np.asarray(_variances(jnp.where(inside, budgets, 1.0), g, DP))
  expected = np.where(inside, 1.0 / sigma2, 0.0)
  np.testing.assert_allclose(a, expected / expected.sum(), rtol=1e-12)
  fedavg = np.asarray(valuation.aggregation_weights(budgets, g, FEDAVG))
  w = np.where(inside, weights[0], 0.0)
  np.testing.assert_allclose(fedavg, w / w.sum(), rtol=1e-12)
  np.testing.assert_array_equal(valuation.aggregation_weights(jnp.zeros(6), g, DP), 0.0)


def test_dp_quality_is_minus_the_variance_of_the_aggregate():
  costs, weights = costs_and_weights(seed=1, games=1, clients=5)
  g = game(costs[0], weights[0], data_epsilon=2.0)
  budgets = jnp.array([1.0, 0.0, 4.0, 8.0, 0.2])
  inside = budgets > 0
  sigma2 = _variances(jnp.where(inside, budgets, 1.0), g, DP)[np.asarray(inside)]
  np.testing.assert_allclose(valuation.quality(budgets, g, DP), -1.0 / jnp.sum(1.0 / sigma2), rtol=1e-12)
  a = np.asarray(weights[0])[np.asarray(inside)]
  a = a / a.sum()
  np.testing.assert_allclose(valuation.quality(budgets, g, FEDAVG), -np.sum(a**2 * sigma2), rtol=1e-12)
  np.testing.assert_allclose(
    valuation.quality(budgets, g, LOG), np.log1p(np.dot(weights[0], budgets)), rtol=1e-12
  )
  assert valuation.quality(jnp.zeros(5), g, DP) == -jnp.inf  # no participant, no model
  for s in (DP, FEDAVG, LOG):
    for b in (budgets, jnp.zeros(5)):
      grad = jax.grad(valuation.quality)(b, g, s)
      assert np.all(np.isfinite(grad)), (s, b)
  for s in (DP, FEDAVG):  # under 'dp' a client that is out has no say until it joins
    assert jax.grad(valuation.quality)(budgets, g, s)[1] == 0.0


def test_noise_aware_quality_never_falls_with_more_budget_or_one_more_client():
  rng = np.random.default_rng(2)
  costs, weights = costs_and_weights(seed=2, games=200, clients=7, weight_sigma=1.0)
  budgets = rng.uniform(0.0, 8.0, (200, 7)) * (rng.uniform(size=(200, 7)) < 0.7)
  raised = np.where(rng.uniform(size=(200, 7)) < 0.3, budgets + rng.uniform(0.0, 3.0, (200, 7)), budgets)
  quality = jax.jit(jax.vmap(valuation.quality, in_axes=(0, 0, None)), static_argnums=2)
  g = game(costs, weights, data_epsilon=rng.uniform(0.5, 20.0, 200))
  before, after = quality(jnp.asarray(budgets), g, DP), quality(jnp.asarray(raised), g, DP)
  assert np.all(after >= before - 1e-12 * np.abs(before))
  # Plain FedAvg is not monotone: a newcomer with a tiny budget (huge noise) lowers Q.
  one = game(np.ones(3), np.ones(3))
  assert valuation.quality(jnp.array([8.0, 8.0, 0.05]), one, FEDAVG) < valuation.quality(
    jnp.array([8.0, 8.0, 0.0]), one, FEDAVG
  )
  assert valuation.quality(jnp.array([8.0, 8.0, 0.05]), one, DP) > valuation.quality(
    jnp.array([8.0, 8.0, 0.0]), one, DP
  )


def test_the_round_aggregates_with_the_game_weights():
  """simulation.round_weights makes the round's weight_i n_i (federated.py) equal to a_i."""
  costs, weights = costs_and_weights(seed=3, games=1, clients=5)
  n = np.array([20.0, 35.0, 50.0, 80.0, 110.0])
  g = game(costs[0], weights[0])
  budgets = jnp.array([0.1, 8.0, 0.0, 3.0, 8.0])
  a = valuation.aggregation_weights(budgets, g, DP)
  np.testing.assert_allclose(simulation.round_weights(a, n) * n, a, rtol=1e-12)
  assert float(a[0]) < 1e-2 * float(a[1])  # the noisy client barely counts

"""The valuation (fcfn_jax/game/valuation.py): one aggregation rule, Q of the aggregate, docs/model.md."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax import simulation
from fcfn_jax.config import MECHANISMS, GameConfig, PrivacyConfig, SimulationConfig
from fcfn_jax.game import baselines, leader, valuation
from fcfn_jax.game.spec import validate_game
from fcfn_jax.privacy import surrogate, traced
from fcfn_jax.validate import ConfigError
from tests.games import costs_and_weights, game, spec

pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64

DP, FEDAVG, LOG = spec("dp"), spec("dp", aggregation="fedavg"), spec("log")


def _variances(budgets, g, s):
  """sigma_i^2 = z(eps_i)^2 + z(data_epsilon)^2 / w_i, written out from the accountant's surrogate."""
  z = surrogate.surrogate_noise_multiplier(budgets, s.steps, s.delta)
  return z**2 + surrogate.surrogate_noise_multiplier(g.data_epsilon, s.steps, s.delta) ** 2 / g.weights


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


ACCOUNTANT = spec("dp", noise_model="accountant")
_RATES = np.array([0.05, 0.16, 0.6, 1.0])  # the default run's q_i = 32 / n_i lie in [0.16, 0.6]


def _accountant_game(rates=_RATES):
  """A game with per-client sampling rates and its accountant noise table."""
  g = game(np.ones(len(rates)), np.ones(len(rates)), sampling_rates=rates)
  return valuation.with_noise_table(g, ACCOUNTANT)


@pytest.mark.slow  # the table's and the root find's compiles: ~10 s
def test_the_accountant_table_is_the_traced_accountant_within_one_percent():
  """z_i(eps) read off the table vs the traced root find, at budgets 0.035..eps_max (below ~0.03 the
  accountant's order conversion floors eps at delta 1e-5: it certifies nothing there). The largest errors
  (1.0%) sit at the kinks where the accountant's optimal order jumps (63 -> 128 -> 256)."""
  g = _accountant_game()
  budgets = np.geomspace(0.035, 8.0, 23)
  table = np.stack(
    [np.asarray(valuation.noise_multiplier(jnp.full(len(_RATES), e), g, ACCOUNTANT)) for e in budgets]
  )
  tight = np.asarray(traced.traced_noise_multiplier(budgets[:, None], _RATES, 30, 1e-5))
  finite = np.isfinite(tight)
  assert finite.mean() > 0.9
  error = np.abs(table[finite] / tight[finite] - 1)
  assert error.max() < 1.5e-2 and np.median(error) < 2e-3, (error.max(), np.median(error))
  # The surrogate ignores q: at q = 0.05 and eps = 0.05 it asks for ~30x the accountant's noise.
  closed = surrogate.surrogate_noise_multiplier(0.05, 30, 1e-5)
  accountant = valuation.noise_multiplier(jnp.full(len(_RATES), 0.05), g, ACCOUNTANT)[0]
  assert closed > 20 * accountant


@pytest.mark.slow  # ~10 s of compiles
def test_the_accountant_map_is_monotone_differentiable_and_safe_outside_its_grid():
  g = _accountant_game()
  z = jax.vmap(lambda e: valuation.noise_multiplier(jnp.full(len(_RATES), e), g, ACCOUNTANT))
  budgets = jnp.asarray(np.geomspace(1e-4, 1e3, 300))  # the grid is [1e-2, 1e2]
  values = np.asarray(z(budgets))
  assert np.all(np.isfinite(values)) and np.all(np.diff(values, axis=0) < 0)
  assert np.all(np.isinf(valuation.noise_multiplier(jnp.zeros(len(_RATES)), g, ACCOUNTANT)))
  # Between knots the gradient is the interpolant's: central differences agree, at 0 it is 0 (not NaN).
  one = lambda b: jnp.sum(valuation.noise_multiplier(b, g, ACCOUNTANT))
  for eps in (0.004, 0.37, 2.9, 300.0):
    b = jnp.full(len(_RATES), eps)
    step = 1e-6 * eps
    numeric = (one(b + step) - one(b - step)) / (2 * step)
    np.testing.assert_allclose(jnp.sum(jax.grad(one)(b)), numeric, rtol=1e-4)
  grad = jax.grad(valuation.quality)(jnp.array([0.0, 0.5, 3.0, 8.0]), g, ACCOUNTANT)
  assert np.all(np.isfinite(grad)) and grad[0] == 0.0 and np.all(grad[1:] > 0)


def test_the_accountant_model_needs_its_table_of_the_right_shape():
  g = game(np.ones(3), np.ones(3))
  with pytest.raises(ConfigError, match="noise_model='accountant' needs game.noise_table"):
    valuation.quality(jnp.ones(3), g, ACCOUNTANT)
  with pytest.raises(ConfigError, match=r"noise_table has shape \(3, 2\)"):
    validate_game(g._replace(noise_table=np.zeros((3, 2))))
  with pytest.raises(ConfigError, match="noise_model='accountant' is invalid with sampling='fixed'"):
    SimulationConfig(privacy=PrivacyConfig(sampling="fixed"), game=GameConfig(noise_model="accountant"))
  with pytest.raises(ConfigError, match="noise_model='x' is invalid"):
    GameConfig(noise_model="x")


@pytest.mark.slow  # compiles every mechanism under the accountant's map: ~1 min
def test_every_mechanism_solves_under_the_accountant_and_the_leader_is_optimal():
  costs, weights = costs_and_weights(seed=4, games=1, clients=8)
  rates = np.minimum(1.0, 32.0 / (120.0 * weights[0]))
  g = valuation.with_noise_table(game(costs[0], weights[0], sampling_rates=rates), ACCOUNTANT)
  for name in MECHANISMS:
    outcome = baselines.solve(g, spec("dp", name, noise_model="accountant"))
    assert np.isfinite(float(outcome.server_utility)) and outcome.participants >= 2, name
  best = leader.solve_leader(g, ACCOUNTANT)
  grid = jnp.geomspace(1e-3, 1e3, 1000)
  utilities = jax.vmap(lambda r: leader.server_utility(r, g, ACCOUNTANT))(grid)
  assert float(best.utility) >= float(jnp.max(utilities)) - 1e-6 * abs(float(best.utility))

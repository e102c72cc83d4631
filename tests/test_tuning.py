"""Gradient-based pricing (fcfn_jax/tuning.py): hypergradients, convergence, improvement over a grid."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fcfn_jax.game import equilibrium, leader, tuning, valuation
from fcfn_jax.validate import ConfigError
from tests.games import game, spec

NUM_CLIENTS = 8


pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64


SPECS = {"log": spec("log"), "dp": spec("dp"), "dp_accountant": spec("dp", noise_model="accountant")}


def problem(eps_max: float, lam: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  costs = rng.uniform(0.5, 2.0, NUM_CLIENTS)
  sizes = rng.lognormal(0.0, 1.0, NUM_CLIENTS)
  return game(costs, sizes / sizes.mean(), eps_max=eps_max, lam=lam)


@pytest.mark.parametrize(
  "quality",
  [pytest.param("log", marks=pytest.mark.slow), "dp", pytest.param("dp_accountant", marks=pytest.mark.slow)],
)
def test_hypergradient_matches_central_finite_differences(quality):
  g = valuation.with_noise_table(problem(eps_max=50.0, lam=20.0), SPECS[quality])
  groups = jnp.arange(NUM_CLIENTS) % 3
  params = tuning.PricingParams(jnp.log(jnp.asarray(3.0)), jnp.asarray([0.1, -0.2, 0.3]))
  objective = jax.jit(lambda p: tuning.pricing_objective(p, g, SPECS[quality], groups))
  _, grad = jax.jit(tuning.hypergradient, static_argnums=2)(params, g, SPECS[quality], groups)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  grad = jax.flatten_util.ravel_pytree(grad)[0]
  steps = 1e-5 * jnp.eye(flat.size)
  fd = jax.vmap(lambda s: objective(unravel(flat + s)) - objective(unravel(flat - s)))(steps) / 2e-5
  np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(grad))))


def test_adam_reaches_the_closed_form_payment():
  g = problem(eps_max=1e3, lam=20.0)  # no cap binds: R* = lam - K_S / (|S| - 1)
  r_star = equilibrium.closed_form_payment(g.lam, g.costs, g.weights)
  assert 0 < r_star < g.lam
  optimizer = optax.adam(optax.exponential_decay(0.2, 50, 0.5))
  best, trace = tuning.tune_pricing(
    tuning.initial_params(1.0), g, SPECS["log"], jnp.zeros(NUM_CLIENTS, jnp.int32), optimizer, 1000
  )
  np.testing.assert_allclose(jnp.exp(best.log_payment), r_star, rtol=1e-6)
  np.testing.assert_allclose(
    trace.objective.max(), leader.server_utility(r_star, g, SPECS["log"]), rtol=1e-12
  )


@pytest.mark.slow
def test_small_steps_improve_the_objective_monotonically():
  g = problem(eps_max=1e3, lam=20.0)
  _, trace = tuning.tune_pricing(
    tuning.initial_params(1.0),
    g,
    SPECS["log"],
    jnp.zeros(NUM_CLIENTS, jnp.int32),
    optax.adam(0.01),
    150,
  )
  assert np.all(np.diff(trace.objective) >= -1e-10 * np.abs(trace.objective[1:]))
  assert trace.objective[-1] > trace.objective[0] + 1.0


@pytest.mark.slow
def test_per_client_prices_beat_the_best_uniform_payment_on_a_grid():
  g = problem(eps_max=50.0, lam=200.0)  # DP valuation: no closed form
  payments, utilities = tuning.uniform_grid(g, SPECS["dp"], 100)
  grid_best = int(jnp.argmax(utilities))
  best, trace = tuning.tune_pricing(
    tuning.initial_params(payments[grid_best], NUM_CLIENTS),
    g,
    SPECS["dp"],
    jnp.arange(NUM_CLIENTS),
    optax.adam(optax.exponential_decay(0.05, 60, 0.5)),
    150,
    safeguard=True,
  )
  assert np.all(np.diff(trace.objective) >= 0)  # rejected steps keep the iterate
  assert trace.objective[-1] > utilities[grid_best] + 0.05 * abs(utilities[grid_best])
  np.testing.assert_allclose(
    tuning.pricing_objective(best, g, SPECS["dp"], jnp.arange(NUM_CLIENTS)),
    trace.objective.max(),
    rtol=1e-12,
  )
  assert float(jnp.ptp(tuning.group_prices(best))) > 0.1


def test_invalid_num_steps_raise_config_error():
  g = problem(eps_max=50.0, lam=20.0)
  with pytest.raises(ConfigError, match="num_steps=0"):
    tuning.tune_pricing(
      tuning.initial_params(1.0),
      g,
      SPECS["log"],
      jnp.zeros(NUM_CLIENTS, jnp.int32),
      optax.adam(0.1),
      0,
    )

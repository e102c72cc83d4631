"""The leader (fcfn_jax/game/leader.py): the capped optimum of U_s for both valuations, docs/model.md."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax.game import equilibrium, leader, solver
from fcfn_jax.game.spec import Game
from fcfn_jax.validate import ConfigError
from tests.games import game, spec, take

pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64

CLIENTS = 8
SPECS = {"log": spec("log"), "dp": spec("dp")}
# One compiled leader per valuation serves every game of the same size.
solve_one = {name: jax.jit(leader.solve_leader, static_argnums=1) for name in SPECS}


def random_games(seed: int, games: int, eps_max, lam_range=(0.5, 20.0)) -> Game:
  rng = np.random.default_rng(seed)
  costs = rng.uniform(0.5, 2.0, (games, CLIENTS))
  sizes = rng.lognormal(0.0, 1.0, (games, CLIENTS))
  lam = np.exp(rng.uniform(*np.log(lam_range), games))
  return game(costs, sizes / sizes.mean(-1, keepdims=True), lam=lam, eps_max=eps_max)


def solve_each(valuation: str, games: Game) -> leader.LeaderSolution:
  solutions = [solve_one[valuation](take(games, i), SPECS[valuation]) for i in range(games.lam.shape[0])]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *solutions)


def test_log_valuation_without_binding_caps_matches_the_closed_form_payment():
  games = random_games(0, 10, eps_max=1e4, lam_range=(0.05, 20.0))
  solution = solve_each("log", games)
  expected = jax.vmap(equilibrium.closed_form_payment)(games.lam, games.costs, games.weights)
  assert np.any(expected == 0.0) and np.any(expected > 0.0)
  np.testing.assert_allclose(solution.payment, expected, rtol=1e-5, atol=1e-9)
  assert np.all(solution.budgets < games.eps_max[:, None])  # no cap binds: the closed form applies


def grid_utilities(g: Game, valuation: str, points: int = 1000) -> jax.Array:
  """U_s on a 1000-point linear and a 1000-point log grid of R over (0, R_hi]: [2000]."""
  upper = leader.payment_upper_bound(g, SPECS[valuation])
  payments = jnp.concatenate(
    [upper * jnp.linspace(0.0, 1.0, points + 1)[1:], upper * jnp.logspace(-6.0, 0.0, points)]
  )
  return jax.vmap(lambda r: leader.server_utility(r, g, SPECS[valuation]))(payments)


grids = jax.jit(jax.vmap(grid_utilities, in_axes=(0, None)), static_argnums=1)


@pytest.mark.parametrize(
  "caps, valuation",
  # binding caps under 'log' (~17 s of compile on CI) run with -m slow; 'log' with slack caps stays
  [("bind", "dp"), pytest.param("bind", "log", marks=pytest.mark.slow), ("slack", "dp"), ("slack", "log")],
)
def test_optimal_payment_beats_every_point_of_fine_grids(valuation, caps):
  """U_s(R*) >= U_s on 2 x 1000 payments, caps binding or slack (docs/model.md "Stage I")."""
  lam_range = {"log": (0.5, 20.0) if caps == "slack" else (20.0, 200.0), "dp": (5.0, 500.0)}[valuation]
  games = random_games(1, 6, eps_max=2.0 if caps == "bind" else 1e3, lam_range=lam_range)
  solution = solve_each(valuation, games)
  capped = np.any(np.asarray(solution.budgets) >= np.asarray(games.eps_max)[:, None], axis=1)
  assert capped.any() if caps == "bind" else not capped.any()
  best = np.asarray(grids(games, valuation)).max(axis=1)
  assert np.all(solution.utility >= best - 1e-9 * np.abs(best)), solution.utility - best
  if caps == "bind" and valuation == "log":  # the uncapped closed form is not the answer here
    closed = jax.vmap(equilibrium.closed_form_payment)(games.lam, games.costs, games.weights)
    assert np.any(np.abs(solution.payment - closed) > 1e-3 * closed)


@pytest.mark.parametrize("valuation", sorted(SPECS))
def test_followers_at_the_optimum_cannot_gain_by_deviating(valuation):
  games = random_games(2, 4, eps_max=2.0, lam_range=(5.0, 50.0))
  solution = solve_each(valuation, games)
  for i in range(4):
    g = take(games, i)
    eps = solution.budgets[i]
    grid = jnp.linspace(0.0, 1.0, 2001)[:, None] * jnp.broadcast_to(g.eps_max, eps.shape)
    params = solver.ShareParams(solution.payment[i], g.costs)
    gains = solver.unilateral_gains(solver.proportional_share_utility, eps, g.weights, params, grid)
    x = g.weights * eps
    utility = solution.payment[i] * x / jnp.sum(x) - g.costs * eps
    assert np.all(gains <= 1e-6 * np.maximum(np.abs(utility), 1e-9 * solution.payment[i])), gains


# 'log' (~18 s of compile on CI) runs with -m slow; by default its hypergradient drives Adam to the closed
# form in test_tuning.py::test_adam_reaches_the_closed_form_payment.
@pytest.mark.parametrize("valuation", ["dp", pytest.param("log", marks=pytest.mark.slow)])
def test_hypergradients_match_finite_differences(valuation):
  g = take(random_games(3, 1, eps_max=1.2, lam_range=(10.0, 10.0)), 0)
  prices = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2.0, CLIENTS))
  inputs = dict(payment=jnp.asarray(100.0), lam=g.lam, costs=g.costs, prices=prices)

  def utility(inputs):
    changed = g._replace(lam=inputs["lam"], costs=inputs["costs"])
    return leader.server_utility(inputs["payment"], changed, SPECS[valuation], inputs["prices"])

  value_and_grad = jax.jit(jax.value_and_grad(utility))
  value, grad = value_and_grad(inputs)
  budgets = leader.follower_budgets(100.0, g, SPECS[valuation], prices)
  assert np.any(budgets >= g.eps_max) and np.any((budgets > 0) & (budgets < g.eps_max))
  rng = np.random.default_rng(4)
  step = 1e-6
  for name in inputs:
    direction = {k: jnp.zeros_like(v) for k, v in inputs.items()}
    direction[name] = jnp.asarray(rng.normal(size=np.shape(inputs[name])))
    shifted = [
      value_and_grad({k: v + sign * step * direction[k] for k, v in inputs.items()})[0] for sign in (1, -1)
    ]
    np.testing.assert_allclose(
      jnp.sum(grad[name] * direction[name]),
      (shifted[0] - shifted[1]) / (2 * step),
      rtol=1e-4,
      atol=1e-8 * abs(value),
      err_msg=name,
    )


@pytest.mark.slow  # test_tuning covers per-client prices through the same hypergradient
def test_per_client_prices_do_not_lower_the_server_utility():
  g = take(random_games(5, 1, eps_max=1e4), 0)
  s = dataclasses.replace(SPECS["log"], search=SPECS["log"].search._replace(grid_size=32))
  priced = jax.jit(leader.solve_leader, static_argnums=(1, 3))(g, s, jnp.arange(CLIENTS), CLIENTS)
  payment = equilibrium.closed_form_payment(g.lam, g.costs, g.weights)
  uniform = equilibrium.log_server_utility(
    g.lam, payment, equilibrium.aggregate_response(payment, g.costs / g.weights)
  )
  assert priced.utility > uniform + 1e-6 * abs(uniform)  # price discrimination pays here
  np.testing.assert_allclose(jnp.exp(jnp.mean(jnp.log(priced.prices))), 1.0, rtol=1e-9)


@pytest.mark.slow  # test_solve_leader_vmap_equals_a_python_loop stays in CI
def test_vmap_over_games_equals_a_python_loop():
  games = random_games(7, 16, eps_max=2.0)
  payments = np.linspace(1.0, 30.0, 16)
  utility = lambda r, g: leader.server_utility(r, g, SPECS["dp"])
  batched = jax.jit(jax.vmap(utility))(payments, games)
  single = jax.jit(utility)
  looped = np.array([single(r, take(games, i)) for i, r in enumerate(payments)])
  np.testing.assert_allclose(batched, looped, rtol=1e-12)


@pytest.mark.slow
def test_solve_leader_vmap_equals_a_python_loop():
  games = random_games(8, 6, eps_max=2.0, lam_range=(5.0, 500.0))
  batched = jax.jit(jax.vmap(leader.solve_leader, in_axes=(0, None)), static_argnums=1)(games, SPECS["dp"])
  chex.assert_trees_all_close(solve_each("dp", games), batched, rtol=1e-9)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("costs", [1.0], "at least 2 clients"),
    ("costs", [1.0, -1.0], r"costs\[1\]=-1.0"),
    ("weights", [1.0, np.nan], r"weights\[1\]=nan"),
    ("eps_max", 0.0, "eps_max=0.0"),
    ("lam", -2.0, "lam=-2.0"),
    ("lam", np.nan, "lam=nan"),
    ("sampling_rates", [0.5, 1.5], r"sampling_rates\[1\]=1.5"),
    ("eps_min", 9.0, "eps_min=9.0 > eps_max=5.0"),
    ("data_epsilon", 0.0, "data_epsilon=0.0"),
  ],
)
def test_invalid_games_raise_config_error(field, value, message):
  g = game(np.array([1.0, 2.0]), np.array([1.0, 1.0]), eps_max=5.0, lam=10.0)
  g = g._replace(**{field: np.asarray(value, float)})
  if field == "costs" and np.size(value) == 1:
    g = g._replace(weights=np.ones(1), sampling_rates=np.ones(1))
  with pytest.raises(ConfigError, match=message):
    leader.solve_leader(g, SPECS["log"])


def test_invalid_groups_raise_config_error():
  g = game(np.array([1.0, 2.0]), np.array([1.0, 1.0]))
  with pytest.raises(ConfigError, match="groups=.*num_groups=2"):
    leader.solve_leader(g, SPECS["log"], np.array([0, 2]), 2)

"""The leader's problem (fcfn_jax/game/leader.py): payment and prices from the implicit hypergradient."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax.game import equilibrium, leader, solver
from fcfn_jax.privacy import accounting
from fcfn_jax.validate import ConfigError

pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64


def surrogate_variance(eps):
  """v = z(eps)^2 of docs/model.md's surrogate for 25 steps at delta = 1e-5."""
  return accounting.noise_variance(eps, steps=25, delta=1e-5)


dp_quality = functools.partial(leader.dp_quality, variance_fn=surrogate_variance)
QUALITIES = {"log": leader.log_quality, "dp": dp_quality}


def random_problems(seed: int, games: int, clients: int, eps_max: float, lam_scale: float = 1.0):
  rng = np.random.default_rng(seed)
  costs = rng.uniform(0.5, 2.0, (games, clients))
  sizes = rng.lognormal(0.0, 1.0, (games, clients))
  lam = lam_scale * np.exp(rng.uniform(np.log(0.5), np.log(20.0), games))
  return leader.LeaderProblem(costs, sizes / sizes.mean(-1, keepdims=True), np.full(games, eps_max), lam)


def take(problems: leader.LeaderProblem, index: int) -> leader.LeaderProblem:
  return jax.tree.map(lambda a: a[index], problems)


# One compiled leader per quality serves every game of the same size (a vmapped one compiles slower).
solve_one = {
  name: jax.jit(functools.partial(leader.solve_leader, quality_fn=quality))
  for name, quality in QUALITIES.items()
}


def solve_each(quality: str, problems: leader.LeaderProblem) -> leader.LeaderSolution:
  solutions = [solve_one[quality](take(problems, i)) for i in range(problems.lam.shape[0])]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *solutions)


def test_log_quality_matches_closed_form_payment():
  problems = random_problems(0, 12, 10, eps_max=1e4)
  solution = solve_each("log", problems)
  expected = jax.vmap(equilibrium.closed_form_payment)(problems.lam, problems.costs, problems.weights)
  assert np.any(expected == 0.0) and np.any(expected > 0.0)
  np.testing.assert_allclose(solution.payment, expected, rtol=1e-5, atol=1e-9)
  assert np.all(solution.budgets < problems.eps_max[:, None])  # no cap binds: the closed form applies
  total = jnp.sum(problems.weights * solution.budgets, -1)
  np.testing.assert_allclose(
    solution.utility,
    equilibrium.log_server_utility(problems.lam, solution.payment, total),
    rtol=1e-12,
    atol=1e-12,
  )


def fine_grid_utility(problem: leader.LeaderProblem, quality_fn, points: int = 1000):
  payments = leader.payment_upper_bound(problem, quality_fn) * jnp.linspace(0.0, 1.0, points + 1)[1:]
  return jnp.max(jax.vmap(lambda r: leader.server_utility(r, problem, quality_fn))(payments))


@pytest.mark.parametrize("quality", sorted(QUALITIES))
def test_optimal_payment_beats_a_fine_grid_when_caps_bind(quality):
  # Tight caps make U_s a sawtooth for the DP quality: every entrant starts with a tiny, noisy budget.
  problems = random_problems(1, 8, 10, eps_max=2.0, lam_scale=50.0 if quality == "dp" else 1.0)
  solution = solve_each(quality, problems)
  assert np.any(solution.budgets >= problems.eps_max[:, None])
  grid_best = jax.jit(jax.vmap(functools.partial(fine_grid_utility, quality_fn=QUALITIES[quality])))(problems)
  assert np.all(solution.utility >= grid_best - 1e-9 * np.abs(grid_best)), solution.utility - grid_best


@pytest.mark.parametrize("quality", sorted(QUALITIES))
def test_hypergradients_match_finite_differences(quality):
  problem = take(random_problems(2, 1, 7, eps_max=1.2, lam_scale=10.0), 0)
  prices = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2.0, 7))
  inputs = dict(payment=jnp.asarray(15.0), lam=problem.lam, costs=problem.costs, prices=prices)

  def utility(inputs):
    game = problem._replace(lam=inputs["lam"], costs=inputs["costs"])
    return leader.server_utility(inputs["payment"], game, QUALITIES[quality], inputs["prices"])

  value_and_grad = jax.jit(jax.value_and_grad(utility))
  value, grad = value_and_grad(inputs)
  budgets = solver.share_equilibrium(15.0, problem.costs, problem.weights, problem.eps_max, prices)
  assert np.any(budgets >= problem.eps_max) and np.any((budgets > 0) & (budgets < problem.eps_max))
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


def test_dp_quality_ignores_clients_that_stay_out():
  budgets = jnp.array([0.0, 1.0, 4.0, 0.0])
  weights = jnp.array([3.0, 1.0, 2.0, 5.0])
  a = jnp.array([1.0, 2.0]) / 3.0
  np.testing.assert_allclose(
    dp_quality(budgets, weights), -jnp.sum(a**2 * surrogate_variance(jnp.array([1.0, 4.0]))), rtol=1e-12
  )
  grad = jax.grad(dp_quality)(budgets, weights)
  assert np.all(np.isfinite(grad)) and grad[0] == 0.0 and grad[3] == 0.0
  assert dp_quality(jnp.zeros(4), weights) == -jnp.inf
  assert np.all(np.isfinite(jax.grad(dp_quality)(jnp.zeros(4), weights)))


def test_per_client_prices_do_not_lower_the_server_utility():
  problem = take(random_problems(5, 1, 6, eps_max=1e4), 0)
  priced = jax.jit(leader.solve_leader, static_argnums=(1, 3, 4))(
    problem, leader.log_quality, jnp.arange(6), 6, leader.LeaderOptions(grid_size=32)
  )
  # Uniform prices: the closed-form optimum (no cap binds).
  payment = equilibrium.closed_form_payment(problem.lam, problem.costs, problem.weights)
  uniform = equilibrium.log_server_utility(
    problem.lam, payment, equilibrium.aggregate_response(payment, problem.costs / problem.weights)
  )
  assert priced.utility > uniform + 1e-6 * abs(uniform)  # price discrimination pays here
  np.testing.assert_allclose(jnp.exp(jnp.mean(jnp.log(priced.prices))), 1.0, rtol=1e-9)


def test_vmap_over_64_games_equals_a_python_loop():
  problems = random_problems(7, 64, 6, eps_max=2.0)
  payments = np.linspace(1.0, 30.0, 64)
  utility = functools.partial(leader.server_utility, quality_fn=dp_quality)
  batched = jax.jit(jax.vmap(utility))(payments, problems)
  single = jax.jit(utility)
  looped = np.array([single(r, take(problems, i)) for i, r in enumerate(payments)])
  np.testing.assert_allclose(batched, looped, rtol=1e-12)


@pytest.mark.slow
def test_solve_leader_vmap_equals_a_python_loop():
  problems = random_problems(8, 8, 10, eps_max=2.0, lam_scale=50.0)
  batched = jax.jit(jax.vmap(functools.partial(leader.solve_leader, quality_fn=dp_quality)))(problems)
  chex.assert_trees_all_close(solve_each("dp", problems), batched, rtol=1e-9)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("costs", [1.0], "at least 2 clients"),
    ("costs", [1.0, -1.0], r"costs\[1\]=-1.0"),
    ("weights", [1.0, np.nan], r"weights\[1\]=nan"),
    ("eps_max", 0.0, "eps_max=0.0"),
    ("lam", -2.0, "lam=-2.0"),
    ("lam", np.nan, "lam=nan"),
  ],
)
def test_invalid_problems_raise_config_error(field, value, message):
  problem = leader.LeaderProblem(
    np.array([1.0, 2.0]), np.array([1.0, 1.0]), np.asarray(5.0), np.asarray(10.0)
  )._replace(**{field: np.asarray(value, float)})
  with pytest.raises(ConfigError, match=message):
    leader.solve_leader(problem, leader.log_quality)


def test_invalid_groups_raise_config_error():
  problem = leader.LeaderProblem(np.array([1.0, 2.0]), np.array([1.0, 1.0]), 5.0, 10.0)
  with pytest.raises(ConfigError, match="groups=.*num_groups=2"):
    leader.solve_leader(problem, leader.log_quality, np.array([0, 2]), 2)

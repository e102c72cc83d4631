"""Generic differentiable follower equilibrium (fcfn_jax/game/solver.py) held against the closed form."""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcfn_jax.game import equilibrium, solver
from fcfn_jax.validate import ConfigError
from tests.games import paid_games

pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64


# Heterogeneous games with per-client prices: payment [G], costs [G, N], weights [G, N], prices [G, N].
random_games = functools.partial(paid_games, cost_range=(0.2, 5.0), with_prices=True)


# One compiled program serves every batch of the same shape: caps and prices are inputs.
batched_equilibrium = jax.jit(jax.vmap(solver.share_equilibrium))
batched_closed_form = jax.jit(jax.vmap(equilibrium.closed_form_budgets))


def deviation_gains(payment, costs, weights, eps, eps_max):
  """Deviation gains of every client over a 2001-point grid on [0, eps_max_i]: [N]."""
  grid = jnp.linspace(0.0, 1.0, 2001)[:, None] * jnp.broadcast_to(eps_max, eps.shape)
  return solver.unilateral_gains(
    solver.proportional_share_utility, eps, weights, solver.ShareParams(payment, costs), grid
  )


batched_gains = jax.jit(jax.vmap(deviation_gains))


def assert_no_profitable_deviation(payment, costs, weights, eps, eps_max):
  gains = np.asarray(batched_gains(payment, costs, weights, eps, eps_max))
  x = weights * eps
  utility = payment[:, None] * x / x.sum(-1, keepdims=True) - costs * eps
  # 1e-6 relative to the client's utility, with a floor for clients at zero utility (outside S).
  assert np.all(gains <= 1e-6 * np.maximum(np.abs(utility), 1e-9 * payment[:, None])), gains.max()


# CI keeps one size (each size compiles the solver anew); the others run with -m slow.
@pytest.mark.parametrize(
  "clients", [pytest.param(2, marks=pytest.mark.slow), 7, pytest.param(64, marks=pytest.mark.slow)]
)
def test_matches_closed_form_on_many_games(clients):
  payment, costs, weights, _ = random_games(clients, 128, clients)
  closed = np.asarray(batched_closed_form(payment, costs, weights))
  # Caps far above every closed-form budget: both solutions apply.
  eps_max = 10.0 * closed.max(-1)
  generic = np.asarray(batched_equilibrium(payment, costs, weights, eps_max, np.ones_like(costs)))
  np.testing.assert_array_equal(generic > 0, closed > 0)
  np.testing.assert_allclose(generic, closed, rtol=1e-5, atol=0.0)
  assert_no_profitable_deviation(payment, costs, weights, closed, eps_max)


def test_price_weights_are_the_canonical_game_with_weights_pi_w():
  payment, costs, weights, prices = random_games(1, 128, 7)
  closed = np.asarray(batched_closed_form(payment, costs, weights * prices))
  generic = batched_equilibrium(payment, costs, weights, 10.0 * closed.max(-1), prices)
  np.testing.assert_allclose(generic, closed, rtol=1e-5, atol=0.0)


def test_binding_caps_give_a_fixed_point_of_projected_best_responses():
  payment, costs, weights, _ = random_games(2, 128, 7)
  closed = np.asarray(batched_closed_form(payment, costs, weights))
  rng = np.random.default_rng(3)
  eps_max = closed.max(-1, keepdims=True) * rng.uniform(0.2, 0.9, (128, 1)) * rng.uniform(0.8, 1.2, (128, 7))
  eps = batched_equilibrium(payment, costs, weights, eps_max, np.ones_like(costs))
  capped = np.asarray(eps >= eps_max)
  assert capped.any(-1).all() and (np.asarray(eps) > 0).sum(-1).min() >= 2
  params = solver.ShareParams(payment, costs)
  utility = solver.proportional_share_utility
  residual = jax.vmap(solver.projection_residual, in_axes=(None, 0, 0, 0, 0))(
    utility, eps, weights, params, eps_max
  )
  np.testing.assert_allclose(residual, 0.0, atol=1e-9)
  response = jax.vmap(solver.best_response, in_axes=(None, 0, 0, 0, 0))(
    utility, eps, weights, params, eps_max
  )
  np.testing.assert_allclose(response, eps, rtol=1e-8, atol=1e-12)
  assert_no_profitable_deviation(payment, costs, weights, np.asarray(eps), eps_max)


class QuadraticCost(NamedTuple):
  payment: chex.Array
  costs: chex.Array
  curvature: chex.Array


def quadratic_cost_utility(eps, aggregate, weights, params: QuadraticCost):
  """u_i = R w_i eps_i / A - c_i eps_i - q_i eps_i^2 / 2: a nonlinear first-order condition."""
  return params.payment * weights * eps / aggregate - params.costs * eps - 0.5 * params.curvature * eps**2


@pytest.mark.slow  # the capped fixed point (test_binding_caps_give_...) stays in CI
def test_generic_utility_equilibrium_is_a_fixed_point():
  payment, costs, weights, _ = random_games(4, 64, 9)
  rng = np.random.default_rng(5)
  params = QuadraticCost(payment, costs, rng.uniform(0.0, 2.0, costs.shape))
  eps_max = rng.uniform(0.5, 5.0, costs.shape)
  solve = jax.jit(jax.vmap(solver.solve_equilibrium, in_axes=(None, 0, 0, 0)), static_argnums=0)
  eps = solve(quadratic_cost_utility, weights, params, eps_max)
  response = jax.vmap(solver.best_response, in_axes=(None, 0, 0, 0, 0))(
    quadratic_cost_utility, eps, weights, params, eps_max
  )
  np.testing.assert_allclose(response, eps, rtol=1e-8, atol=1e-12)
  grid = jnp.linspace(0.0, 1.0, 2001)[None, :, None] * eps_max[:, None, :]
  gains = jax.vmap(solver.unilateral_gains, in_axes=(None, 0, 0, 0, 0))(
    quadratic_cost_utility, eps, weights, params, grid
  )
  aggregate = jnp.broadcast_to(jnp.sum(weights * eps, -1, keepdims=True), eps.shape)
  utility = jax.vmap(quadratic_cost_utility)(eps, aggregate, weights, params)
  assert np.all(gains <= 1e-6 * np.maximum(np.abs(utility), 1e-9 * payment[:, None]))


def solve_inputs(inputs):
  return solver.share_equilibrium(**inputs)


# Compiled once for every input and both parametrizations (the shapes are the same).
solve_jit = jax.jit(solve_inputs)
jvp_jit = jax.jit(lambda inputs, direction: jax.jvp(solve_inputs, (inputs,), (direction,))[1])
vjp_jit = jax.jit(lambda inputs, cotangent: jax.grad(lambda i: jnp.dot(cotangent, solve_inputs(i)))(inputs))


@pytest.mark.parametrize(
  "cap", [pytest.param(100.0, marks=pytest.mark.slow), 0.6], ids=["no_caps", "caps_bind"]
)
def test_implicit_derivatives_match_finite_differences(cap):
  payment, costs, weights, prices = (a[0] for a in random_games(7, 1, 8))
  eps_max = cap * float(equilibrium.closed_form_budgets(payment, costs, weights).max())
  inputs = dict(
    payment=jnp.asarray(payment),
    costs=jnp.asarray(costs),
    weights=jnp.asarray(weights),
    prices=jnp.asarray(prices),
    eps_max=jnp.asarray(eps_max),
  )
  eps = solve_jit(inputs)
  if cap < 1:
    assert np.any(eps >= eps_max) and np.sum((eps > 0) & (eps < eps_max)) >= 1
  rng = np.random.default_rng(8)
  cotangent = jnp.asarray(rng.normal(size=eps.shape))
  reverse = vjp_jit(inputs, cotangent)
  step = 1e-6
  for name in inputs:
    direction = {k: jnp.zeros_like(v) for k, v in inputs.items()}
    direction[name] = jnp.asarray(rng.normal(size=np.shape(inputs[name])))
    shifted = [solve_jit({k: v + sign * step * direction[k] for k, v in inputs.items()}) for sign in (1, -1)]
    expected = (shifted[0] - shifted[1]) / (2 * step)
    np.testing.assert_allclose(jvp_jit(inputs, direction), expected, rtol=1e-4, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(
      jnp.sum(reverse[name] * direction[name]),
      jnp.dot(cotangent, expected),
      rtol=1e-4,
      atol=1e-7,
      err_msg=name,
    )


@pytest.mark.slow
def test_zero_payment_means_nobody_participates_with_finite_gradients():
  _, costs, weights, _ = (a[0] for a in random_games(6, 1, 8))
  inputs = dict(
    payment=jnp.asarray(0.0),
    costs=jnp.asarray(costs),
    weights=jnp.asarray(weights),
    prices=jnp.ones(8),
    eps_max=jnp.asarray(3.0),
  )
  np.testing.assert_array_equal(solve_jit(inputs), 0.0)
  grads = vjp_jit(inputs, jnp.ones(8))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


single_equilibrium = jax.jit(solver.share_equilibrium)


class JitTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_agree(self):
    with jax.enable_x64(True):
      payment, costs, weights, prices = (a[0] for a in random_games(9, 1, 7))
      eps_max = np.full(7, 0.8)
      eps = self.variant(solver.share_equilibrium)(payment, costs, weights, eps_max, prices)
      expected = single_equilibrium(payment, costs, weights, eps_max, prices)
      chex.assert_trees_all_close(eps, expected, rtol=1e-12)


def test_vmap_over_64_games_equals_a_python_loop():
  payment, costs, weights, prices = random_games(10, 64, 7)
  eps_max = np.full_like(costs, 1.5)
  batched = batched_equilibrium(payment, costs, weights, eps_max, prices)
  looped = np.stack([single_equilibrium(*args) for args in zip(payment, costs, weights, eps_max, prices)])
  np.testing.assert_allclose(batched, looped, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), payment=st.floats(0.01, 1e3))
def test_property_closed_form_agreement(seed, payment):
  with jax.enable_x64(True):
    _, costs, weights, _ = (a[0] for a in random_games(seed, 1, 7))
    closed = equilibrium.closed_form_budgets(payment, costs, weights)
    eps_max = np.full(7, 10 * float(closed.max()))
    generic = single_equilibrium(np.float64(payment), costs, weights, eps_max, np.ones(7))
    np.testing.assert_allclose(generic, closed, rtol=1e-5, atol=0.0)


BAD_INPUTS = {
  "one_client": (dict(costs=[1.0], weights=[1.0]), "at least 2 clients"),
  "zero_cost": (dict(costs=[1.0, 0.0]), r"costs\[1\]=0.0"),
  "negative_cost": (dict(costs=[-1.0, 1.0]), r"costs\[0\]=-1.0"),
  "nan_cost": (dict(costs=[1.0, np.nan]), r"costs\[1\]=nan"),
  "zero_weight": (dict(weights=[0.0, 1.0]), r"weights\[0\]=0.0"),
  "zero_eps_max": (dict(eps_max=0.0), "eps_max=0.0"),
  "negative_eps_max": (dict(eps_max=[1.0, -2.0]), r"eps_max\[1\]=-2.0"),
  "nan_eps_max": (dict(eps_max=np.nan), "eps_max=nan"),
  "negative_payment": (dict(payment=-1.0), r"payment=-1.0 .*>= 0"),
  "nan_payment": (dict(payment=np.nan), "payment=nan"),
  "zero_price": (dict(prices=[1.0, 0.0]), r"prices\[1\]=0.0"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_invalid_inputs_raise_config_error(case):
  overrides, message = BAD_INPUTS[case]
  args = dict(payment=1.0, costs=[1.0, 2.0], weights=[1.0, 1.0], eps_max=5.0, prices=None)
  args.update({k: np.asarray(v, float) for k, v in overrides.items()})
  with pytest.raises(ConfigError, match=message):
    solver.share_equilibrium(**args)


# ---------------------------------------------------------------------------------------------------------
# float32: correct to 1e-4 (norm-wise) or loudly untrusted, never silently wrong.
# ---------------------------------------------------------------------------------------------------------

F32 = np.float32
# The two float32 reproducers of issue 13: (payment, costs, eps_max), weights 1.
REPRODUCERS = [(0.0733, [1567053.57, 0.82515], 4.676e-7), (2516.27, [2.26e-4, 1025.4], 24.54)]


def _norm_error(eps, reference):
  return float(np.max(np.abs(np.asarray(eps, np.float64) - reference)) / np.max(reference))


def _float64_reference(payment, costs, weights, eps_max):
  """The float64 equilibrium of the float32-rounded inputs."""
  wide = [np.asarray(np.asarray(a, F32), np.float64) for a in (payment, costs, weights, eps_max)]
  return np.asarray(solver.share_equilibrium(*wide))


@pytest.mark.parametrize("case", range(len(REPRODUCERS)))
def test_float32_reproducers_are_right_or_flagged(case):
  payment, costs, eps_max = REPRODUCERS[case]
  reference = _float64_reference(payment, costs, np.ones(2), eps_max)
  with jax.enable_x64(False):
    args = (F32(payment), np.asarray(costs, F32), np.ones(2, F32), F32(eps_max))
    host = solver.share_equilibrium(*args)  # concrete: re-solved in float64 when untrusted
    traced = jax.jit(solver.share_equilibrium)(*args)
  assert host.dtype == jnp.float32 and _norm_error(host, reference) <= 1e-4
  assert np.all(np.isnan(traced)) or _norm_error(traced, reference) <= 1e-4


def _extreme_games(seed: int, games: int, clients: int):
  """float32 games with cost ratios up to 1e8 (log-uniform spread), R in [1e-3, 1e4], caps binding half
  the time: (payment [G], costs [G, N], weights [G, N], eps_max [G])."""
  rng = np.random.default_rng(seed)
  decades = rng.uniform(0.0, 8.0, games)
  costs = 10.0 ** (
    rng.uniform(0.0, 1.0, (games, clients)) * decades[:, None] + rng.uniform(-3, 3, (games, 1))
  )
  weights = rng.lognormal(0.0, 0.5, (games, clients))
  weights /= weights.mean(1, keepdims=True)
  payment = np.exp(rng.uniform(np.log(1e-3), np.log(1e4), games))
  closed = np.asarray(batched_closed_form(payment, costs, weights))
  eps_max = closed.max(1) * np.where(rng.uniform(size=games) < 0.5, 10.0, rng.uniform(0.05, 0.95, games))
  return tuple(np.asarray(a, F32) for a in (payment, costs, weights, eps_max))


@pytest.mark.parametrize("clients", [2, pytest.param(7, marks=pytest.mark.slow)])
def test_float32_is_right_to_1e4_or_flagged_over_cost_ratios_up_to_1e8(clients):
  payment, costs, weights, eps_max = _extreme_games(20 + clients, 200, clients)
  reference = np.asarray(
    jax.jit(jax.vmap(solver.share_equilibrium))(
      *(a.astype(np.float64) for a in (payment, costs, weights, eps_max))
    )
  )
  with jax.enable_x64(False):
    traced = np.asarray(jax.jit(jax.vmap(solver.share_equilibrium))(payment, costs, weights, eps_max))
  flagged = np.isnan(traced).any(axis=1)
  assert np.all(np.isnan(traced[flagged]))  # a whole game is flagged, never part of it
  errors = np.max(np.abs(traced - reference), axis=1) / np.max(reference, axis=1)
  assert np.all(errors[~flagged] <= 1e-4), errors[~flagged].max()
  assert flagged.mean() < 0.2  # the check flags the ill-conditioned few, not everything
  with jax.enable_x64(False):  # the host path re-solves the flagged games in float64
    for g in np.flatnonzero(flagged)[:5]:
      host = solver.share_equilibrium(payment[g], costs[g], weights[g], eps_max[g])
      assert host.dtype == jnp.float32 and _norm_error(host, reference[g]) <= 1e-4


def test_hopeless_games_raise_instead_of_answering():
  """Cost ratio 1e30 with two clients: the dominant client's share differs from 1 by 1e-30, below
  float64's resolution, so the aggregate cannot be located: a ConfigError, not a silent answer."""
  with pytest.raises(ConfigError, match="ill-conditioned even in float64"):
    solver.share_equilibrium(1.0, np.array([1e30, 1.0]), np.ones(2), 1e-10)

"""Tests of the mechanisms in fcfn_jax/game/baselines.py (docs/model.md "Baselines"), in float64."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax.config import MECHANISMS, GameConfig
from fcfn_jax.game import baselines, equilibrium
from fcfn_jax.validate import ConfigError
from tests.games import costs_and_weights

TOL = 1e-9


pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64


def _solve(fn, costs, weights, cfg):
  """fn vmapped over games: costs, weights [G, N]."""
  return jax.vmap(lambda c, w: fn(c, w, cfg))(costs, weights)


def _menu_rewards(type_costs, budgets):
  """Binding IR of the last type and binding local downward IC, written as the recursion."""
  rewards = np.zeros_like(budgets)
  rewards[-1] = type_costs[-1] * budgets[-1]
  for k in range(len(budgets) - 2, -1, -1):
    rewards[k] = rewards[k + 1] + type_costs[k] * (budgets[k] - budgets[k + 1])
  return rewards


def _menu_profit(lam, menu, budgets):
  """Server utility of a monotone menu with the binding rewards: lam log(1 + sum W eps) - sum n r: [S]."""
  type_costs, counts, type_weights = (np.asarray(a) for a in menu[:3])
  rewards = np.stack([_menu_rewards(type_costs, b) for b in budgets])
  return lam * np.log1p(budgets @ type_weights) - rewards @ counts


# ---------------------------------------------------------------------------------------------------------
# Contract theory.
# ---------------------------------------------------------------------------------------------------------

CONTRACT_CASES = [
  (GameConfig(num_types=4), 12),
  (GameConfig(num_types=1), 7),
  (GameConfig(num_types=5, lam=40.0, eps_max=1.0), 13),  # caps bind
  (GameConfig(num_types=9), 6),  # more types than clients: one type per client
]


@pytest.mark.parametrize("cfg, clients", CONTRACT_CASES)
def test_contract_is_individually_rational_and_incentive_compatible(cfg, clients):
  costs, weights = costs_and_weights(seed=3, games=40, clients=clients, weight_sigma=1.0)
  menu = _solve(baselines.contract_menu, costs, weights, cfg)
  out = _solve(baselines.contract, costs, weights, cfg)
  eps, rewards, theta = (np.asarray(a) for a in (menu.budgets, menu.rewards, menu.type_costs))
  num_types = min(cfg.num_types, clients)
  chex.assert_shape([menu.budgets, menu.rewards, menu.type_costs], (40, num_types))
  assert np.all(np.diff(theta, axis=1) >= 0)
  assert np.all(np.diff(eps, axis=1) <= TOL), "budgets must not increase with the type cost"
  assert np.all((eps >= 0) & (eps <= cfg.eps_max + TOL))
  # Binding IR of the highest-cost type and binding local downward IC.
  np.testing.assert_allclose(rewards[:, -1], theta[:, -1] * eps[:, -1], atol=TOL)
  np.testing.assert_allclose(
    rewards[:, :-1] - theta[:, :-1] * eps[:, :-1], rewards[:, 1:] - theta[:, :-1] * eps[:, 1:], atol=TOL
  )
  # IR and IC for every type: [G, type, item].
  type_value = rewards[:, None, :] - theta[:, :, None] * eps[:, None, :]
  own = np.diagonal(type_value, axis1=1, axis2=2)
  assert np.all(own >= -TOL) and np.all(own[:, :, None] >= type_value - TOL)
  # Every client prefers the item of its own (quantile) type to every other item and to opting out.
  ranks = np.argsort(np.argsort(costs, axis=1), axis=1)
  own_type = ranks * num_types // clients
  client_value = rewards[:, None, :] - costs[:, :, None] * eps[:, None, :]  # [G, N, item]
  own = np.take_along_axis(client_value, own_type[:, :, None], axis=2)
  assert np.all(own >= -TOL) and np.all(own >= client_value - TOL)
  np.testing.assert_allclose(out.budgets, np.take_along_axis(eps, own_type, axis=1), atol=TOL)
  np.testing.assert_allclose(out.payments, np.take_along_axis(rewards, own_type, axis=1), atol=TOL)
  np.testing.assert_allclose(out.client_utilities, own[:, :, 0], atol=TOL)


def test_contract_irregular_types_are_ironed_and_the_menu_is_optimal():
  # One client per type; the third type brings most of the data, so its virtual cost per unit of
  # contribution (C_k / W_k = [1, 6, 0.28, 1.6]) is below the second's: the two are pooled.
  cfg = GameConfig(num_types=4, lam=3.0, eps_max=1.0)
  costs, weights = jnp.array([1.0, 1.1, 1.2, 1.3]), jnp.array([1.0, 0.2, 5.0, 1.0])
  menu = baselines.contract_menu(costs, weights, cfg)
  eps = np.asarray(menu.budgets)
  assert eps[1] == pytest.approx(eps[2]) and eps[2] > 0 and eps[0] >= eps[1]
  rng = np.random.default_rng(4)
  trials = -np.sort(-rng.uniform(0.0, cfg.eps_max, (20000, 4)), axis=1)
  best = _menu_profit(cfg.lam, menu, eps[None])[0]
  assert best >= _menu_profit(cfg.lam, menu, trials).max() - TOL
  chex.assert_trees_all_close(baselines.contract(costs, weights, cfg).server_utility, best, atol=TOL)


@pytest.mark.parametrize("cfg", [GameConfig(num_types=3), GameConfig(num_types=4, lam=30.0, eps_max=1.5)])
def test_contract_menu_beats_random_monotone_menus(cfg):
  costs, weights = costs_and_weights(seed=5, games=20, clients=10, weight_sigma=1.5)
  menus = _solve(baselines.contract_menu, costs, weights, cfg)
  rng = np.random.default_rng(6)
  for g in range(20):
    menu = jax.tree.map(lambda a, g=g: np.asarray(a[g]), menus)
    trials = -np.sort(-rng.uniform(0.0, cfg.eps_max, (4000, cfg.num_types)), axis=1)
    trials[: cfg.num_types + 1] = cfg.eps_max * np.tri(cfg.num_types + 1, cfg.num_types, -1)  # the vertices
    best = _menu_profit(cfg.lam, menu, menu.budgets[None])[0]
    assert best >= _menu_profit(cfg.lam, menu, trials).max() - TOL
    np.testing.assert_allclose(menu.rewards, _menu_rewards(menu.type_costs, menu.budgets), atol=TOL)


# ---------------------------------------------------------------------------------------------------------
# Social optimum.
# ---------------------------------------------------------------------------------------------------------

WELFARE_CASES = [
  (GameConfig(), 12),
  (GameConfig(lam=40.0, eps_max=1.0, num_types=3, num_aggregators=2), 12),  # caps bind
]


@pytest.mark.parametrize("cfg, clients", WELFARE_CASES)
def test_social_optimum_welfare_dominates_every_mechanism(cfg, clients):
  costs, weights = costs_and_weights(seed=7, games=200, clients=clients, cost_high=3.0, weight_sigma=1.0)
  best = _solve(baselines.social_optimum, costs, weights, cfg).social_welfare
  for name in MECHANISMS:
    out = _solve(lambda c, w, g, n=name: baselines.solve_mechanism(n, c, w, g), costs, weights, cfg)
    assert np.all(best >= out.social_welfare - TOL), name
    chex.assert_trees_all_equal(out, _solve(getattr(baselines, name), costs, weights, cfg))


@pytest.mark.parametrize("cfg, clients", WELFARE_CASES)
def test_social_optimum_satisfies_water_filling_kkt(cfg, clients):
  costs, weights = costs_and_weights(seed=8, games=200, clients=clients, cost_high=3.0, weight_sigma=1.0)
  out = _solve(baselines.social_optimum, costs, weights, cfg)
  eps = np.asarray(out.budgets)
  # d/d eps_i of lam log(1 + sum_j w_j eps_j) - sum_j c_j eps_j.
  marginal = cfg.lam * weights / (1.0 + np.sum(weights * eps, axis=1, keepdims=True)) - costs
  at_zero, at_cap = eps <= 0, eps >= cfg.eps_max
  assert np.all(marginal[at_zero] <= TOL)
  assert np.all(marginal[at_cap] >= -TOL)
  assert np.all(np.abs(marginal[~at_zero & ~at_cap]) <= TOL)
  assert np.all((eps >= 0) & (eps <= cfg.eps_max))
  # At most one client is strictly inside (0, eps_max): the marginal client of the water level.
  assert np.all(np.sum(~at_zero & ~at_cap, axis=1) <= 1)
  np.testing.assert_allclose(out.server_utility, out.social_welfare, atol=TOL)
  np.testing.assert_allclose(out.client_utilities, 0.0, atol=TOL)


def test_social_optimum_beats_random_feasible_points():
  cfg = GameConfig(lam=15.0, eps_max=2.0)
  costs, weights = costs_and_weights(seed=9, games=20, clients=8, weight_sigma=1.0)
  best = np.asarray(_solve(baselines.social_optimum, costs, weights, cfg).social_welfare)
  rng = np.random.default_rng(10)
  trials = rng.uniform(0.0, cfg.eps_max, (20, 5000, 8)) * (rng.uniform(size=(20, 5000, 8)) < 0.7)
  welfare = cfg.lam * np.log1p(np.einsum("gsn,gn->gs", trials, weights)) - np.einsum(
    "gsn,gn->gs", trials, costs
  )
  assert np.all(best[:, None] >= welfare - TOL)


# ---------------------------------------------------------------------------------------------------------
# Posted price, no incentive, Stackelberg.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [GameConfig(), GameConfig(lam=60.0, eps_max=1.0), GameConfig(lam=0.5)])
def test_posted_price_optimum_beats_a_fine_price_grid(cfg):
  costs, weights = costs_and_weights(seed=11, games=30, clients=10, weight_sigma=1.0)
  out = _solve(baselines.posted_price, costs, weights, cfg)
  prices = np.linspace(0.0, 2.5, 5001)
  takes = costs[:, None, :] <= prices[None, :, None]  # [G, P, N]
  grid = cfg.lam * np.log1p(cfg.eps_max * np.sum(takes * weights[:, None, :], axis=2)) - prices[
    None, :
  ] * cfg.eps_max * np.sum(takes, axis=2)
  assert np.all(out.server_utility >= grid.max(axis=1) - TOL)
  # One price for all: clients take eps_max exactly when their cost is below it, each paid p eps_max.
  eps = np.asarray(out.budgets)
  assert np.all((eps == 0) | (eps == cfg.eps_max))
  price = out.payments / np.where(eps > 0, eps, 1.0)
  some = (eps > 0).any(axis=1)
  np.testing.assert_allclose(
    np.where(eps > 0, price, -np.inf).max(axis=1)[some],
    np.where(eps > 0, price, np.inf).min(axis=1)[some],
    rtol=1e-12,
  )
  taker_cost = np.where(eps > 0, costs, -np.inf).max(axis=1)
  refuser_cost = np.where(eps > 0, np.inf, costs).min(axis=1)
  assert np.all(taker_cost < refuser_cost)


def test_no_incentive_matches_the_hand_formula():
  cfg = GameConfig(eps_min=0.75)
  costs, weights = np.array([0.5, 1.0, 2.0]), np.array([0.5, 1.0, 1.5])
  out = baselines.no_incentive(costs, weights, cfg)
  value = cfg.lam * np.log(1.0 + 0.75 * 3.0)
  np.testing.assert_allclose(out.budgets, 0.75)
  np.testing.assert_allclose(out.payments, 0.0)
  np.testing.assert_allclose(out.client_utilities, -0.75 * costs)
  np.testing.assert_allclose(out.server_utility, value)
  np.testing.assert_allclose(out.social_welfare, value - 0.75 * 3.5)
  np.testing.assert_allclose(out.average_utility, (value - 0.75 * 3.5) / 4)
  assert int(out.participants) == 3 and float(out.total_payment) == 0.0


def test_stackelberg_uses_the_closed_form():
  cfg = GameConfig(lam=10.0)
  costs, weights = costs_and_weights(seed=12, games=1, clients=15)
  costs, weights = costs[0], weights[0]
  out = baselines.stackelberg(costs, weights, cfg)
  payment = jax.jit(equilibrium.closed_form_payment)(cfg.lam, costs, weights)
  budgets = jax.jit(equilibrium.closed_form_budgets)(payment, costs, weights)
  assert np.all(budgets < cfg.eps_max)
  np.testing.assert_allclose(out.budgets, budgets, rtol=1e-12)
  np.testing.assert_allclose(out.total_payment, payment, rtol=1e-12)
  shares = weights * budgets / np.sum(weights * budgets)
  np.testing.assert_allclose(out.payments, payment * shares, rtol=1e-12)
  assert np.all(out.client_utilities >= -TOL)


# ---------------------------------------------------------------------------------------------------------
# Three-party game.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregators, clients", [(2, 6), (3, 20), (8, 9)])  # (8, 9): 4 groups
def test_three_party_double_marginalization_lowers_welfare(aggregators, clients):
  # eps_max large enough that no cap binds: both closed forms are exact equilibria.
  cfg = GameConfig(num_aggregators=aggregators, eps_max=1e6, lam=20.0)
  costs, weights = costs_and_weights(seed=13, games=200, clients=clients, cost_high=3.0, weight_sigma=1.0)
  direct = _solve(baselines.stackelberg, costs, weights, cfg)
  mediated = _solve(baselines.three_party, costs, weights, cfg)
  assert np.all(mediated.social_welfare <= direct.social_welfare + TOL)
  assert np.all(mediated.server_utility <= direct.server_utility + TOL)
  assert np.all(mediated.intermediary_utility >= -TOL)
  assert np.all(mediated.client_utilities >= -TOL)


def test_three_party_is_an_equilibrium_at_both_levels():
  cfg = GameConfig(num_aggregators=3, eps_max=1e6, lam=20.0)
  costs, weights = costs_and_weights(seed=14, games=1, clients=11, weight_sigma=1.0)
  costs, weights = costs[0], weights[0]
  out = baselines.three_party(costs, weights, cfg)
  eps, pay = np.asarray(out.budgets), np.asarray(out.payments)
  group = np.argsort(np.argsort(costs / weights)) % 3  # round-robin over the sorted normalized costs
  members = group[:, None] == np.arange(3)[None, :]  # [N, M]
  x = weights * eps
  group_x, group_pay = x @ members, pay @ members  # X_m, P_m
  total_x, total = group_x.sum(), float(out.total_payment)
  # Clients: no unilateral change of eps_i inside the group pays more (grid up to 3x the group's X_m).
  trial = np.linspace(0.0, 3.0, 3001)[None, :] * (group_x @ members.T)[:, None] / weights[:, None]
  others = (group_x @ members.T - x)[:, None]
  mine = weights[:, None] * trial
  pot = (group_pay @ members.T)[:, None]  # P_m of each client's group
  deviation = pot * mine / np.maximum(others + mine, 1e-300) - costs[:, None] * trial
  assert np.all(out.client_utilities[:, None] >= deviation - 1e-7 * (1 + np.abs(deviation)))
  # Aggregators: X_m = a_m P_m inside each group; no unilateral change of P_m pays more.
  rate = group_x / group_pay
  trial_pay = np.linspace(0.0, 3.0, 3001)[None, :] * group_pay[:, None]
  trial_x = rate[:, None] * trial_pay
  margin = total * trial_x / (total_x - group_x[:, None] + trial_x) - trial_pay
  own_margin = total * group_x / total_x - group_pay
  assert np.all(own_margin[:, None] >= margin - 1e-7 * (1 + np.abs(margin)))
  np.testing.assert_allclose(own_margin.sum(), out.intermediary_utility, rtol=1e-10)


def test_three_party_handles_few_clients_and_one_aggregator():
  costs, weights = jnp.array([0.5, 0.8, 1.0, 1.4, 1.9]), jnp.ones(5)
  capped = baselines.three_party(costs, weights, GameConfig(num_aggregators=10))  # at most N // 2 = 2 groups
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(capped))
  assert int(capped.participants) >= 2 and float(capped.social_welfare) > 0
  alone = baselines.three_party(costs, weights, GameConfig(num_aggregators=1))
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(alone))
  assert int(alone.participants) == 0 and float(alone.total_payment) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Dispatcher and input errors.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name, costs, weights, cfg, match",
  [
    ("stackelberg", [1.0], [1.0], GameConfig(), "at least 2 clients"),
    ("contract", [1.0, 0.0], [1.0, 1.0], GameConfig(), r"costs\[1\]=0.0"),
    ("posted_price", [1.0, np.nan], [1.0, 1.0], GameConfig(), r"costs\[1\]=nan"),
    ("social_optimum", [1.0, -2.0, 1.0], [1.0, 1.0, 1.0], GameConfig(), r"costs\[1\]=-2.0"),
    ("three_party", [1.0, 2.0], [1.0, -1.0], GameConfig(), r"weights\[1\]=-1.0"),
    ("no_incentive", [1.0, 2.0, 3.0], [1.0, 1.0], GameConfig(), "shape"),
    ("stackelberg", [[1.0, 2.0]], [[1.0, 1.0]], GameConfig(), "one game"),
    ("auction", [1.0, 2.0], [1.0, 1.0], GameConfig(), "mechanism='auction'"),
    ("contract", [1.0, 2.0], [1.0, 1.0], GameConfig(quality="dp"), "quality='dp'"),
    ("contract", [1.0, 2.0], [1.0, 1.0], {"lam": 1.0}, "expected a GameConfig"),
  ],
)
def test_bad_inputs_raise_config_errors(name, costs, weights, cfg, match):
  with pytest.raises(ConfigError, match=match):
    baselines.solve_mechanism(name, np.asarray(costs), np.asarray(weights), cfg)

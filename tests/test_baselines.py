"""The mechanisms ``baselines.solve`` runs: the Stackelberg game (fcfn_jax/game/stackelberg.py) and the
baselines (fcfn_jax/game/baselines.py; docs/model.md "Baselines"), both valuations, float64."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax.config import MECHANISMS
from fcfn_jax.game import baselines, common, equilibrium, leader, solver, valuation
from fcfn_jax.game.outcome import build_outcome
from fcfn_jax.validate import ConfigError
from tests.games import costs_and_weights, game, spec, take

TOL = 1e-9
CLIENTS = 8
VALUATIONS = ("dp", "log")

pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64


def games(seed: int, count: int, clients: int = CLIENTS, **fields):
  costs, weights = costs_and_weights(seed=seed, games=count, clients=clients, cost_high=3.0, weight_sigma=1.0)
  return game(costs, weights, **fields)


def each(name: str, gs, valuation: str = "dp", **spec_fields):
  """Mechanism ``name`` on every game of a stack, one jitted call per game (one compile per spec)."""
  s = spec(valuation, name, **spec_fields)
  outs = [baselines.solve(take(gs, i), s) for i in range(gs.costs.shape[0])]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)


def _menu_rewards(type_costs, budgets):
  """Binding IR of the last type and binding local downward IC, written as the recursion."""
  rewards = np.zeros_like(budgets)
  rewards[-1] = type_costs[-1] * budgets[-1]
  for k in range(len(budgets) - 2, -1, -1):
    rewards[k] = rewards[k + 1] + type_costs[k] * (budgets[k] - budgets[k + 1])
  return rewards


def _menu_profits(g, s, menu, budgets):
  """Server utility of monotone menus with the binding rewards: lam Q(eps_type(i)) - sum_k n_k r_k: [S]."""
  type_costs, counts, types = (np.asarray(a) for a in menu[:3])
  rewards = np.stack([_menu_rewards(type_costs, b) for b in budgets])
  quality = jax.vmap(lambda b: valuation.quality(b[types], g, s))(jnp.asarray(budgets))
  return np.asarray(g.lam * quality) - rewards @ counts


# ---------------------------------------------------------------------------------------------------------
# Contract theory.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "num_types, eps_max, valuation_name",
  [
    (types, eps_max, v)
    if (types, eps_max) in ((0, 8.0), (4, 1.0)) or v == "log"
    # each menu size is a ~10 s compile under 'dp' on CI: two sizes by default, all four with -m slow
    else pytest.param(types, eps_max, v, marks=pytest.mark.slow)
    for types, eps_max in ((0, 8.0), (3, 8.0), (4, 1.0), (1, 8.0))
    for v in VALUATIONS
  ],
)
def test_contract_is_individually_rational_and_incentive_compatible(valuation_name, num_types, eps_max):
  gs = games(3, 6, eps_max=eps_max, lam=40.0)
  s = spec(valuation_name, "contract", num_types=num_types)
  k = CLIENTS if num_types == 0 else num_types
  for i in range(6):
    g = take(gs, i)
    menu = baselines.contract_menu(g, s)
    out = baselines.solve(g, s)
    eps, rewards, theta = (np.asarray(a) for a in (menu.budgets, menu.rewards, menu.type_costs))
    chex.assert_shape([menu.budgets, menu.rewards, menu.type_costs], (k,))
    assert np.all(np.diff(theta) >= 0)
    assert np.all(np.diff(eps) <= TOL), "budgets must not increase with the type cost"
    assert np.all((eps >= 0) & (eps <= eps_max + TOL))
    np.testing.assert_allclose(rewards, _menu_rewards(theta, eps), atol=TOL)
    # IR and IC for every type: [type, item].
    type_value = rewards[None, :] - theta[:, None] * eps[None, :]
    own = np.diagonal(type_value)
    assert np.all(own >= -TOL) and np.all(own[:, None] >= type_value - TOL)
    # Every client does at least as well with its own type's item as with any other or opting out.
    costs = np.asarray(g.costs)
    client_value = rewards[None, :] - costs[:, None] * eps[None, :]
    mine = client_value[np.arange(CLIENTS), np.asarray(menu.types)]
    assert np.all(mine >= -TOL) and np.all(mine[:, None] >= client_value - TOL)
    np.testing.assert_allclose(out.client_utilities, np.maximum(client_value.max(axis=1), 0.0), atol=1e-8)


def _brute_iron(values, weights):
  """The isotonic regression by its min-max formula, O(K^3): max_{a<=k} min_{b>=k} mean of a..b."""
  k = len(values)
  mean = lambda a, b: values[a : b + 1].sum() / weights[a : b + 1].sum()
  return np.array([max(min(mean(a, b) for b in range(j, k)) for a in range(j + 1)) for j in range(k)])


def _iron_cases():
  """Random weighted values, rounded values (ties), unit weights, and long chains of violators that
  outlast the parallel pooling rounds (the sequential pass finishes them)."""
  rng = np.random.default_rng(21)
  for k in (1, 2, 3, 7, 40, 120):
    for case in range(8):
      values = rng.normal(size=k)
      weights = rng.uniform(0.1, 3.0, k) if case % 2 else np.ones(k)
      if case in (2, 3):
        values = np.round(2.0 * values) / 2.0
      if case in (4, 5):
        values = np.r_[np.arange(k - 1.0), -10.0 * k][-k:]  # one violator pooled with every block
      if case == 6:
        values = -np.sort(values)  # decreasing: one pool
      yield values, weights


def test_iron_is_the_isotonic_regression():
  iron = jax.jit(baselines._iron)
  for values, weights in _iron_cases():
    got = np.asarray(iron(jnp.asarray(values), jnp.asarray(weights)))
    np.testing.assert_allclose(got, _brute_iron(values, weights), rtol=1e-12, atol=1e-12)
    assert np.all(np.diff(got) >= 0)


def test_iron_under_vmap_matches_one_at_a_time():
  rng = np.random.default_rng(22)
  values, weights = rng.normal(size=(5, 30)), rng.uniform(0.5, 2.0, (5, 30))
  values[0] = np.r_[np.arange(29.0), -100.0]  # needs the sequential pass, beside games that do not
  batched = jax.vmap(baselines._iron)(jnp.asarray(values), jnp.asarray(weights))
  for i in range(5):
    np.testing.assert_allclose(batched[i], _brute_iron(values[i], weights[i]), rtol=1e-12, atol=1e-12)


def test_monotone_projection_is_the_closest_monotone_menu():
  """Against random points of the set {eps_max >= e_1 >= ... >= e_K >= 0}: none is closer."""
  rng = np.random.default_rng(23)
  project = jax.jit(baselines._monotone_projection(2.0))
  for _ in range(10):
    e = rng.uniform(-1.0, 3.0, 6)
    p = np.asarray(project(jnp.asarray(e)))
    assert np.all(np.diff(p) <= 0) and np.all((p >= 0) & (p <= 2.0))
    trials = -np.sort(-rng.uniform(0.0, 2.0, (5000, 6)), axis=1)
    assert np.sum((p - e) ** 2) <= np.min(np.sum((trials - e) ** 2, axis=1)) + 1e-12


def test_contract_irregular_types_are_ironed_and_the_menu_is_optimal():
  # One client per type; the third type brings most of the data, so its virtual cost per unit of
  # contribution (C_k / W_k = [1, 6, 0.28, 1.6]) is below the second's: the two are pooled.
  s = spec("log", "contract", num_types=4)
  g = game(np.array([1.0, 1.1, 1.2, 1.3]), np.array([1.0, 0.2, 5.0, 1.0]), lam=3.0, eps_max=1.0)
  menu = baselines.contract_menu(g, s)
  eps = np.asarray(menu.budgets)
  assert eps[1] == pytest.approx(eps[2]) and eps[2] > 0 and eps[0] >= eps[1]
  trials = -np.sort(-np.random.default_rng(4).uniform(0.0, 1.0, (20000, 4)), axis=1)
  best = _menu_profits(g, s, menu, eps[None])[0]
  assert best >= _menu_profits(g, s, menu, trials).max() - TOL
  chex.assert_trees_all_close(baselines.solve(g, s).server_utility, best, atol=TOL)


@pytest.mark.parametrize("valuation_name", [pytest.param("dp", marks=pytest.mark.slow), "log"])
def test_contract_menu_beats_random_monotone_menus(valuation_name):
  s = spec(valuation_name, "contract", num_types=4)
  gs = games(5, 8, lam=40.0, eps_max=4.0)
  rng = np.random.default_rng(6)
  for i in range(8):
    g = take(gs, i)
    menu = jax.tree.map(np.asarray, baselines.contract_menu(g, s))
    trials = -np.sort(-rng.uniform(0.0, 4.0, (3000, 4)), axis=1)
    trials[:5] = 4.0 * np.tri(5, 4, -1)  # the threshold menus
    best = _menu_profits(g, s, menu, menu.budgets[None])[0]
    assert best >= _menu_profits(g, s, menu, trials).max() - 1e-9 * abs(best)


def test_the_generic_menu_search_finds_the_exact_log_menu():
  """The path the 'dp' valuation takes, held against the closed form (ironing) on 'log'."""
  s = spec("log", "contract", num_types=4)
  gs = games(7, 6, lam=40.0, eps_max=4.0)
  for i in range(6):
    g = take(gs, i)
    menu = baselines.contract_menu(g, s)
    generic = jax.jit(baselines._generic_menu_budgets, static_argnums=1)(g, s, menu.types, menu.type_costs)
    exact, found = (_menu_profits(g, s, menu, np.asarray(b)[None])[0] for b in (menu.budgets, generic))
    np.testing.assert_allclose(found, exact, rtol=1e-6)


def test_more_contract_types_never_lower_the_server_utility():
  """Nested quantile types (2, 4, 8, 16 = N clients): each menu is feasible for the finer partition."""
  costs, weights = costs_and_weights(seed=8, games=4, clients=16, cost_high=3.0, weight_sigma=1.0)
  gs = game(costs, weights, lam=40.0, eps_max=4.0)
  utility = np.array(
    [
      [
        baselines.solve(take(gs, i), spec("log", "contract", num_types=k)).server_utility
        for k in (2, 4, 8, 16)
      ]
      for i in range(4)
    ]
  )
  assert np.all(np.diff(utility, axis=1) >= -TOL), utility


# ---------------------------------------------------------------------------------------------------------
# Social optimum.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "valuation_name, eps_max",
  [
    ("dp", 1.0),
    pytest.param("log", 8.0, marks=pytest.mark.slow),
    pytest.param("dp", 8.0, marks=pytest.mark.slow),
    pytest.param("log", 1.0, marks=pytest.mark.slow),
  ],
)
def test_social_optimum_welfare_dominates_every_mechanism(valuation_name, eps_max):
  gs = games(7, 6, lam=40.0, eps_max=eps_max)
  best = each("social_optimum", gs, valuation_name).social_welfare
  for name in MECHANISMS:
    out = each(name, gs, valuation_name)
    assert np.all(best >= out.social_welfare - 1e-9 * np.abs(best)), (name, best - out.social_welfare)


def test_social_optimum_satisfies_water_filling_kkt():
  gs = games(8, 20, lam=40.0, eps_max=1.0)
  out = each("social_optimum", gs, "log")
  eps = np.asarray(out.budgets)
  costs, weights = np.asarray(gs.costs), np.asarray(gs.weights)
  marginal = 40.0 * weights / (1.0 + np.sum(weights * eps, axis=1, keepdims=True)) - costs
  at_zero, at_cap = eps <= 0, eps >= 1.0
  assert np.all(marginal[at_zero] <= TOL) and np.all(marginal[at_cap] >= -TOL)
  assert np.all(np.abs(marginal[~at_zero & ~at_cap]) <= TOL)
  assert np.all(np.sum(~at_zero & ~at_cap, axis=1) <= 1)  # only the marginal client is in between
  np.testing.assert_allclose(out.server_utility, out.social_welfare, atol=TOL)
  np.testing.assert_allclose(out.client_utilities, 0.0, atol=TOL)


def test_the_generic_welfare_search_finds_water_filling():
  """The path the 'dp' valuation takes, held against the closed form on 'log'."""
  gs = games(9, 8, lam=40.0, eps_max=1.0)
  s = spec("log", "social_optimum")
  search = jax.jit(baselines._welfare_budgets, static_argnums=1)
  for i in range(8):
    g = take(gs, i)
    exact = baselines.solve(g, s)
    budgets = search(g, s)
    found = build_outcome(budgets, g.costs * budgets, g, s)
    np.testing.assert_allclose(found.social_welfare, exact.social_welfare, rtol=1e-8)


@pytest.mark.parametrize("valuation_name", VALUATIONS)
def test_social_optimum_beats_random_feasible_points(valuation_name):
  gs = games(10, 6, lam=40.0, eps_max=2.0)
  best = np.asarray(each("social_optimum", gs, valuation_name).social_welfare)
  rng = np.random.default_rng(11)
  s = spec(valuation_name)
  welfare = jax.jit(
    jax.vmap(lambda e, g: g.lam * valuation.quality(e, g, s) - jnp.dot(g.costs, e), in_axes=(0, None))
  )
  for i in range(6):
    trials = rng.uniform(0.0, 2.0, (4000, CLIENTS)) * (rng.uniform(size=(4000, CLIENTS)) < 0.7)
    assert best[i] >= np.max(welfare(jnp.asarray(trials), take(gs, i))) - 1e-9 * abs(best[i])


# ---------------------------------------------------------------------------------------------------------
# Posted price, no incentive, Stackelberg.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("valuation_name", VALUATIONS)
def test_posted_price_optimum_beats_a_fine_price_grid(valuation_name):
  gs = games(11, 6, lam=60.0, eps_max=2.0)
  out = each("posted_price", gs, valuation_name)
  s = spec(valuation_name)
  prices = jnp.linspace(0.0, 3.5, 3001)

  def grid(g):
    def at(p):
      budgets = jnp.where(g.costs <= p, g.eps_max, 0.0)
      return g.lam * valuation.quality(budgets, g, s) - p * jnp.sum(budgets)

    return jnp.max(jax.vmap(at)(prices))

  best = np.asarray(jax.jit(jax.vmap(grid))(gs))
  assert np.all(out.server_utility >= best - 1e-9 * np.abs(best))
  eps = np.asarray(out.budgets)
  assert np.all((eps == 0) | (eps == 2.0))  # one price: all or nothing
  taker = np.where(eps > 0, np.asarray(gs.costs), -np.inf).max(axis=1)
  refuser = np.where(eps > 0, np.inf, np.asarray(gs.costs)).min(axis=1)
  assert np.all(taker < refuser)


@pytest.mark.parametrize("valuation_name", VALUATIONS)
def test_no_incentive_is_a_mandate_that_violates_individual_rationality(valuation_name):
  costs, weights = np.array([0.5, 1.0, 2.0]), np.array([0.5, 1.0, 1.5])
  g = game(costs, weights, eps_min=0.75)
  s = spec(valuation_name, "no_incentive")
  out = baselines.solve(g, s)
  value = 50.0 * valuation.quality(jnp.full(3, 0.75), g, s)
  np.testing.assert_allclose(out.budgets, 0.75)
  np.testing.assert_allclose(out.payments, 0.0)
  np.testing.assert_allclose(out.client_utilities, -0.75 * costs)
  assert np.all(out.client_utilities < 0)
  np.testing.assert_allclose(out.server_utility, value)
  np.testing.assert_allclose(out.social_welfare, value - 0.75 * 3.5)
  np.testing.assert_allclose(out.average_utility, (value - 0.75 * 3.5) / 4)


@pytest.mark.parametrize("valuation_name", ["dp", pytest.param("log", marks=pytest.mark.slow)])
def test_stackelberg_is_the_capped_leader_optimum(valuation_name):
  gs = games(12, 3, lam=40.0, eps_max=1.0)
  s = spec(valuation_name)
  for i in range(3):
    g = take(gs, i)
    out = baselines.solve(g, s)
    best = jax.jit(leader.solve_leader, static_argnums=1)(g, s)
    assert np.any(np.asarray(out.budgets) >= 1.0)  # caps bind
    np.testing.assert_allclose(out.budgets, best.budgets, rtol=1e-12)
    np.testing.assert_allclose(out.total_payment, best.payment, rtol=1e-12)
    np.testing.assert_allclose(out.server_utility, best.utility, rtol=1e-12)
    x = np.asarray(g.weights * out.budgets)
    np.testing.assert_allclose(out.payments, best.payment * x / x.sum(), rtol=1e-12)
    assert np.all(out.client_utilities >= -TOL)


def test_stackelberg_without_binding_caps_is_the_closed_form():
  g = take(games(13, 1, lam=10.0, eps_max=1e3), 0)
  out = baselines.solve(g, spec("log"))
  payment = equilibrium.closed_form_payment(g.lam, g.costs, g.weights)
  np.testing.assert_allclose(out.total_payment, payment, rtol=1e-6)
  np.testing.assert_allclose(
    out.budgets, equilibrium.closed_form_budgets(payment, g.costs, g.weights), rtol=1e-5
  )


# ---------------------------------------------------------------------------------------------------------
# Three-party game.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("valuation_name", [pytest.param("dp", marks=pytest.mark.slow), "log"])
def test_three_party_double_marginalization_lowers_the_server_utility(valuation_name):
  gs = games(13, 4, lam=20.0, eps_max=8.0)
  direct = each("stackelberg", gs, valuation_name)
  mediated = each("three_party", gs, valuation_name)
  assert np.all(mediated.server_utility <= direct.server_utility + 1e-9 * np.abs(direct.server_utility))
  assert np.all(mediated.intermediary_utility >= -TOL)
  assert np.all(mediated.client_utilities >= -TOL)


def _group_total(payment, k, caps):
  """The capped equilibrium total X of one group at payment P, by the generic solver (w = 1 units)."""
  eps = solver.share_equilibrium(payment, k, np.ones(len(k)), caps)
  return float(np.sum(eps))


@pytest.mark.parametrize(
  "eps_max, factors",
  [(8.0, np.linspace(0.2, 3.0, 29)), pytest.param(1.0, np.linspace(0.97, 1.03, 7), marks=pytest.mark.slow)],
)
def test_three_party_is_an_equilibrium_at_both_levels_with_caps(eps_max, factors):
  """Followers: exact capped equilibria inside each group. Aggregators: no change of P_m pays. With caps
  binding a group's cost C_m(X_m) bends down where a new follower enters, so an aggregator's payoff is not
  concave: the aggregators' equilibrium is then checked against nearby deviations (a local equilibrium)."""
  g = take(games(14, 1, lam=30.0, eps_max=eps_max), 0)
  out = baselines.solve(g, spec("dp", "three_party"))
  costs, weights, eps = (np.asarray(a) for a in (g.costs, g.weights, out.budgets))
  pay = np.asarray(out.payments)
  groups = 4  # min(num_aggregators = 4, N // 2)
  group = np.argsort(np.argsort(costs / weights)) % groups  # round-robin over the sorted normalized costs
  assert out.participants >= 2
  x = weights * eps
  totals = np.array([x[group == m].sum() for m in range(groups)])
  pots = np.array([pay[group == m].sum() for m in range(groups)])
  for m in range(groups):
    members = group == m
    k, caps = costs[members] / weights[members], weights[members] * eps_max
    if pots[m] > 0:  # the group's payment split in proportion is its capped equilibrium
      np.testing.assert_allclose(_group_total(pots[m], k, caps), totals[m], rtol=1e-6)
      params = solver.ShareParams(pots[m], costs[members])
      grid = jnp.linspace(0.0, eps_max, 2001)[:, None] * jnp.ones(members.sum())
      gains = solver.unilateral_gains(
        solver.proportional_share_utility, eps[members], weights[members], params, grid
      )
      floor = 1e-9 * pots[m]
      assert np.all(gains <= 1e-6 * np.maximum(np.abs(pay[members] - costs[members] * eps[members]), floor))
  server = float(out.total_payment)  # R: the clients' payments plus the aggregators' margins
  for m in range(groups):
    members = group == m
    k, caps = costs[members] / weights[members], weights[members] * eps_max
    own = server * totals[m] / totals.sum() - pots[m]
    for factor in factors:
      trial = _group_total(factor * pots[m], k, caps)
      margin = server * trial / (totals.sum() - totals[m] + trial) - factor * pots[m]
      assert own >= margin - 1e-6 * (1 + abs(margin)), (m, factor)


def test_three_party_with_one_aggregator_buys_nothing():
  gs = games(15, 1, lam=30.0)
  alone = baselines.solve(take(gs, 0), spec("log", "three_party", num_aggregators=1))
  assert int(alone.participants) == 0 and float(alone.total_payment) == 0.0
  many = baselines.solve(take(gs, 0), spec("log", "three_party", num_aggregators=10))  # M = N // 2 = 4
  assert int(many.participants) >= 2 and float(many.social_welfare) > 0


@pytest.mark.parametrize("clients", [2, 3])
def test_three_party_below_four_clients_has_no_market_and_says_why(clients):
  g = take(games(16, 1, clients=clients, lam=30.0), 0)
  out = baselines.solve(g, spec("dp", "three_party"))
  assert int(out.participants) == 0 and float(out.total_payment) == 0.0
  note = baselines.no_market("three_party", 4, clients, int(out.participants))
  assert note.startswith(f"no market: three_party has one aggregator at N={clients} clients")
  assert baselines.no_market("three_party", 1, 8, 0).startswith("no market: three_party has one aggregator")
  assert baselines.no_market("posted_price", 4, 8, 0) == (
    "no market: posted_price buys no budget from any of the 8 clients"
  )
  assert baselines.no_market("three_party", 4, 8, 2) == ""


def _round_robin(k, caps, groups):
  """[N] -> [M, slots] as three_party deals sorted k (padding: k = max k, cap 0)."""
  order = np.argsort(k)
  slots = -(-len(k) // groups)

  def deal(values, fill):
    padded = np.concatenate([values[order], np.full(groups * slots - len(k), fill)])
    return jnp.asarray(padded.reshape(slots, groups).T)

  return deal(k, k.max()), deal(caps, 0.0)


# Each case is a compile of both costs' gradients: two by default, all with -m slow.
@pytest.mark.parametrize(
  "slots, padding",
  [(13, 1), (200, 1), *(pytest.param(n, p, marks=pytest.mark.slow) for n, p in ((2, 0), (5, 1), (60, 0)))],
)
def test_group_cost_pieces_are_capped_level(slots, padding):
  """C(X) = X^2 / y(X) from the swept pieces equals the capped_level search at every X, with the same
  slope in X and the same gradient in the real clients' k and caps (caps varied so that clients cap,
  enter after others cap and all cap)."""
  rng = np.random.default_rng(slots)
  costs, weights = costs_and_weights(seed=slots, games=1, clients=slots, cost_high=3.0, weight_sigma=1.0)
  k = np.sort(costs[0] / weights[0])
  caps = weights[0] * 8.0 * rng.uniform(0.1, 1.0, slots)
  k, caps = np.concatenate([k, [k[-1]] * padding]), np.concatenate([caps, [0.0] * padding])
  full = caps.sum()
  segments = baselines._cost_segments(jnp.asarray(k), jnp.asarray(caps))
  breaks = np.asarray(segments.breaks)[: int(segments.last) + 1]
  assert np.all(np.diff(breaks) >= 0) and np.isclose(breaks[-1], full, rtol=1e-12)
  totals = jnp.asarray(np.concatenate([rng.uniform(0.0, full, 500), [full]]))

  def cost(total, k, caps, pieces):
    return baselines._group_cost(total, k, caps, baselines._cost_segments(k, caps) if pieces else None)

  value = jax.jit(
    jax.vmap(jax.value_and_grad(cost, argnums=(0, 1, 2)), (0, None, None, None)), static_argnums=3
  )
  (c_new, d_new), (c_old, d_old) = (
    value(totals, jnp.asarray(k), jnp.asarray(caps), p) for p in (True, False)
  )
  np.testing.assert_allclose(c_new, c_old, rtol=1e-12)
  np.testing.assert_allclose(d_new[0], d_old[0], rtol=1e-10)
  real = slice(0, slots)  # padding caps are constants (three_party never differentiates them)
  for new, old in zip(d_new[1:], d_old[1:]):
    np.testing.assert_allclose(new[:-1, real], old[:-1, real], rtol=1e-9, atol=1e-12 * np.abs(old).max())


def _kkt_gaps(payment, totals, k, caps):
  """Each aggregator's first-order condition F_m = R (X - X_m) / X^2 - C_m'(X_m) just left and right of
  X_m: [2, M] (capped_level costs). A KKT point has F(X_m-) >= 0 unless X_m = 0 and F(X_m+) <= 0 unless
  X_m is its group's cap sum: a root of F or a jump of C_m' across 0."""
  aggregate = jnp.sum(totals)
  slope = jax.vmap(jax.grad(baselines._group_cost), (0, 0, 0))

  def foc(x):
    return payment * (aggregate - x) / aggregate**2 - slope(x, k, caps)

  return jnp.stack([foc(totals * (1 - 1e-9)), foc(totals * (1 + 1e-9))])


@pytest.mark.parametrize(
  "clients, seed", [(50, 0), *(pytest.param(n, s, marks=pytest.mark.slow) for n, s in ((120, 1), (200, 2)))]
)
def test_aggregator_equilibrium_from_pieces_is_the_reference(clients, seed):
  """The aggregators' equilibrium totals X_m(R) with each group's cost from its pieces equal those with
  capped_level at every call (the reference) over R's range, wherever both are trusted (the solver
  marks an untrusted answer NaN, which for an aggregator at a kink of its cost is decided at rounding
  level, for either evaluation). Where C_m' jumps down (a follower enters after others cap) an
  aggregator's first-order condition can have two roots, and which one the root finder reaches depends
  on rounding-level differences of its path: there both answers must be KKT points, and that is rare."""
  costs, weights = costs_and_weights(seed=seed, games=1, clients=clients, cost_high=3.0, weight_sigma=1.0)
  k, caps = _round_robin(costs[0] / weights[0], weights[0] * 8.0, 4)
  full = jnp.sum(caps, axis=1)
  segments = jax.vmap(baselines._cost_segments)(k, caps)
  payments = float(baselines._group_upper_bound(k, caps)) * np.logspace(-6, 0, 40)

  @jax.jit
  def totals(payment):
    def solve(pieces):
      params = baselines._Groups(payment, k, caps, pieces)
      return solver.solve_equilibrium(baselines._aggregator_utility, jnp.ones(4), params, full)

    return solve(segments), solve(None)

  new, old = (np.stack(a) for a in zip(*(totals(r) for r in payments)))
  both = np.isfinite(new).all(1) & np.isfinite(old).all(1)
  assert both.sum() >= 30
  same = np.all(np.abs(new - old) <= 1e-9 * (np.abs(old) + float(full.max())), axis=1)
  assert np.sum(both & ~same) <= 2
  for r in np.flatnonzero(both & ~same):
    for x in (new[r], old[r]):
      left, right = np.asarray(_kkt_gaps(payments[r], jnp.asarray(x), k, caps))
      tol = 1e-6 * payments[r] / x.sum()
      assert np.all((left >= -tol) | (x <= 0)) and np.all((right <= tol) | (x >= full)), (r, x)


def _prepared(g, s):
  """The game and spec as the mechanism wrapper hands them to the jitted core (float64)."""
  s = common.canonical(s, g.costs.shape[-1], "num_aggregators")
  return valuation.with_noise_table(common.cast(g, jnp.float64), s), s


@pytest.mark.parametrize("valuation_name", [pytest.param("dp", marks=pytest.mark.slow), "log"])
def test_three_party_from_pieces_is_the_reference_outcome(valuation_name):
  """The whole three-party outcome at the tests' size is the one of the reference (capped_level at every
  call) to ~1e-6: the same equilibrium at both levels and the same payment."""
  gs = games(13, 3, lam=20.0, eps_max=8.0)
  reference = jax.jit(functools.partial(baselines._three_party, pieces=False), static_argnums=1)
  for i in range(3):
    g, s = _prepared(take(gs, i), spec(valuation_name, "three_party"))
    new, old = baselines.solve(take(gs, i), s), reference(g, s)
    for name, a, b in zip(new._fields, new, old):
      scale = max(float(np.max(np.abs(b))), 1e-12)
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * scale, err_msg=name)


@pytest.mark.parametrize("clients, seed", [(60, 3), pytest.param(150, 4, marks=pytest.mark.slow)])
def test_three_party_aggregators_gain_nothing_from_nearby_deviations(clients, seed):
  """At the outcome's payment R no aggregator gains by moving its total X_m on a fine grid of +-10%
  (others fixed): R X'_m / (X_-m + X'_m) - C_m(X'_m) with C_m from capped_level (not the pieces). The
  payoff is not concave where followers enter after others cap, so the check is local, as above."""
  costs, weights = costs_and_weights(seed=seed, games=1, clients=clients, cost_high=3.0, weight_sigma=1.0)
  g = game(costs[0], weights[0], lam=30.0 * clients / 8)
  out = baselines.solve(g, spec("log", "three_party"))
  k_all = costs[0] / weights[0]
  k, caps = _round_robin(k_all, weights[0] * 8.0, 4)
  x = np.asarray(out.budgets) * weights[0]
  totals = np.asarray(_round_robin(k_all, x, 4)[1]).sum(1)
  server = float(out.total_payment)
  assert out.participants >= 2 and server > 0
  cost = jax.jit(jax.vmap(baselines._group_cost, (0, None, None)))
  for m in range(4):
    grid = np.clip(totals[m] * np.linspace(0.9, 1.1, 2001), 1e-12, float(caps[m].sum()))
    trial = np.asarray(cost(jnp.asarray(np.append(grid, totals[m])), k[m], caps[m]))
    margins = server * np.append(grid, totals[m]) / (totals.sum() - totals[m] + np.append(grid, totals[m]))
    margins = margins - trial
    own = margins[-1]
    assert np.all(margins[:-1] <= own + 1e-7 * (1 + abs(own))), m


# ---------------------------------------------------------------------------------------------------------
# Dispatcher and input errors.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name, costs, weights, match",
  [
    ("stackelberg", [1.0], [1.0], "at least 2 clients"),
    ("contract", [1.0, 0.0], [1.0, 1.0], r"costs\[1\]=0.0"),
    ("posted_price", [1.0, np.nan], [1.0, 1.0], r"costs\[1\]=nan"),
    ("social_optimum", [1.0, -2.0, 1.0], [1.0, 1.0, 1.0], r"costs\[1\]=-2.0"),
    ("three_party", [1.0, 2.0], [1.0, -1.0], r"weights\[1\]=-1.0"),
    ("no_incentive", [1.0, 2.0, 3.0], [1.0, 1.0], "shapes"),
    ("stackelberg", [[1.0, 2.0]], [[1.0, 1.0]], "one game"),
  ],
)
def test_bad_games_raise_config_errors(name, costs, weights, match):
  costs, weights = np.asarray(costs, float), np.asarray(weights, float)
  g = game(costs, np.ones_like(costs))._replace(weights=jnp.asarray(weights))
  with pytest.raises(ConfigError, match=match):
    baselines.solve(g, spec("log", name))


def test_bad_specs_raise_config_errors():
  g = game(np.array([1.0, 2.0]), np.ones(2))
  with pytest.raises(ConfigError, match="mechanism='auction'"):
    spec("log", "auction")
  with pytest.raises(ConfigError, match="valuation='quadratic'"):
    spec("quadratic")
  with pytest.raises(ConfigError, match="spec=.* expected a GameSpec"):
    baselines.solve(g, {"mechanism": "contract"})
  with pytest.raises(ConfigError, match="num_types=-1"):
    dataclasses.replace(spec(), num_types=-1)

"""Strategic misreporting (fcfn_jax/game/misreport.py): honest limit, who gains by exaggerating,
accounting."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax import config as fc
from fcfn_jax import data, simulation
from fcfn_jax.config import MECHANISMS, GameConfig
from fcfn_jax.game import baselines, misreport, valuation
from fcfn_jax.validate import ConfigError
from tests.games import costs_and_weights, game, spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(lam=10.0, eps_max=8.0)
UNCAPPED = dict(lam=10.0, eps_max=1e3)  # no cap binds: the Stackelberg optimum is the closed form
FACTORS = jnp.linspace(1.0, 4.0, 31)
TOL = 1e-10
# Mechanisms whose outcome is individually rational on the reports (no_incentive imposes eps_min unpaid).
IR_MECHANISMS = tuple(m for m in MECHANISMS if m != "no_incentive")


pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64


def _single_liar_utilities(name: str, costs, weights, fields=CFG, factors=FACTORS, valuation_name="log"):
  """Outcomes with client i the only liar, for every i and factor: leaves [clients, factors, ...]."""
  masks = np.eye(costs.shape[-1], dtype=bool)
  g, s = game(costs, weights, **fields), spec(valuation_name, name)
  per_factor = jax.vmap(lambda m, mask: misreport.misreported_outcome(g, s, m, mask), in_axes=(0, None))
  return jax.vmap(per_factor, in_axes=(None, 0))(factors, masks)


@pytest.mark.parametrize(
  # three_party: ~20 s of compile on CI; its misreport path stays in the default run through the identities
  "name",
  [pytest.param(m, marks=pytest.mark.slow) if m == "three_party" else m for m in MECHANISMS],
)
def test_factor_one_reproduces_the_honest_outcome(name):
  costs, weights = costs_and_weights(seed=0, games=1, clients=8)
  g, s = game(costs[0], weights[0], **CFG), spec("dp", name)
  honest = baselines.solve(g, s)
  liars = misreport.choose_liars(8, 0.5, seed=1)
  for mask in (liars, None):
    out = misreport.misreported_outcome(g, s, 1.0, mask)
    # The mechanism's decisions are bitwise the honest ones; the re-accounted sums differ by roundoff only.
    for field in ("budgets", "payments", "participants", "intermediary_utility"):
      np.testing.assert_array_equal(getattr(out, field), getattr(honest, field), err_msg=field)
    chex.assert_trees_all_close(out, honest, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
  "name", [pytest.param(m, marks=pytest.mark.slow) if m == "three_party" else m for m in MECHANISMS]
)
def test_vmap_over_factors_matches_one_call_per_factor(name):
  costs, weights = costs_and_weights(seed=1, games=1, clients=8)
  g, s = game(costs[0], weights[0], **CFG), spec("log", name)
  liars = misreport.choose_liars(8, 0.25, seed=0)
  factors = jnp.array([1.0, 1.5, 2.0, 3.0])
  batched = jax.vmap(lambda m: misreport.misreported_outcome(g, s, m, liars))(factors)
  for j, m in enumerate(factors):
    single = misreport.misreported_outcome(g, s, float(m), liars)
    chex.assert_trees_all_close(jax.tree.map(lambda a, j=j: a[j], batched), single, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(
  "name, valuation_name",
  [
    # three_party under 'log' is a second ~20 s compile of the costliest mechanism: slow
    pytest.param(m, v, marks=pytest.mark.slow) if (m, v) == ("three_party", "log") else (m, v)
    for m in MECHANISMS
    for v in ("dp", "log")
  ],
)
def test_accounting_identities_hold_with_true_costs(name, valuation_name):
  costs, weights = costs_and_weights(seed=2, games=1, clients=8)
  c, w = costs[0], weights[0]
  g, s = game(c, w, **CFG), spec(valuation_name, name)
  liars = misreport.choose_liars(8, 0.5, seed=3)
  for m in (1.0, 2.0, 3.5):
    reported_c = np.asarray(misreport.reported_costs(c, m, liars))
    np.testing.assert_array_equal(reported_c, np.where(liars, m * c, c))
    on_reports = baselines.solve(g._replace(costs=jnp.asarray(reported_c)), s)
    out = misreport.misreported_outcome(g, s, m, liars)
    eps, pay = np.asarray(out.budgets), np.asarray(out.payments)
    # What the mechanism decides, and so the server's side, depends on the reports only.
    for field in ("budgets", "payments", "intermediary_utility"):
      np.testing.assert_array_equal(getattr(out, field), getattr(on_reports, field), err_msg=field)
    for field in ("server_utility", "total_payment"):
      np.testing.assert_allclose(getattr(out, field), getattr(on_reports, field), rtol=TOL, err_msg=field)
    value = CFG["lam"] * float(valuation.quality(out.budgets, g, s))
    u = np.asarray(out.client_utilities)
    np.testing.assert_allclose(u, pay - c * eps, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(out.social_welfare, value - np.sum(c * eps), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(
      out.social_welfare, out.server_utility + u.sum() + out.intermediary_utility, rtol=TOL, atol=TOL
    )
    parties = 8 + 1 + (4 if name == "three_party" else 0)
    np.testing.assert_allclose(out.average_utility, out.social_welfare / parties, rtol=TOL, atol=TOL)
    # Honest clients are accounted as before; liars keep the overstatement (m - 1) c_i eps_i on top.
    u_reports = np.asarray(on_reports.client_utilities)
    np.testing.assert_allclose(u[~liars], u_reports[~liars], rtol=TOL, atol=TOL)
    np.testing.assert_allclose(
      u[liars], u_reports[liars] + (m - 1) * c[liars] * eps[liars], rtol=TOL, atol=TOL
    )
    if name in IR_MECHANISMS:  # IR on the reports implies IR on the true costs, which are lower
      assert np.all(u >= -TOL), (m, u)
    # No mechanism on any reports beats the welfare of the honest social optimum.
    best = baselines.solve(g, spec(valuation_name, "social_optimum")).social_welfare
    assert out.social_welfare <= best + 1e-9 * abs(best)


def test_social_optimum_pays_liars_exactly_their_overstatement():
  costs, weights = costs_and_weights(seed=4, games=1, clients=8)
  c, w = costs[0], weights[0]
  liars = misreport.choose_liars(8, 0.5, seed=0)
  for m in (1.0, 1.2, 2.0):
    out = misreport.misreported_outcome(game(c, w, **CFG), spec("dp", "social_optimum"), m, liars)
    eps, u = np.asarray(out.budgets), np.asarray(out.client_utilities)
    np.testing.assert_allclose(u[~liars], 0.0, atol=TOL)
    np.testing.assert_allclose(u[liars], (m - 1) * c[liars] * eps[liars], rtol=TOL, atol=TOL)


def _stackelberg_gain_slope(lam, k_liar, k_other):
  """d u_i / d m at m = 1 for the higher- or lower-cost of exactly two participants (sign only matters).

  With |S| = 2, R = lam - K, u_i(m) = R(m) k_j (K(m) - k_i) / K(m)^2 with K(m) = m k_i + k_j, so
  du_i/dm|_{m=1} = (k_i k_j / K^3) ((lam - K)(k_i - k_j) - k_j K).
  """
  total = k_liar + k_other
  return (lam - total) * (k_liar - k_other) - k_other * total


@pytest.mark.slow  # many capped leader solves; the two-participant counterpart stays in CI
def test_stackelberg_single_liar_never_gains_with_three_or_more_participants():
  """Measured and proved: with |S| >= 3 (no cap binding) u_i falls in the report k'_i.

  u_i = R s_i (1 - (|S|-1) k_i / K'), s_i = 1 - (|S|-1) k'_i / K', R = lam - K' / (|S|-1); its derivative in
  k'_i is negative whenever k_i + k'_i < K', which participation (k'_i < K' / (|S|-1) <= K' / 2) ensures.
  """
  costs, weights = costs_and_weights(seed=5, games=12, clients=8)
  checked = 0
  for c, w in zip(costs, weights):
    if int(baselines.solve(game(c, w, **UNCAPPED), spec("log")).participants) < 3:
      continue
    u = np.asarray(
      _single_liar_utilities("stackelberg", c, w, UNCAPPED).client_utilities
    )  # [liar, m, client]
    own = u[np.arange(8), :, np.arange(8)]  # [liar, factor]
    # The leader's numerical optimum carries ~1e-9 relative noise; the effect is far larger.
    assert np.all(own <= own[:, :1] + 1e-8 * (1 + np.abs(own[:, :1]))), np.max(own - own[:, :1])
    checked += 1
  assert checked >= 8  # most of these games have >= 3 participants


@pytest.mark.slow
def test_stackelberg_two_participants_the_costlier_can_gain():
  """Measured: with exactly 2 participants the costlier one gains iff (lam - K)(k_i - k_j) > k_j K."""
  costs = np.random.default_rng(6).uniform(0.3, 5.0, (40, 2))
  costs = costs[costs.sum(axis=1) < UNCAPPED["lam"]][:16]  # R* > 0
  factors = jnp.array([1.0, 1.0 + 1e-4])
  u = np.stack(
    [_single_liar_utilities("stackelberg", c, np.ones(2), UNCAPPED, factors).client_utilities for c in costs]
  )  # [game, liar, factor, client]
  own = u[:, np.arange(2), :, np.arange(2)]  # [liar, game, factor]
  slope = _stackelberg_gain_slope(UNCAPPED["lam"], costs.T, costs[:, ::-1].T)  # [liar, game]
  clear = np.abs(slope) > 1e-3
  np.testing.assert_array_equal(np.sign(own[..., 1] - own[..., 0])[clear], np.sign(slope)[clear])
  assert np.any(slope[clear] > 0) and np.any(slope[clear] < 0)  # both regimes occur
  # E.g. k = (2, 1), lam = 10: (10 - 3)(2 - 1) = 7 > 1 * 3, so the costlier client gains by exaggerating.
  two = game(np.array([2.0, 1.0]), np.ones(2), **UNCAPPED)
  u = [
    float(misreport.misreported_outcome(two, spec("log"), m, np.array([True, False])).client_utilities[0])
    for m in (1, 1.2)
  ]
  assert u[1] > u[0]


def test_posted_price_liar_gains_only_by_raising_everyones_price():
  """Measured: exaggerating is not harmless under an optimized posted price. A liar whose report moves
  above the price can make the server raise the price (to the report, or to the next honest cost); the liar
  gains exactly when it still sells at a higher price, and then every honest seller gains too."""
  costs, weights = costs_and_weights(seed=7, games=12, clients=8)
  gains = 0
  for c, w in zip(costs, weights):
    honest = baselines.solve(game(c, w, **CFG), spec("log", "posted_price"))
    honest_price = np.max(np.asarray(honest.payments)) / CFG["eps_max"]
    out = _single_liar_utilities("posted_price", c, w)
    u = np.asarray(out.client_utilities)  # [liar, factor, client]
    price = np.max(np.asarray(out.payments), axis=-1) / CFG["eps_max"]  # [liar, factor]
    own = u[np.arange(8), :, np.arange(8)]  # [liar, factor]
    sells = np.asarray(out.budgets)[np.arange(8), :, np.arange(8)] == CFG["eps_max"]
    gained = own > own[:, :1] + TOL
    np.testing.assert_array_equal(gained, sells & (price > honest_price + TOL))
    honest_sellers = np.asarray(honest.budgets) > 0
    for liar, factor in zip(*np.nonzero(gained)):
      others = honest_sellers & (np.arange(8) != liar)
      assert np.all(u[liar, factor, others] > np.asarray(honest.client_utilities)[others])
    gains += gained.any(axis=1).sum()
  assert gains > 0  # some liars do gain: the optimized posted price is not truthful


def test_no_incentive_ignores_reports():
  costs, weights = costs_and_weights(seed=8, games=1, clients=8)
  g = game(costs[0], weights[0], **CFG)
  outs = [misreport.misreported_outcome(g, spec("dp", "no_incentive"), m) for m in (1.0, 3.0)]
  chex.assert_trees_all_equal(*outs)


def test_choose_liars_is_seeded_and_counts():
  a = misreport.choose_liars(40, 0.25, seed=3)
  assert a.dtype == bool and a.sum() == 10
  np.testing.assert_array_equal(a, misreport.choose_liars(40, 0.25, seed=3))
  assert misreport.choose_liars(7, 1.0).all() and not misreport.choose_liars(7, 0.0).any()


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(factor=0.5), r"factor=0.5 is invalid: expected finite exaggeration factors >= 1"),
    (dict(factor=float("nan")), r"factor=nan is invalid"),
    (dict(factor=np.array([1.0, 2.0])), r"factor has shape \(2,\): expected a scalar or one per client"),
    (dict(factor=2.0, liars_mask=np.ones(3)), r"liars_mask of dtype float64 and shape \(3,\) is invalid"),
    (dict(factor=2.0, liars_mask=np.ones(4, bool)), r"liars_mask .* shape \(4,\) is invalid: expected bool"),
    (dict(factor="2"), r"factor has dtype <U1: expected real numbers \(finite exaggeration factors >= 1"),
    (dict(factor=np.array([1.0, 0.9, 2.0])), r"factor\[1\]=0.9 is invalid"),
  ],
)
def test_bad_misreport_inputs(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    misreport.misreported_outcome(game(np.ones(3), np.ones(3), **CFG), spec("log"), **kwargs)


def test_bad_liar_fraction():
  with pytest.raises(ConfigError, match=r"fraction=1.5 is invalid: expected a number in \[0, 1\]"):
    misreport.choose_liars(10, 1.5)


def _sim_cfg(calibration: str = "exact") -> fc.SimulationConfig:
  return fc.SimulationConfig(
    data=fc.DataConfig(num_clients=8, capacity=32, test_examples=200),
    model=fc.ModelConfig(name="logreg"),
    privacy=fc.PrivacyConfig(calibration=calibration),
    federated=fc.FederatedConfig(rounds=2, local_steps=1, batch_size=8),
    game=GameConfig(mechanism="stackelberg", lam=20.0),
  )


@pytest.mark.slow
def test_prepare_trains_with_the_misreported_budgets():
  cfg = _sim_cfg()
  fed_data = data.load_federated(cfg.data)
  liars = misreport.choose_liars(8, 0.5, seed=0)
  factors = np.where(liars, 2.0, 1.0)
  exp = simulation.prepare(cfg, fed_data, cost_factors=factors)
  n = np.asarray(fed_data.pool.num_examples)
  with jax.enable_x64(True):
    g, s = simulation.game_of(
      cfg,
      simulation.client_costs(jax.random.PRNGKey(cfg.seed), 8, cfg.game),
      simulation.quality_weights(n),
      n,
    )
    expected = misreport.misreported_outcome(g, s, factors)
  chex.assert_trees_all_close(exp.outcome, jax.tree.map(np.asarray, expected), rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(np.isfinite(exp.noise_multipliers), exp.aggregation_weights > 0)
  assert np.all(np.asarray(expected.budgets)[exp.aggregation_weights > 0] > 0)
  # Every calibration maps the misreported budgets once, before any round.
  surrogate = simulation.prepare(_sim_cfg("surrogate"), fed_data, cost_factors=factors)
  chex.assert_trees_all_close(surrogate.outcome, exp.outcome, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(np.isfinite(surrogate.noise_multipliers), np.isfinite(exp.noise_multipliers))
  # The experiment keeps the true costs.
  np.testing.assert_array_equal(exp.costs, simulation.client_costs(jax.random.PRNGKey(cfg.seed), 8, cfg.game))


@pytest.mark.slow  # trains; the script's flags are fuzzed in tests/test_cli.py
def test_misreporting_script_writes_the_table(tmp_path):
  out = tmp_path / "out"
  flags = [
    "--mechanisms=stackelberg,posted_price",
    "--factors=1,2",
    "--liar_fraction=0.5",
    "--num_clients=8",
    "--capacity=32",
    "--min_examples=16",
    "--lam=10",
    "--cost_low=0.5",
    "--cost_high=2",
    "--eps_max=8",
    "--seed=0",
    f"--out={out}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, os.path.join(REPO, "scripts", "misreporting.py"), *flags],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "misreporting.json").read_text())
  rows = {(r["mechanism"], r["factor"]): r for r in result["rows"]}
  assert set(rows) == {(m, f) for m in ("stackelberg", "posted_price") for f in (1.0, 2.0)}
  assert result["setup"]["liars"] == 4
  fed_data = data.load_federated(fc.DataConfig(num_clients=8, capacity=32, min_examples_per_client=16))
  n = np.asarray(fed_data.pool.num_examples)
  game_cfg = GameConfig(lam=10.0, cost_low=0.5, cost_high=2.0, eps_max=8.0)
  with jax.enable_x64(False):  # the script, like simulation.prepare, draws the costs in default precision
    costs = simulation.client_costs(jax.random.PRNGKey(0), 8, game_cfg)
  liars = misreport.choose_liars(8, 0.5, seed=0)
  cfg = fc.SimulationConfig(game=game_cfg)
  g, s = simulation.game_of(cfg, costs, simulation.quality_weights(n), n)
  for name in ("stackelberg", "posted_price"):
    honest = baselines.solve(g, dataclasses.replace(s, mechanism=name))
    row = rows[(name, 1.0)]
    np.testing.assert_allclose(row["server_utility"], honest.server_utility, rtol=1e-12)
    np.testing.assert_allclose(
      row["liars_mean_utility"], np.mean(honest.client_utilities[liars]), rtol=1e-12, atol=1e-12
    )
    assert row["participants"] == int(honest.participants)
  for name in ("misreporting.csv", "misreporting.md", "liars_mean_utility_vs_factor.png"):
    assert (out / name).stat().st_size > 0

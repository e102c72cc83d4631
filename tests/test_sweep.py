"""Batched sweeps (fcfn_jax/game/sweep.py): a plain vmap over drawn games, chunked and sharded, with lam
and eps_max traced."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax.config import MECHANISMS, GameConfig
from fcfn_jax.game import baselines, sweep
from fcfn_jax.validate import ConfigError

# 8 clients and the default specs: the same compiled mechanisms as the other game tests. Two mechanisms
# by default (each costs a batched and a single-game compile); every mechanism with -m slow.
SETTINGS = sweep.SweepSettings(game=GameConfig(), num_clients=8, mechanisms=("stackelberg", "social_optimum"))
KEY = jax.random.PRNGKey(7)


pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64


@pytest.fixture(scope="module")
def grid_and_results():
  with jax.enable_x64(True):
    configs = sweep.make_grid([0, 1], [20.0, 200.0], [(0.5, 2.0), (1.0, 1.5)], eps_maxes=[2.0, 8.0])
    return configs, sweep.run_sweep(KEY, configs, SETTINGS)


def _check_each_configuration(configs, results, settings):
  """Every third configuration's metrics equal its game drawn and solved alone."""
  for g in range(0, 16, 3):
    config = jax.tree.map(lambda a, g=g: a[g], configs)
    game = sweep.draw_game(KEY, config, settings)
    for name in settings.mechanisms:
      expected = baselines.solve(game, settings.spec(name))
      for field, value in results[name]._asdict().items():
        np.testing.assert_allclose(
          value[g], getattr(expected, field), rtol=1e-7, atol=1e-9, err_msg=f"{name}.{field} at {g}"
        )


def test_every_configuration_matches_its_game_solved_alone(grid_and_results):
  configs, results = grid_and_results
  assert configs.lam.shape == (16,)
  _check_each_configuration(configs, results, SETTINGS)


@pytest.mark.slow
def test_every_mechanism_sweeps_like_its_games_solved_alone(grid_and_results):
  configs, _ = grid_and_results
  settings = dataclasses.replace(SETTINGS, mechanisms=MECHANISMS)
  _check_each_configuration(configs, sweep.run_sweep(KEY, configs, settings), settings)


@pytest.mark.slow  # compiles every mechanism once more under the accountant's map
def test_a_sweep_under_the_accountant_equals_its_games_solved_alone():
  settings = sweep.SweepSettings(
    game=GameConfig(noise_model="accountant"),
    num_clients=8,
    mechanisms=("stackelberg", "social_optimum", "posted_price", "contract"),
  )
  configs = sweep.make_grid([0, 1], [20.0, 200.0], [(0.5, 2.0)])
  results = sweep.run_sweep(KEY, configs, settings)
  for g in range(4):
    game = sweep.draw_game(KEY, jax.tree.map(lambda a, g=g: a[g], configs), settings)
    assert game.noise_table is not None
    for name in settings.mechanisms:
      alone = baselines.solve(game, settings.spec(name))
      np.testing.assert_allclose(results[name].server_utility[g], alone.server_utility, rtol=1e-6)
      assert np.isfinite(float(alone.quality)) and alone.participants >= 2, name


def test_eps_max_is_swept_as_a_traced_input(grid_and_results):
  configs, results = grid_and_results
  tight, loose = np.asarray(configs.eps_max) == 2.0, np.asarray(configs.eps_max) == 8.0
  # Same seed, lam and costs: a looser cap never lowers the welfare optimum.
  welfare = np.asarray(results["social_optimum"].social_welfare)
  assert np.all(welfare[loose] >= welfare[tight] - 1e-9 * np.abs(welfare[tight]))


@pytest.mark.slow  # sharding: tests/test_sharding.py and the 2-process smoke of test_multihost.py
def test_chunked_and_sharded_sweeps_equal_the_single_batch(grid_and_results):
  configs, results = grid_and_results
  mesh = sweep.game_mesh()
  assert mesh.size == 4  # tests/conftest.py: 4 fake CPU devices
  # 16 games on 4 devices in chunks of 4 (one game per device per chunk).
  sharded = sweep.run_sweep(KEY, configs, SETTINGS, chunk_size=4, mesh=mesh)
  assert all(len(leaf.sharding.device_set) == 4 for leaf in jax.tree.leaves(sharded))
  assert jax.tree.structure(sharded) == jax.tree.structure(results)
  for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(results)):
    assert got.shape == want.shape == (16,)
    # Batches of 4 and of 16 round differently inside the leader's searches: 1e-9 in U_s, not 1e-12.
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12)


def test_a_seed_draws_the_same_quantiles_for_every_cost_range():
  configs = sweep.make_grid([3, 4], [1.0], [(0.5, 2.0), (1.0, 1.5)])
  low, high, other = (
    sweep.draw_game(KEY, jax.tree.map(lambda a, i=i: a[i], configs), SETTINGS) for i in (0, 1, 2)
  )
  np.testing.assert_allclose((low.costs - 0.5) / 1.5, (high.costs - 1.0) / 0.5, rtol=1e-12)
  np.testing.assert_allclose(low.weights, high.weights)
  np.testing.assert_allclose(jnp.mean(low.weights), 1.0)
  np.testing.assert_allclose(low.sampling_rates, np.minimum(1.0, 32 / (100.0 * low.weights)), rtol=1e-12)
  assert not np.allclose(low.costs, other.costs)


def test_table_has_one_row_per_configuration_and_mechanism(grid_and_results):
  configs, results = grid_and_results
  rows = sweep.sweep_table(configs, results)
  assert len(rows) == 16 * len(SETTINGS.mechanisms)
  assert set(rows[0]) == {*sweep.SweepConfigs._fields, "mechanism", "label", *sweep.SweepMetrics._fields}
  summary = sweep.mean_by(rows, ["mechanism", "lam"], ["server_utility"])
  assert len(summary) == 2 * len(SETTINGS.mechanisms) and {r["games"] for r in summary} == {8}
  stackelberg = results["stackelberg"].server_utility
  want = float(jnp.mean(stackelberg[configs.lam == 20.0]))
  got = [r for r in summary if r["mechanism"] == "stackelberg" and r["lam"] == 20.0][0]["server_utility"]
  np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda: sweep.make_grid([0], [-1.0], [(0.5, 2.0)]), "lam=-1.0"),
    (lambda: sweep.make_grid([0], [1.0], [(2.0, 0.5)]), "cost_low=2.0"),
    (lambda: sweep.make_grid([-1], [1.0], [(0.5, 2.0)]), "seed=-1"),
    (lambda: sweep.make_grid([0], [1.0], [(0.5, 2.0)], eps_maxes=[0.0]), "eps_max=0.0"),
    (lambda: sweep.SweepSettings(mechanisms=("bogus",)), "mechanism='bogus'"),
    (lambda: sweep.SweepSettings(weight_spread=0.5), "weight_spread=0.5"),
    (
      lambda: sweep.run_sweep(KEY, sweep.make_grid([0], [1.0], [(0.5, 2.0)]), SETTINGS, chunk_size=-1),
      "chunk_size=-1",
    ),
  ],
)
def test_invalid_inputs_raise_config_error(call, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
    call()

"""Batched sweeps (fcfn_jax/sweep.py): traced lam, chunking and sharding agree with the baselines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax.config import GameConfig
from fcfn_jax.game import baselines, sweep
from fcfn_jax.validate import ConfigError

SETTINGS = sweep.SweepSettings(
  game=GameConfig(eps_max=4.0),
  num_clients=12,
  mechanisms=("stackelberg", "social_optimum", "posted_price", "contract"),
)
KEY = jax.random.PRNGKey(7)


pytestmark = pytest.mark.usefixtures("x64")  # game math runs in float64


@pytest.fixture(scope="module")
def grid_and_results():
  with jax.enable_x64(True):
    configs = sweep.make_grid([0, 1, 2], [2.0, 20.0, 200.0], [(0.5, 2.0), (1.0, 1.5)])
    return configs, sweep.run_sweep(KEY, configs, SETTINGS)


def test_every_configuration_matches_the_baseline_at_its_static_lam(grid_and_results):
  configs, results = grid_and_results
  for g in range(configs.lam.shape[0]):
    costs, weights = sweep.draw_game(
      KEY,
      configs.seed[g],
      configs.cost_low[g],
      configs.cost_high[g],
      SETTINGS.num_clients,
      SETTINGS.weight_spread,
    )
    game = GameConfig(lam=float(configs.lam[g]), eps_max=SETTINGS.game.eps_max)
    for name in SETTINGS.mechanisms:
      expected = baselines.solve_mechanism(name, costs, weights, game)
      for field, value in results[name]._asdict().items():
        np.testing.assert_allclose(
          value[g],
          getattr(expected, field),
          rtol=1e-10,
          atol=1e-10,
          err_msg=f"{name}.{field} at configuration {g}",
        )


def test_chunked_and_sharded_sweeps_equal_the_single_batch(grid_and_results):
  configs, results = grid_and_results
  mesh = sweep.game_mesh()
  assert mesh.size == 4  # tests/conftest.py: 4 fake CPU devices
  # 18 games in chunks of 5 (padded to 20), and on 4 devices in chunks of 4 (one game per device).
  sharded = sweep.run_sweep(KEY, configs, SETTINGS, chunk_size=4, mesh=mesh)
  assert all(len(leaf.sharding.device_set) == 4 for leaf in jax.tree.leaves(sharded))
  for chunked in (sweep.run_sweep(KEY, configs, SETTINGS, chunk_size=5), sharded):
    assert jax.tree.structure(chunked) == jax.tree.structure(results)
    for got, want in zip(jax.tree.leaves(chunked), jax.tree.leaves(results)):
      assert got.shape == want.shape == (18,)
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_a_seed_draws_the_same_quantiles_for_every_cost_range():
  low = sweep.draw_game(KEY, 3, jnp.asarray(0.5), jnp.asarray(2.0), 16, 4.0)
  high = sweep.draw_game(KEY, 3, jnp.asarray(1.0), jnp.asarray(1.5), 16, 4.0)
  np.testing.assert_allclose((low[0] - 0.5) / 1.5, (high[0] - 1.0) / 0.5, rtol=1e-12)
  np.testing.assert_allclose(low[1], high[1])
  np.testing.assert_allclose(jnp.mean(low[1]), 1.0)
  other = sweep.draw_game(KEY, 4, jnp.asarray(0.5), jnp.asarray(2.0), 16, 4.0)
  assert not np.allclose(low[0], other[0])


def test_table_has_one_row_per_configuration_and_mechanism(grid_and_results):
  configs, results = grid_and_results
  rows = sweep.sweep_table(configs, results)
  assert len(rows) == 18 * len(SETTINGS.mechanisms)
  assert set(rows[0]) == {*sweep.SweepConfigs._fields, "mechanism", *sweep.SweepMetrics._fields}
  summary = sweep.mean_by(rows, ["mechanism", "lam"], ["server_utility"])
  assert len(summary) == 3 * len(SETTINGS.mechanisms) and {r["games"] for r in summary} == {6}
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

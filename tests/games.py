"""Seeded random games shared by the game tests (numpy draws, float64), and their specs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax.game.spec import Game, GameSpec


def spec(valuation: str = "dp", mechanism: str = "stackelberg", **fields) -> GameSpec:
  """A GameSpec of the tests' DP run (30 steps, delta 1e-5): one per (valuation, mechanism, fields), so
  every test module reuses the same compiled programs."""
  return dataclasses.replace(GameSpec(), valuation=valuation, mechanism=mechanism, **fields)


def costs_and_weights(
  seed: int, games: int, clients: int, cost_high: float = 2.0, weight_sigma: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
  """costs ~ U[0.5, cost_high] [G, N]; weights ~ lognormal(0, weight_sigma) [G, N], mean 1 per game."""
  rng = np.random.default_rng(seed)
  costs = rng.uniform(0.5, cost_high, (games, clients))
  weights = rng.lognormal(0.0, weight_sigma, (games, clients))
  return costs, weights / weights.mean(axis=1, keepdims=True)


def paid_games(
  seed: int,
  games: int,
  clients: int,
  cost_range: tuple[float, float] = (0.1, 10.0),
  with_prices: bool = False,
) -> tuple[np.ndarray, ...]:
  """Widely spread games: payment R ~ log-U[0.1, 100] [G], costs ~ log-U[cost_range] [G, N], weights
  w = d / mean(d) with d ~ lognormal(0, 1) [G, N]; with_prices adds per-client prices ~ exp(U[-1, 1])."""
  rng = np.random.default_rng(seed)
  payment = np.exp(rng.uniform(np.log(0.1), np.log(100.0), games))
  costs = np.exp(rng.uniform(*np.log(cost_range), (games, clients)))
  sizes = rng.lognormal(0.0, 1.0, (games, clients))
  games_drawn = (payment, costs, sizes / sizes.mean(-1, keepdims=True))
  return games_drawn + (np.exp(rng.uniform(-1.0, 1.0, (games, clients))),) if with_prices else games_drawn


def game(
  costs: np.ndarray,
  weights: np.ndarray,
  *,
  lam: float = 50.0,
  eps_max: float = 8.0,
  eps_min: float = 1.0,
  data_epsilon: float = 4.0,
  sampling_rates: np.ndarray | float = 0.3,
  dtype=np.float64,
):
  """A Game (``dtype`` leaves) of one game's costs [N] and weights [N], or a stack of them [G, N]."""
  costs, weights = np.asarray(costs, dtype), np.asarray(weights, dtype)
  batch = costs.shape[:-1]
  scalar = lambda v: jnp.broadcast_to(jnp.asarray(v, dtype), batch)
  return Game(
    costs=jnp.asarray(costs),
    weights=jnp.asarray(weights),
    sampling_rates=jnp.broadcast_to(jnp.asarray(sampling_rates, dtype), costs.shape),
    lam=scalar(lam),
    eps_max=scalar(eps_max),
    eps_min=scalar(eps_min),
    data_epsilon=scalar(data_epsilon),
  )


def take(games, index: int):
  """Game ``index`` of a stacked Game."""
  return jax.tree.map(lambda a: a[index], games)

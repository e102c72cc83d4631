"""Seeded random games shared by the game tests (numpy draws, float64)."""

from __future__ import annotations

import numpy as np


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

"""Batched sweeps of many games x seeds x lambda values x cost distributions x caps in one program.

A sweep is a flat batch of G configurations (seed, lam, cost_low, cost_high, eps_max): [G] arrays, all
traced. Each configuration draws one :class:`~fcfn_jax.game.spec.Game` (costs c_i ~ Uniform[cost_low,
cost_high] and data sizes from ``fold_in(key, seed)``, so every lam, cost range and cap of a seed sees the
same uniform quantiles: common random numbers) and solves every requested mechanism on it with the same
static :class:`~fcfn_jax.game.spec.GameSpec` (docs/model.md "Baselines"). Every number of a game is
traced, so a sweep is a plain ``jax.vmap`` of ``baselines.solve`` over the drawn games: one compiled
program per (number of clients, spec) serves every lam, cost range and eps_max.

The batch is evaluated as ``lax.map`` over fixed-size chunks of a ``vmap`` (memory bounded by the chunk),
and the game axis can be split over a device mesh (``shard_map``: each device maps over its own chunks).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from fcfn_jax import distributed
from fcfn_jax.config import MECHANISM_LABELS, MECHANISMS, GameConfig
from fcfn_jax.game import baselines, valuation
from fcfn_jax.game.spec import Game, GameSpec, spec_from_config
from fcfn_jax.validate import check_choice, check_int, check_open_unit, check_positive, check_seed, require

GAME_AXIS = "games"


class SweepConfigs(NamedTuple):
  """A flat batch of G configurations: seed uint32 [G], lam [G], cost_low [G], cost_high [G], eps_max [G]."""

  seed: chex.Array
  lam: chex.Array
  cost_low: chex.Array
  cost_high: chex.Array
  eps_max: chex.Array


class SweepMetrics(NamedTuple):
  """Per-game summary of one mechanism, each [G] (docs/model.md "Metrics")."""

  quality: chex.Array
  server_utility: chex.Array
  mean_client_utility: chex.Array
  social_welfare: chex.Array
  average_utility: chex.Array
  participants: chex.Array
  total_payment: chex.Array


@dataclasses.dataclass(frozen=True)
class SweepSettings:
  """What stays fixed (static) across a sweep.

  game: eps_min, data_epsilon, valuation, aggregation, num_types, num_aggregators of every game (its
    mechanism, lam, cost range and eps_max are ignored: they are swept). num_clients: N.
  weight_spread: data sizes n_i = mean_examples d_i / mean(d) with d_i ~ Uniform[1, weight_spread]
    (1 = equal sizes); w = n / mean(n). Sampling rates q_i = min(1, batch_size / n_i).
  steps, delta: the DP-SGD run of a participant (the eps -> noise map of the 'dp' valuation).
  mechanisms: names from config.MECHANISMS.
  """

  game: GameConfig = GameConfig()
  num_clients: int = 20
  weight_spread: float = 4.0
  mean_examples: float = 100.0
  batch_size: int = 32
  steps: int = 30
  delta: float = 1e-5
  mechanisms: tuple[str, ...] = ("stackelberg", "social_optimum", "posted_price")

  def __post_init__(self):
    require(isinstance(self.game, GameConfig), f"game={self.game!r} is invalid: expected a GameConfig")
    check_int("num_clients", self.num_clients, minimum=2)
    check_positive("weight_spread", self.weight_spread)
    require(self.weight_spread >= 1, f"weight_spread={self.weight_spread!r} is invalid: expected >= 1")
    check_positive("mean_examples", self.mean_examples)
    check_int("batch_size", self.batch_size)
    check_int("steps", self.steps)
    check_open_unit("delta", self.delta)
    require(
      isinstance(self.mechanisms, tuple) and self.mechanisms,
      f"mechanisms={self.mechanisms!r} is invalid: expected a non-empty tuple of names",
    )
    for name in self.mechanisms:
      check_choice("mechanism", name, MECHANISMS)

  def spec(self, mechanism: str) -> GameSpec:
    """The static spec of every game of the sweep for one mechanism."""
    return dataclasses.replace(spec_from_config(self.game, self.steps, self.delta), mechanism=mechanism)


def make_grid(
  seeds: Sequence[int],
  lams: Sequence[float],
  cost_ranges: Sequence[tuple[float, float]],
  eps_maxes: Sequence[float] = (GameConfig.eps_max,),
  dtype: Any = None,
) -> SweepConfigs:
  """The Cartesian product seeds x lams x cost_ranges x eps_maxes as a flat SweepConfigs.

  Raises:
    ConfigError naming a bad seed, lam, cost range or eps_max (the same rules as GameConfig).
  """
  require(
    len(seeds) and len(lams) and len(cost_ranges) and len(eps_maxes),
    f"seeds={seeds!r}, lams={lams!r}, cost_ranges={cost_ranges!r}, eps_maxes={eps_maxes!r}: expected "
    "non-empty lists",
  )
  for lam in lams:
    GameConfig(lam=lam)
  for low, high in cost_ranges:
    GameConfig(cost_low=low, cost_high=high)
  for eps_max in eps_maxes:
    check_positive("eps_max", eps_max)
  for seed in seeds:
    check_seed("seed", seed)
  rows = list(itertools.product(seeds, lams, cost_ranges, eps_maxes))
  dtype = jnp.result_type(float) if dtype is None else dtype
  return SweepConfigs(
    seed=jnp.asarray([r[0] for r in rows], jnp.uint32),
    lam=jnp.asarray([r[1] for r in rows], dtype),
    cost_low=jnp.asarray([r[2][0] for r in rows], dtype),
    cost_high=jnp.asarray([r[2][1] for r in rows], dtype),
    eps_max=jnp.asarray([r[3] for r in rows], dtype),
  )


def draw_game(key: chex.PRNGKey, config: SweepConfigs, settings: SweepSettings) -> Game:
  """The Game of one configuration (every field of ``config`` is []), drawn from ``fold_in(key, seed)``.

  c_i = cost_low + (cost_high - cost_low) U_i, d_i = 1 + (weight_spread - 1) V_i, U, V ~ Uniform[0, 1)^N,
  n_i = mean_examples d_i / mean(d), w = n / mean(n), q_i = min(1, batch_size / n_i); eps_min is capped at
  the configuration's eps_max. The dtype is cost_low's. With ``noise_model='accountant'`` the game carries
  its noise table (``valuation.with_noise_table``), built once and shared by every mechanism.
  """
  cost_key, size_key = jax.random.split(jax.random.fold_in(key, config.seed))
  dtype = jnp.result_type(config.cost_low)
  n = settings.num_clients
  costs = config.cost_low + (config.cost_high - config.cost_low) * jax.random.uniform(cost_key, (n,), dtype)
  sizes = 1.0 + (settings.weight_spread - 1.0) * jax.random.uniform(size_key, (n,), dtype)
  weights = sizes / jnp.mean(sizes)
  scalar = lambda v: jnp.asarray(v, dtype)
  game = Game(
    costs=costs,
    weights=weights,
    sampling_rates=jnp.minimum(1.0, settings.batch_size / (settings.mean_examples * weights)),
    lam=config.lam,
    eps_max=config.eps_max,
    eps_min=jnp.minimum(scalar(settings.game.eps_min), config.eps_max),
    data_epsilon=scalar(settings.game.data_epsilon),
  )
  return valuation.with_noise_table(game, settings.spec(settings.mechanisms[0]))


def _summary(outcome) -> SweepMetrics:
  return SweepMetrics(**{f: getattr(outcome, f) for f in SweepMetrics._fields})


def evaluate_config(
  key: chex.PRNGKey, config: SweepConfigs, settings: SweepSettings
) -> dict[str, SweepMetrics]:
  """Every mechanism of ``settings`` on the game of one configuration (fields of ``config`` are [])."""
  game = draw_game(key, config, settings)
  return {name: _summary(baselines.solve(game, settings.spec(name))) for name in settings.mechanisms}


def _sweep_local(key, configs, settings, chunk_size):
  """lax.map over chunks of chunk_size games, each a vmap: every leaf [G] with G a multiple of chunk_size."""
  chunks = jax.tree.map(lambda a: a.reshape(-1, chunk_size), configs)
  results = lax.map(jax.vmap(lambda c: evaluate_config(key, c, settings)), chunks)
  return jax.tree.map(lambda a: a.reshape(-1), results)


@functools.partial(jax.jit, static_argnames=("settings", "chunk_size", "mesh"))
def _sweep(key, configs, settings, chunk_size, mesh):
  local = functools.partial(_sweep_local, settings=settings, chunk_size=chunk_size)
  if mesh is None:
    return local(key, configs)
  games = PartitionSpec(GAME_AXIS)
  # check_vma=False: the solver's while_loops start from constants that are not marked device-varying;
  # every game is independent, so there is nothing to check across devices.
  return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), games), out_specs=games, check_vma=False)(
    key, configs
  )


def run_sweep(
  key: chex.PRNGKey,
  configs: SweepConfigs,
  settings: SweepSettings,
  chunk_size: int = 0,
  mesh: Mesh | None = None,
) -> dict[str, SweepMetrics]:
  """Every mechanism on every configuration: {mechanism: SweepMetrics of [G] arrays}, one jit program.

  Args:
    key: base PRNG key; game g is drawn from fold_in(key, configs.seed[g]).
    configs: G configurations (e.g. from :func:`make_grid`).
    settings: the static part of the games.
    chunk_size: games per vmapped chunk, over all devices (``lax.map`` runs the chunks in sequence,
      bounding memory); 0 = all G at once. It is rounded up to a multiple of the mesh size, and the batch
      is padded to a multiple of it with copies of the last configuration, dropped from the result.
    mesh: optional 1-D device mesh with axis ``GAME_AXIS``: the games are split into one contiguous
      block per device (``shard_map``), each running its share of every chunk. The mesh may span
      processes (:func:`game_mesh` after ``distributed.initialize()``); every process then gets every
      game's metrics.

  Raises:
    ConfigError for a bad chunk_size or mesh.
  """
  check_int("chunk_size", chunk_size, minimum=0)
  require(
    mesh is None or mesh.axis_names == (GAME_AXIS,),
    f"mesh axes {None if mesh is None else mesh.axis_names} are invalid: expected ({GAME_AXIS!r},)",
  )
  size = int(configs.lam.shape[0])
  devices = 1 if mesh is None else mesh.size
  per_device = -(-(chunk_size or size) // devices)
  padded = -(-size // (per_device * devices)) * per_device * devices
  configs = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], padded - size)]), configs)
  # A mesh over several processes leaves each process its own games: gather them (one all-gather per
  # metric) so that every process holds the whole table, as in a single process.
  results = distributed.gather(_sweep(key, configs, settings, per_device, mesh))
  return jax.tree.map(lambda a: a[:size], results)


def game_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all) with the game axis ``GAME_AXIS``."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (GAME_AXIS,))


def sweep_table(configs: SweepConfigs, results: dict[str, SweepMetrics]) -> list[dict[str, Any]]:
  """One row per (configuration, mechanism): the configuration values, the mechanism and its label in
  tables (no_incentive is a mandate) and the SweepMetrics fields."""
  config_columns = {f: np.asarray(v).tolist() for f, v in configs._asdict().items()}
  metric_columns = {
    name: {f: np.asarray(v).tolist() for f, v in metrics._asdict().items()}
    for name, metrics in results.items()
  }
  return [
    {
      **{f: column[g] for f, column in config_columns.items()},
      "mechanism": name,
      "label": MECHANISM_LABELS[name],
      **{f: column[g] for f, column in columns.items()},
    }
    for g in range(len(config_columns["seed"]))
    for name, columns in metric_columns.items()
  ]


def mean_by(
  rows: Sequence[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str]
) -> list[dict[str, Any]]:
  """Means of ``metrics`` over the rows of each distinct value of ``keys`` (in first-seen order)."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in keys), []).append(row)
  return [
    {
      **dict(zip(keys, values)),
      "games": len(members),
      **{m: float(np.mean([r[m] for r in members])) for m in metrics},
    }
    for values, members in groups.items()
  ]

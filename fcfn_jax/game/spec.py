"""One game = a static :class:`GameSpec` plus a traced :class:`Game` pytree (docs/model.md "The game").

The split follows gymnax's ``Environment`` + ``EnvParams``: the spec holds what fixes shapes and
branches (the mechanism, the valuation, the aggregation rule, the number of contract types and of
aggregators, the run length and delta of the eps -> noise map, the leader's search settings) and is a
hashable static argument of ``jit``; the game holds every number one may sweep or differentiate (lam,
eps_max, eps_min, the data budget, and per client the costs, quality weights and sampling rates). Every
mechanism is ``mechanism(game, spec)``; a sweep over games is a plain ``jax.vmap`` over stacked Games.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import chex
import jax.numpy as jnp
import numpy as np

from fcfn_jax.config import AGGREGATIONS, MECHANISMS, NOISE_MODELS, VALUATIONS, GameConfig
from fcfn_jax.game.solver import SolverOptions
from fcfn_jax.validate import (
  check_array,
  check_choice,
  check_clients,
  check_int,
  check_open_unit,
  check_positive_array,
  is_traced,
  require,
)

# The budgets of the noise table (``Game.noise_table``, docs/model.md "Stage I"): a uniform grid in log eps,
# 32 points a decade over [1e-2, 1e2] (the budgets games use; outside it the table continues with the
# surrogate's slope). Linear interpolation in (log eps, log z): its error against the traced accountant's z
# is docs/model.md's ("Stage I", tested in tests/test_valuation.py); the largest errors sit at the kinks
# where the accountant's optimal order jumps.
NOISE_LOG_EPS = np.linspace(math.log(1e-2), math.log(1e2), 129)


class SearchOptions(NamedTuple):
  """How a payment R is searched (``leader.search_payment``), the same for every mechanism that has one.

  grid_size: points of the log-grid over R in [R_hi 10^-grid_decades, R_hi].
  num_starts: golden-section searches, one around each of the best grid points (<= grid_size).
  section_iters: golden-section steps of each search (each shrinks the bracket by about 0.618).
  max_iter: L-BFGS iterations of the Stackelberg leader's final refinement on (log R, log prices).
  gtol / ftol: L-BFGS stops when the relative gradient norm / improvement falls below them; None = the
    square root / the 2/3 power of the dtype's machine epsilon.
  ascent_iters: projected-gradient steps of the contract menu and social optimum under a valuation
    without closed form.
  solver: follower-equilibrium settings.
  """

  grid_size: int = 128
  grid_decades: float = 6.0
  num_starts: int = 4
  section_iters: int = 48
  max_iter: int = 50
  gtol: float | None = None
  ftol: float | None = None
  ascent_iters: int = 200
  solver: SolverOptions = SolverOptions()


@dataclasses.dataclass(frozen=True)
class GameSpec:
  """The static part of a game (hashable: a ``jit`` static argument; docs/model.md "The game").

  mechanism: one of config.MECHANISMS (what ``baselines.solve`` runs).
  valuation: 'dp' (Q = -V, the aggregate's noise variance) or 'log' (Q = log(1 + sum_i w_i eps_i)).
  aggregation: 'noise_aware' (inverse-variance weights) or 'fedavg' (data-size weights); the training
    round uses the same rule (``valuation.aggregation_weights``).
  num_types: contract types K (0 = one per client). num_aggregators: three-party aggregators M.
  steps: DP-SGD steps of a participant over the run (T x S) and delta: its target delta; with the
    per-client sampling rates of the Game they fix the eps -> noise map v(eps).
  noise_model: that map: 'surrogate' (closed form, no subsampling) or 'accountant' (the traced RDP
    accountant at each client's q_i, read from ``Game.noise_table``: ``valuation.with_noise_table``).
  search: the payment search and solver settings.
  """

  mechanism: str = "stackelberg"
  valuation: str = "dp"
  aggregation: str = "noise_aware"
  num_types: int = 0
  num_aggregators: int = 4
  steps: int = 30
  delta: float = 1e-5
  noise_model: str = "surrogate"
  search: SearchOptions = SearchOptions()

  def __post_init__(self):
    check_choice("mechanism", self.mechanism, MECHANISMS)
    check_choice("valuation", self.valuation, VALUATIONS)
    check_choice("aggregation", self.aggregation, AGGREGATIONS)
    check_int("num_types", self.num_types, minimum=0)
    check_int("num_aggregators", self.num_aggregators)
    check_int("steps", self.steps)
    check_open_unit("delta", self.delta)
    check_choice("noise_model", self.noise_model, NOISE_MODELS)
    require(
      isinstance(self.search, SearchOptions),
      f"search={self.search!r} is invalid: expected a SearchOptions",
    )


class Game(NamedTuple):
  """The traced part of one game (a pytree: stack every leaf on a leading axis to vmap over games).

  costs: per-unit privacy costs c_i [N]. weights: quality weights w_i = n_i / mean(n) [N].
  sampling_rates: each client's DP-SGD sampling rate q_i in (0, 1] [N] (the eps -> noise map's input).
  lam: the server's valuation of quality []. eps_max: budget cap []. eps_min: the no-incentive mandate [].
  data_epsilon: the budget whose DP noise equals the data term of a client of mean size [] (docs/model.md
    "Aggregation").
  noise_table: log z_i at the budgets exp(NOISE_LOG_EPS) [N, len(NOISE_LOG_EPS)], the accountant's
    eps -> noise map of each client (``valuation.noise_table``), or None: what GameSpec.noise_model =
    'accountant' reads; 'surrogate' ignores it.
  """

  costs: chex.Array
  weights: chex.Array
  sampling_rates: chex.Array
  lam: chex.Array
  eps_max: chex.Array
  eps_min: chex.Array
  data_epsilon: chex.Array
  noise_table: chex.Array | None = None


def spec_from_config(game_cfg: GameConfig, steps: int, delta: float) -> GameSpec:
  """The GameSpec of a GameConfig for a run of ``steps`` DP-SGD steps at ``delta``."""
  return GameSpec(
    mechanism=game_cfg.mechanism,
    valuation=game_cfg.valuation,
    aggregation=game_cfg.aggregation,
    num_types=game_cfg.num_types,
    num_aggregators=game_cfg.num_aggregators,
    steps=int(steps),
    delta=float(delta),
    noise_model=game_cfg.noise_model,
  )


def make_game(
  costs: chex.Array,
  weights: chex.Array,
  sampling_rates: chex.Array | float,
  game_cfg: GameConfig,
  dtype=None,
) -> Game:
  """A Game from per-client arrays ([N]; a scalar sampling rate is broadcast) and a GameConfig's scalars.

  dtype: of every leaf; None = the result type of the costs and weights with Python floats.
  """
  dtype = jnp.result_type(float, costs, weights) if dtype is None else dtype
  costs = jnp.asarray(costs, dtype)
  scalar = lambda v: jnp.asarray(v, dtype)
  return Game(
    costs=costs,
    weights=jnp.asarray(weights, dtype),
    sampling_rates=jnp.broadcast_to(jnp.asarray(sampling_rates, dtype), costs.shape),
    lam=scalar(game_cfg.lam),
    eps_max=scalar(game_cfg.eps_max),
    eps_min=scalar(game_cfg.eps_min),
    data_epsilon=scalar(game_cfg.data_epsilon),
  )


def validate_game(game: Game) -> None:
  """Host-side check of one game (every check skipped for traced leaves).

  Raises:
    ConfigError naming the bad value: not a Game, fewer than 2 clients, shapes that differ or are not one
    game ([N]), non-positive or NaN costs, weights, lam, eps_max or eps_min, sampling rates outside
    (0, 1], eps_min > eps_max, a non-positive data_epsilon, a noise_table not of shape
    [N, len(NOISE_LOG_EPS)].
  """
  require(isinstance(game, Game), f"game={game!r} is invalid: expected a Game")
  for name, value in game._asdict().items():
    require(value is not None or name == "noise_table", f"{name}=None is invalid: expected an array")
  check_clients(game.costs, game.weights)
  shapes = {name: np.shape(getattr(game, name)) for name in ("costs", "weights", "sampling_rates")}
  require(
    len(set(shapes.values())) == 1 and len(shapes["costs"]) == 1,
    f"per-client shapes {shapes} are invalid: expected one game, all of shape [N] (vmap over games)",
  )
  check_array("sampling_rates", game.sampling_rates, lambda a: (a > 0) & (a <= 1), "values in (0, 1]")
  for name in ("lam", "eps_max", "eps_min"):
    value = getattr(game, name)
    require(is_traced(value) or np.ndim(value) == 0, f"{name} has shape {np.shape(value)}: expected []")
    check_positive_array(name, value)
  require(
    is_traced(game.data_epsilon) or np.ndim(game.data_epsilon) == 0,
    f"data_epsilon has shape {np.shape(game.data_epsilon)}: expected []",
  )
  check_positive_array("data_epsilon", game.data_epsilon)
  if game.noise_table is not None:
    expected = (*shapes["costs"], len(NOISE_LOG_EPS))
    require(
      np.shape(game.noise_table) == expected,
      f"noise_table has shape {np.shape(game.noise_table)}: expected {expected} (valuation.noise_table)",
    )
    check_array("noise_table", game.noise_table, lambda a: ~np.isnan(a), "no NaN")
  if not (is_traced(game.eps_min) or is_traced(game.eps_max)):
    require(
      float(game.eps_min) <= float(game.eps_max),
      f"eps_min={float(game.eps_min)!r} > eps_max={float(game.eps_max)!r}: expected eps_min <= eps_max",
    )


def num_types(spec: GameSpec, num_clients: int) -> int:
  """K, the contract's cost types for N clients: min(num_types, N), or N when num_types = 0."""
  return num_clients if spec.num_types == 0 else min(spec.num_types, num_clients)


def num_aggregators(spec: GameSpec, num_clients: int) -> int:
  """M = max(1, min(num_aggregators, N // 2)): the three-party game's edge aggregators for N clients."""
  return max(1, min(spec.num_aggregators, num_clients // 2))


def num_intermediaries(spec: GameSpec, num_clients: int) -> int:
  """M, the intermediaries between the server and N clients: :func:`num_aggregators` in the three-party
  game, 0 in every other mechanism."""
  if spec.mechanism != "three_party":
    return 0
  return num_aggregators(spec, num_clients)

"""The entry every mechanism shares (docs/model.md "Baselines"): ``@mechanism`` turns a core
``core(game, spec) -> Outcome`` on one prepared game into the public ``mechanism(game, spec)``.

The wrapper checks the game on the host, puts the spec's num_types / num_aggregators at their effective
values (``canonical``), casts every leaf to one float dtype (``cast``), builds the accountant's noise table
once per game, and runs the core jitted with the spec static (compiled once per shape and spec); a float32
result that is not finite is solved again in float64. ``proportional`` is the proportional-share payment
rule R x_i / X that the Stackelberg game and the three-party game's two levels use.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TypeVar

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax.game import valuation
from fcfn_jax.game.outcome import Outcome
from fcfn_jax.game.spec import Game, GameSpec, num_aggregators, num_types, validate_game
from fcfn_jax.validate import fail, is_traced, require

_T = TypeVar("_T")


def _check_outcome(result) -> bool:
  """True when every leaf is finite, except -inf utilities of an outcome with nobody participating
  (no model: Q = -inf under 'dp')."""
  leaves = jax.tree.leaves(result)
  if isinstance(result, Outcome) and int(result.participants) == 0:
    leaves = [result.budgets, result.payments, result.client_utilities, result.total_payment]
  return all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)


def canonical(spec: GameSpec, num_clients: int, uses: str | None) -> GameSpec:
  """The spec with num_types and num_aggregators at their effective values (K, M) where the mechanism
  uses them (``uses``) and at their defaults elsewhere, so equal programs share one compilation (e.g.
  num_aggregators 10 and 4 both give M = 4 for 8 clients; stackelberg ignores both)."""
  default = GameSpec()
  k_types = num_types(spec, num_clients) if uses == "num_types" else default.num_types
  aggregators = num_aggregators(spec, num_clients) if uses == "num_aggregators" else default.num_aggregators
  return dataclasses.replace(spec, num_types=k_types, num_aggregators=aggregators)


def cast(game: Game, dtype) -> Game:
  """Every leaf of ``game`` as a ``dtype`` array (an absent noise table stays None)."""
  return Game(*(None if value is None else jnp.asarray(value, dtype) for value in game))


def mechanism(
  core: Callable[[Game, GameSpec], _T] | None = None, *, uses: str | None = None
) -> Callable[[Game, GameSpec], _T]:
  """Checks the game on the host (skipped for tracers), runs core(game, spec) jitted with spec static.

  A concrete float32 game whose result is not finite (an equilibrium the solver cannot trust in float32,
  or an overflow) is solved again in float64 and cast back; if that fails too, ConfigError. ``uses``
  names the spec field among num_types / num_aggregators the mechanism reads (see ``canonical``).
  """
  if core is None:
    return functools.partial(mechanism, uses=uses)
  jitted = jax.jit(core, static_argnums=1)

  @functools.wraps(core)
  def wrapper(game: Game, spec: GameSpec) -> _T:
    require(isinstance(spec, GameSpec), f"spec={spec!r} is invalid: expected a GameSpec")
    validate_game(game)
    spec = canonical(spec, game.costs.shape[-1], uses)
    # Field by field: a leaf given as a Python list is one array, not a pytree of scalars.
    dtype = jnp.result_type(float, *(jnp.asarray(value) for value in game if value is not None))
    game = cast(game, dtype)
    # The accountant's noise table once per game, outside the mechanism's searches (valuation.noise_table).
    game = valuation.with_noise_table(game, spec)
    result = jitted(game, spec)
    if any(is_traced(leaf) for leaf in jax.tree.leaves(game)) or _check_outcome(result):
      return result
    if dtype != jnp.float64:
      with jax.enable_x64(True):
        wide = jitted(cast(game, jnp.float64), spec)
        narrow = jax.tree.map(
          lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, wide
        )
        # Float64 may be finite where its values overflow the caller's dtype (e.g. payments near 1e38).
        if _check_outcome(wide) and _check_outcome(narrow):
          return narrow
    costs = np.asarray(game.costs)
    fail(
      f"{core.__name__} is not finite in {np.dtype(dtype).name} (nor in float64) for costs in "
      f"[{float(costs.min())!r}, {float(costs.max())!r}]: expected magnitudes whose ratios c_i / w_i and "
      "their sum stay finite (rescale the costs and lam together)"
    )

  return wrapper


def proportional(total: chex.Array, x: chex.Array) -> chex.Array:
  """Shares total * x_i / sum_j x_j along the last axis: x [..., n], total [...]; 0 where sum_j x_j = 0."""
  x_sum = jnp.sum(x, axis=-1, keepdims=True)
  positive = x_sum > 0
  return jnp.where(positive, jnp.expand_dims(total, -1) * x / jnp.where(positive, x_sum, 1.0), 0.0)

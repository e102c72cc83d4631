"""Strategic misreporting: clients exaggerate their privacy costs (docs/model.md "The game", "Baselines").

A liar i reports c'_i = m c_i with an exaggeration factor m >= 1 instead of its true per-unit cost c_i;
honest clients report c'_i = c_i. The mechanism cannot tell reports from costs, so it is solved on c' and
picks budgets eps(c') and payments p(c'); what each party really gets is accounted with the TRUE costs:

  u_i = p_i(c') - c_i eps_i(c'),   U_s = lam Q(eps(c')) - total payment(c')   (the server never sees c),
  W = U_s + sum_i u_i + margins = lam Q(eps(c')) - sum_i c_i eps_i(c').

m = 1 is the honest outcome. Because c'_i >= c_i, u_i >= p_i(c') - c'_i eps_i(c'): a mechanism that is
individually rational on the reports stays individually rational on the true costs.

Everything works on one game ([N] arrays) and vmaps over factors (and games), e.g.
``jax.vmap(lambda m: misreported_outcome(game, spec, m, liars))(factors)``.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax.game import baselines
from fcfn_jax.game.outcome import Outcome, build_outcome
from fcfn_jax.game.spec import Game, GameSpec, num_intermediaries, validate_game
from fcfn_jax.validate import check_array, check_int, is_traced, require


def choose_liars(num_clients: int, fraction: float, seed: int = 0) -> np.ndarray:
  """bool [num_clients]: a seeded uniform choice of round(fraction * num_clients) liars.

  fraction in [0, 1]; 1 = every client lies.
  """
  check_int("num_clients", num_clients)
  require(
    isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 <= fraction <= 1,
    f"fraction={fraction!r} is invalid: expected a number in [0, 1]",
  )
  liars = np.zeros(num_clients, bool)
  liars[np.random.default_rng(seed).choice(num_clients, round(fraction * num_clients), replace=False)] = True
  return liars


def _validate(true_costs, factor, liars_mask) -> None:
  """Host-side checks (skipped for tracers) of the factor and the liars' mask against costs [N]."""
  check_array(
    "factor",
    factor,
    lambda a: np.isfinite(a) & (a >= 1),
    "finite exaggeration factors >= 1 (a liar reports m c_i with m >= 1)",
  )
  if not is_traced(factor):
    require(
      np.ndim(factor) == 0 or np.shape(factor) == np.shape(true_costs),
      f"factor has shape {np.shape(factor)}: expected a scalar or one per client, {np.shape(true_costs)}",
    )
  if liars_mask is not None and not is_traced(liars_mask):
    mask = np.asarray(liars_mask)
    require(
      mask.dtype == bool and mask.shape == np.shape(true_costs),
      f"liars_mask of dtype {mask.dtype} and shape {mask.shape} is invalid: expected bool "
      f"{np.shape(true_costs)}, one per client",
    )


def reported_costs(
  true_costs: chex.Array, factor: chex.Numeric, liars_mask: chex.Array | None = None
) -> chex.Array:
  """c'_i = m c_i for liars, c_i for honest clients: [N] (liars_mask None = everyone lies).

  Args:
    true_costs: c_i [N]. factor: m >= 1, a scalar or one per client [N]. liars_mask: bool [N] or None.
  """
  true_costs = jnp.asarray(true_costs)
  exaggerated = jnp.asarray(factor) * true_costs
  return exaggerated if liars_mask is None else jnp.where(liars_mask, exaggerated, true_costs)


@functools.partial(jax.jit, static_argnames=("spec",))
def true_cost_outcome(reported: Outcome, game: Game, spec: GameSpec) -> Outcome:
  """``reported`` (mechanism ``spec.mechanism``'s Outcome on the reports) accounted with the true costs of
  ``game``.

  Budgets, payments and the intermediaries' margin are what the mechanism chose; only the clients'
  utilities, the welfare and the averages change.
  """
  m = num_intermediaries(spec, jnp.shape(game.costs)[-1])
  # The Outcome keeps only the total margin; build_outcome needs only that total and the count M.
  margins = jnp.zeros((m,), reported.budgets.dtype).at[0].set(reported.intermediary_utility) if m else None
  return build_outcome(reported.budgets, reported.payments, game, spec, margins)


def misreported_outcome(
  game: Game, spec: GameSpec, factor: chex.Numeric, liars_mask: chex.Array | None = None
) -> Outcome:
  """Mechanism ``spec.mechanism`` solved on the reported costs, every utility with the true costs.

  Args:
    game: the game with the TRUE costs c_i [N]. spec: the mechanism and the rest of the static game.
    factor: the exaggeration m >= 1, a scalar or one per client [N].
    liars_mask: bool [N], True = client i reports m c_i; None = every client lies.

  Returns:
    The :class:`Outcome` under misreporting (see the module docstring); factor 1 gives the honest one.

  Raises:
    ConfigError: a factor below 1 or not finite, a mask of the wrong dtype or shape, or a bad game.
  """
  validate_game(game)
  _validate(game.costs, factor, liars_mask)
  reported = baselines.solve(game._replace(costs=reported_costs(game.costs, factor, liars_mask)), spec)
  return true_cost_outcome(reported, game, spec)

"""Gradient-based tuning of the server's pricing parameters (docs/model.md "The game", Stage I).

The server's objective U_s(R, pi) = lam Q(eps*(R, pi)) - R (``leader.server_utility``) is differentiated
through the capped follower equilibrium eps* by the implicit function theorem
(``solver.share_equilibrium``) and, for the 'dp' valuation, through the aggregate's noise variance
(``valuation.quality``: the eps -> noise map and the aggregation weights).
The parameters are log-parametrized, theta = (log R, log pi_g for each price group g), so R > 0 and
pi > 0 without constraints, and are optimized by any optax transformation (Adam by default) in one
``lax.scan`` that records the trajectory. ``leader.solve_leader`` is the exact optimizer; this module is
the transparent first-order path (trajectories, schedules, and the hypergradient itself).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from fcfn_jax.game.leader import _group_prices, payment_upper_bound, server_utility
from fcfn_jax.game.spec import Game, GameSpec
from fcfn_jax.validate import check_int


class PricingParams(NamedTuple):
  """log_payment: log R []; log_prices: log pi_g [G] (only differences matter: s pi is the same game)."""

  log_payment: chex.Array
  log_prices: chex.Array


class TuningTrace(NamedTuple):
  """The trajectory of ``tune_pricing``, step t = 0..num_steps (row t = before update t + 1).

  objective: U_s [T+1]; payment: R [T+1]; prices: normalized group prices pi_g [T+1, G];
  grad_norm: |d U_s / d theta| [T+1].
  """

  objective: chex.Array
  payment: chex.Array
  prices: chex.Array
  grad_norm: chex.Array


def initial_params(payment: chex.Numeric, num_groups: int = 1) -> PricingParams:
  """theta at payment R > 0 with uniform prices (pi_g = 1)."""
  log_payment = jnp.log(jnp.asarray(payment, jnp.result_type(float)))
  return PricingParams(log_payment, jnp.zeros((num_groups,), log_payment.dtype))


def group_prices(params: PricingParams) -> chex.Array:
  """The normalized group prices pi_g = exp(theta_g - mean(theta)): [G]."""
  return _group_prices(params.log_prices, jnp.arange(params.log_prices.shape[-1]))


def pricing_objective(params: PricingParams, game: Game, spec: GameSpec, groups: chex.Array) -> chex.Array:
  """U_s(exp(log R), pi) = lam Q(eps*) - R: [], client i paying price pi_{groups[i]} (groups: int [N])."""
  return server_utility(jnp.exp(params.log_payment), game, spec, _group_prices(params.log_prices, groups))


def hypergradient(
  params: PricingParams, game: Game, spec: GameSpec, groups: chex.Array
) -> tuple[chex.Array, PricingParams]:
  """(U_s, d U_s / d theta) by the implicit function theorem on the follower equilibrium."""
  return jax.value_and_grad(pricing_objective)(params, game, spec, groups)


@functools.partial(jax.jit, static_argnames=("spec", "optimizer", "num_steps", "safeguard"))
def tune_pricing(
  params: PricingParams,
  game: Game,
  spec: GameSpec,
  groups: chex.Array,
  optimizer: optax.GradientTransformation,
  num_steps: int,
  safeguard: bool = False,
) -> tuple[PricingParams, TuningTrace]:
  """Maximizes U_s over theta = (log R, log pi) by ``optimizer`` for num_steps steps.

  With ``safeguard`` a step that lowers U_s (or makes it NaN) is rejected and the next proposal is the
  same update scaled by half (the scale doubles back, up to 1, after each accepted step), so the
  trajectory never decreases. That matters where U_s has kinks (a cap starts to bind, a client enters or
  leaves) and a plain first-order step overshoots onto a lower branch. On a smooth objective it slows
  the final convergence (momentum overshoots of the optimum are rejected too), so leave it off there.

  Args:
    params: the start theta_0 (e.g. :func:`initial_params`).
    game: one game (vmap over a stacked Game for many). spec: static (valuation, aggregation, solver).
    groups: price group of each client, int [N] in [0, G).
    optimizer: an optax transformation (e.g. ``optax.adam``) applied to -dU_s/dtheta. Static: build it
      once and reuse it, or every call recompiles.
    num_steps: optimizer steps (static).
    safeguard: reject steps that lower U_s (static).

  Returns:
    (the best theta seen, the trajectory of the current iterate); the best is the argmax of
    trace.objective.
  """
  check_int("num_steps", num_steps)

  def row(params, value, grad):
    return value, jnp.exp(params.log_payment), group_prices(params), optax.tree_utils.tree_norm(grad)

  def step(carry, _):
    params, value, grad, state, scale = carry
    updates, new_state = optimizer.update(jax.tree.map(jnp.negative, grad), state, params)
    proposal = optax.apply_updates(params, optax.tree_utils.tree_scale(scale, updates))
    new_value, new_grad = hypergradient(proposal, game, spec, groups)
    accept = (new_value >= value) | ~jnp.asarray(safeguard)
    carry = jax.tree.map(
      lambda new, old: jnp.where(accept, new, old),
      (proposal, new_value, new_grad, new_state),
      (params, value, grad, state),
    )
    scale = jnp.where(accept, jnp.minimum(2.0 * scale, 1.0), 0.5 * scale)
    return (*carry, scale), (carry[0], row(*carry[:3]))

  value, grad = hypergradient(params, game, spec, groups)
  init = (params, value, grad, optimizer.init(params), jnp.ones((), value.dtype))
  _, (history, rows) = jax.lax.scan(step, init, length=num_steps)
  prepend = lambda first, rest: jnp.concatenate([first[None], rest])
  trace = TuningTrace(*jax.tree.map(prepend, row(params, value, grad), rows))
  history = jax.tree.map(prepend, params, history)
  best = jnp.argmax(jnp.where(jnp.isnan(trace.objective), -jnp.inf, trace.objective))
  return jax.tree.map(lambda a: a[best], history), trace


def uniform_grid(
  game: Game, spec: GameSpec, num_points: int, decades: float = 4.0
) -> tuple[chex.Array, chex.Array]:
  """U_s on a log-grid of uniform-price payments R in [R_hi 10^-decades, R_hi]: (R [P], U_s [P]).

  R_hi = ``leader.payment_upper_bound``: the grid baseline the tuned prices are compared with.
  """
  check_int("num_points", num_points, minimum=2)
  upper = payment_upper_bound(game, spec)
  payments = upper * jnp.logspace(-decades, 0.0, num_points, dtype=upper.dtype)
  return payments, jax.vmap(lambda r: server_utility(r, game, spec))(payments)

"""The leader's problem (docs/model.md "Stage I"): the capped optimum of the server's true objective.

The server announces a total payment R (and, optionally, price weights pi, one per client or per group
of clients); the followers play the CAPPED proportional-share equilibrium eps*(R, pi) of
``solver.share_equilibrium``; the server's utility is U_s = lam Q(eps*) - R with Q the game's valuation
(``valuation.quality``: the noise of the aggregate it forms, or log(1 + X)). The uncapped closed form
R* = max(0, lam - K_S / (|S|-1)) is a check for the 'log' valuation, never the answer when a cap binds.

:func:`search_payment` maximizes any U_s(R) over a log-grid and golden-section searches (values only, so
kinks where caps start to bind cannot mislead it); the three-party server uses it too. :func:`solve_leader`
adds an L-BFGS refinement (optax) on (log R, log pi) with the implicit hypergradient. Everything is
jittable with the GameSpec static, and vmappable over games.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from fcfn_jax.game import valuation
from fcfn_jax.game.solver import share_equilibrium
from fcfn_jax.game.spec import Game, GameSpec, SearchOptions, validate_game
from fcfn_jax.validate import is_traced, require


class LeaderSolution(NamedTuple):
  """payment R*: []; prices pi* (ones without price groups): [N]; budgets eps*: [N]; utility U_s*: []."""

  payment: chex.Array
  prices: chex.Array
  budgets: chex.Array
  utility: chex.Array


def follower_budgets(
  payment: chex.Numeric, game: Game, spec: GameSpec, prices: chex.Array | None = None
) -> chex.Array:
  """eps*(R, pi): [N], the followers' capped equilibrium at payment R and price weights pi."""
  return share_equilibrium(payment, game.costs, game.weights, game.eps_max, prices, spec.search.solver)


def server_utility(
  payment: chex.Numeric, game: Game, spec: GameSpec, prices: chex.Array | None = None
) -> chex.Array:
  """U_s(R, pi) = lam Q(eps*(R, pi)) - R: [], differentiable in R, pi and every field of ``game``."""
  return game.lam * valuation.quality(follower_budgets(payment, game, spec, prices), game, spec) - payment


def payment_upper_bound(game: Game, spec: GameSpec) -> chex.Array:
  """R_hi >= R* (uniform prices): the least R at which every client sits at its cap, and, when finite,
  lam (Q(eps_max) - Q(0)).

  With all budgets at eps_max client i stays capped iff R w_i (A - x_i) / A^2 >= c_i, A = sum_j w_j
  eps_max, x_i = w_i eps_max; above that R the budgets no longer change and U_s only falls. And U_s(R) <=
  lam Q(eps_max) - R < lam Q(0) = U_s(0) beyond the second bound ('log'; under 'dp' Q(0) = -inf).
  """
  x = game.weights * game.eps_max
  total = jnp.sum(x)
  all_capped = jnp.max(game.costs * total**2 / (game.weights * (total - x)))
  full = jnp.broadcast_to(game.eps_max, game.weights.shape)
  gain = game.lam * (
    valuation.quality(full, game, spec) - valuation.quality(jnp.zeros_like(full), game, spec)
  )
  return jnp.where(jnp.isfinite(gain) & (gain > 0), jnp.minimum(all_capped, gain), all_capped)


def _finite_or_worst(values: chex.Array) -> chex.Array:
  """NaN (an untrusted equilibrium, see ``solver``) ranks below every number."""
  return jnp.where(jnp.isnan(values), -jnp.inf, values)


_GOLD = (3.0 - np.sqrt(5.0)) / 2.0


def search_payment(
  utility: Callable[[chex.Array], tuple[chex.Array, Any]], upper: chex.Array, options: SearchOptions
) -> tuple[chex.Array, chex.Array, Any]:
  """max over R in {0} u (0, upper] of utility(log R), by values only: (log R*, U*, aux at R*).

  1. R = 0 (log R = -inf) and a log-grid of ``grid_size`` points over [upper 10^-grid_decades, upper];
  2. golden-section search within one grid step of each of the ``num_starts`` best grid points: U(R) may
     have several local maxima (each time a cap starts to bind the follower response bends), so the
     starts pick the best one and the search its peak; values only, so kinks cannot mislead it.
  The best point evaluated wins, so U* is never below any grid point. Both phases run in ONE loop that
  evaluates ``num_starts`` points per step with one vmapped call of ``utility``: every call site of the
  equilibrium solver is compiled separately, and this keeps it at one. ``utility`` maps log R: [] to
  (U: [], aux pytree), e.g. the follower budgets, returned for the best point without another solve.
  """
  dtype = jnp.result_type(upper)
  batch = options.num_starts
  spacing = options.grid_decades * np.log(10.0) / max(options.grid_size - 1, 1)
  log_grid = jnp.log(upper) + jnp.linspace(-options.grid_decades * np.log(10.0), 0.0, options.grid_size)
  grid_rounds = -(-(options.grid_size + 1) // batch)
  padding = grid_rounds * batch - options.grid_size - 1
  # Point 0 is R = 0; padding repeats it (top_k below never picks either).
  points = jnp.concatenate([jnp.full((1,), -jnp.inf), log_grid, jnp.full((padding,), -jnp.inf)]).astype(dtype)
  evaluate = jax.vmap(lambda t: (lambda u, aux: (_finite_or_worst(u), aux))(*utility(t)))
  aux_shape = jax.eval_shape(lambda t: utility(t)[1], points[0])
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)

  def step(r, state):
    values, brackets, best = state
    in_grid = r < grid_rounds
    # First section step: brackets around the best grid points (R = 0 and padding excluded).
    start_values, starts = jax.lax.top_k(jnp.where(jnp.isinf(points), -jnp.inf, values), batch)
    mid = points[starts]
    fresh = (mid - spacing, mid, mid + spacing, start_values)
    a, b, c, fb = jax.tree.map(lambda new, old: jnp.where(r == grid_rounds, new, old), fresh, brackets)
    right = c - b > b - a
    x_section = jnp.where(right, b + _GOLD * (c - b), b - _GOLD * (b - a))
    x = jnp.where(in_grid, jax.lax.dynamic_slice(points, (r * batch,), (batch,)), x_section)
    fx, aux = evaluate(x)
    values = jnp.where(in_grid, jax.lax.dynamic_update_slice(values, fx, (r * batch,)), values)
    better = fx > fb
    brackets = (
      jnp.where(better == right, jnp.where(right, b, x), a),
      jnp.where(better, x, b),
      jnp.where(better != right, jnp.where(right, x, b), c),
      jnp.where(better, fx, fb),
    )
    i = jnp.argmax(fx)
    candidate = (x[i], fx[i], jax.tree.map(lambda v: v[i], aux))
    improves = fx[i] > best[1]
    best = jax.tree.map(lambda new, old: jnp.where(improves, new, old), candidate, best)
    return values, brackets, best

  values = jnp.full(points.shape, -jnp.inf, dtype)
  brackets = tuple(jnp.zeros((batch,), dtype) for _ in range(4))
  best = (jnp.asarray(-jnp.inf, dtype), jnp.asarray(-jnp.inf, dtype), zeros)
  _, _, best = jax.lax.fori_loop(0, grid_rounds + options.section_iters, step, (values, brackets, best))
  return best


def _group_prices(log_prices: chex.Array, groups: chex.Array) -> chex.Array:
  """pi_i = exp(theta_g(i) - mean(theta)): [N]; the mean is removed since pi -> s pi is the same game."""
  return jnp.exp(log_prices - jnp.mean(log_prices))[groups]


def _maximize(objective: Callable, start, active: chex.Array, max_iter: int, gtol: float, ftol: float):
  """L-BFGS (optax, backtracking line search) on -objective from ``start`` while ``active``.

  Stops after max_iter steps, when the gradient norm drops below gtol, or when a step improves the
  objective by less than ftol (round-off at a smooth optimum, or creeping up to a kink of U_s).
  Returns the best iterate and its objective (-inf if inactive).
  """
  # The line search needs values only; the gradient is taken once per step, at the accepted point.
  opt = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=30))
  loss = lambda z: -objective(z)

  def keep_best(best_z, best_loss, z, value):
    better = value < best_loss
    return jax.tree.map(lambda a, b: jnp.where(better, a, b), z, best_z), jnp.where(better, value, best_loss)

  def step(carry):
    z, state, best_z, best_loss, _, count = carry
    value, grad = jax.value_and_grad(loss)(z)
    best_z, best_loss = keep_best(best_z, best_loss, z, value)
    updates, state = opt.update(grad, state, z, value=value, grad=grad, value_fn=loss)
    z = optax.apply_updates(z, updates)
    new_loss = otu.tree_get(state, "value")
    progress = (otu.tree_norm(grad) >= gtol) & (new_loss < best_loss - ftol)
    return (z, state, *keep_best(best_z, best_loss, z, new_loss), progress, count + 1)

  def keep_going(carry):
    progress, count = carry[-2:]
    return active & ((count == 0) | (count < max_iter) & progress)

  init = (start, opt.init(start), start, jnp.asarray(jnp.inf, start[0].dtype), jnp.asarray(True), 0)
  _, _, z, best_loss, _, _ = jax.lax.while_loop(keep_going, step, init)
  return z, -best_loss


def validate_groups(groups, num_groups: int) -> None:
  """Host-side check (skipped under tracing) of price groups: integers in [0, num_groups)."""
  if groups is not None and not is_traced(groups):
    groups = np.asarray(groups)
    require(
      np.issubdtype(groups.dtype, np.integer)
      and groups.size
      and groups.min() >= 0
      and groups.max() < num_groups,
      f"groups={groups!r} is invalid: expected integers in [0, num_groups={num_groups})",
    )


def solve_leader(
  game: Game, spec: GameSpec, groups: chex.Array | None = None, num_groups: int = 0
) -> LeaderSolution:
  """The leader's optimal payment R* (and prices pi* if ``groups`` is given) for one game.

  Maximizes U_s(R, pi) = lam Q(eps*(R, pi)) - R over the capped follower equilibrium (docs/model.md
  "Stage I"): :func:`search_payment` over R in {0} u (0, ``payment_upper_bound``] at uniform prices (its
  golden-section steps locate a smooth peak to ~1e-10 in log R); with price groups, L-BFGS on
  (log R, log pi) with the implicit hypergradient from that point. The best candidate wins, so U_s* is
  never below any grid point.

  Args:
    game: one game ([N] arrays; vmap over a stacked Game for many).
    spec: static: the valuation, aggregation and search settings.
    groups: optional price group of each client: int [N] in [0, num_groups); ``jnp.arange(N)`` with
      num_groups = N prices every client separately.
    num_groups: number of price groups (static).

  Returns:
    LeaderSolution(payment [], prices [N], budgets [N], utility []).
  """
  validate_game(game)
  validate_groups(groups, num_groups)
  dtype = game.weights.dtype
  options = spec.search

  def uniform(log_payment):
    budgets = follower_budgets(jnp.exp(log_payment), game, spec)
    return game.lam * valuation.quality(budgets, game, spec) - jnp.exp(log_payment), budgets

  log_r, start_utility, budgets = search_payment(uniform, payment_upper_bound(game, spec), options)
  ones = jnp.ones(game.weights.shape, dtype)
  if groups is None:
    return LeaderSolution(jnp.exp(log_r), ones, budgets, start_utility)

  flat = jnp.zeros((num_groups,), dtype)

  def utility(log_payment, log_prices):
    return server_utility(jnp.exp(log_payment), game, spec, _group_prices(log_prices, groups))

  start = (log_r, flat)
  scale = jnp.maximum(jnp.abs(start_utility), jnp.finfo(dtype).tiny)
  eps = float(np.finfo(dtype).eps)
  z, refined = _maximize(
    lambda z: utility(*z) / scale,
    start,
    jnp.isfinite(log_r),  # R = 0 wins: nobody to price
    options.max_iter,
    np.sqrt(eps) if options.gtol is None else options.gtol,
    eps ** (2 / 3) if options.ftol is None else options.ftol,
  )
  use_refined = refined * scale > start_utility  # False for NaN
  log_payment, log_prices = jax.tree.map(lambda a, b: jnp.where(use_refined, a, b), z, start)
  prices = _group_prices(log_prices, groups)
  payment = jnp.exp(log_payment)
  budgets = follower_budgets(payment, game, spec, prices)
  return LeaderSolution(payment, prices, budgets, game.lam * valuation.quality(budgets, game, spec) - payment)

"""The leader's problem (docs/model.md "The game", Stage I): the server's payment R and optional prices.

The server announces R (and, optionally, price weights pi, one per client or per group of clients); the
followers play the proportional-share equilibrium eps*(R, pi) of ``solver.share_equilibrium``; the
server's utility is U_s = lam Q(eps*) - R for a model-quality function Q:
  - ``log_quality``: Q = log(1 + X), X = sum_i w_i eps_i, the canonical U_s of docs/model.md, whose optimum
    is ``closed_form_payment`` when no cap binds;
  - ``dp_quality``: Q = G(eps) = -sum_i a_i^2 v(eps_i), the variance of the averaged Gaussian noise
    (a_i = d_i / sum of d over participants, v = noise variance at eps_i, supplied by the caller).
U_s is maximized over log R (and log pi) by L-BFGS (optax) on the implicit hypergradient, started from the
best point of a coarse log-grid over R so that a non-concave U_s (DP quality with binding caps) does not
trap it. Everything is jittable and vmappable over games.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from fcfn_jax.game.solver import SolverOptions, share_equilibrium
from fcfn_jax.validate import check_clients, check_positive_array, is_traced, require

QualityFn = Callable[[chex.Array, chex.Array], chex.Array]
"""``quality_fn(budgets: [N], weights: [N]) -> Q: []``, the server's model quality at the budgets."""


class LeaderProblem(NamedTuple):
  """One game as seen by the leader (a pytree: stack fields on a leading axis to vmap over games).

  costs: per-unit privacy costs c: [N]; weights: data weights w = d / mean(d): [N];
  eps_max: budget caps: [] or [N]; lam: the server's valuation of model quality: [].
  """

  costs: chex.Array
  weights: chex.Array
  eps_max: chex.Array
  lam: chex.Array


class LeaderOptions(NamedTuple):
  """Outer search settings.

  grid_size: points of the coarse log-grid over R in [R_hi 10^-grid_decades, R_hi].
  num_starts: golden-section searches, one around each of the best grid points (<= grid_size).
  section_iters: golden-section steps of each search (each shrinks the bracket by about 0.618).
  max_iter: L-BFGS iterations of the final refinement.
  gtol: stop L-BFGS when the gradient of U_s / |U_s(start)| w.r.t. (log R, log pi) is below this;
    None = sqrt of the dtype's machine epsilon.
  ftol: stop L-BFGS when an iteration improves U_s / |U_s(start)| by less than this; None = the
    dtype's machine epsilon to the power 2/3.
  solver: follower-equilibrium settings.
  """

  grid_size: int = 128
  grid_decades: float = 6.0
  num_starts: int = 4
  section_iters: int = 48
  max_iter: int = 50
  gtol: float | None = None
  ftol: float | None = None
  solver: SolverOptions = SolverOptions()


class LeaderSolution(NamedTuple):
  """payment R*: []; prices pi* (ones without price groups): [N]; budgets eps*: [N]; utility U_s*: []."""

  payment: chex.Array
  prices: chex.Array
  budgets: chex.Array
  utility: chex.Array


def log_quality(budgets: chex.Array, weights: chex.Array) -> chex.Array:
  """Q = log(1 + X), X = sum_i w_i eps_i (docs/model.md "Stage I")."""
  return jnp.log1p(jnp.dot(weights, budgets))


def dp_quality(
  budgets: chex.Array, weights: chex.Array, variance_fn: Callable[[chex.Array], chex.Array]
) -> chex.Array:
  """G = -sum_{i in P} a_i^2 v(eps_i), a_i = w_i / sum_{j in P} w_j, P = {i : eps_i > 0} (docs/model.md).

  ``variance_fn(eps) -> v``, elementwise for eps > 0 (e.g. the squared noise multiplier of the
  surrogate of docs/model.md "From epsilon_i to noise", fixed by the caller's steps and delta). Clients
  out of the game carry no weight and no variance term, and v is never evaluated at 0, so gradients stay
  finite. G = -inf when nobody participates (no model is trained).
  """
  inside = budgets > 0
  total = jnp.sum(jnp.where(inside, weights, 0.0))
  a = jnp.where(inside, weights, 0.0) / jnp.where(total > 0, total, 1.0)
  variance = variance_fn(jnp.where(inside, budgets, 1.0))
  return jnp.where(total > 0, -jnp.sum(jnp.where(inside, a**2 * variance, 0.0)), -jnp.inf)


def server_utility(
  payment: chex.Numeric,
  problem: LeaderProblem,
  quality_fn: QualityFn,
  prices: chex.Array | None = None,
  options: SolverOptions = SolverOptions(),
) -> chex.Array:
  """U_s(R, pi) = lam Q(eps*(R, pi)) - R: [], differentiable in R, pi and every field of ``problem``."""
  return _outcome(payment, problem, quality_fn, prices, options)[0]


def _outcome(payment, problem, quality_fn, prices, options):
  """(U_s: [], eps*: [N]) at payment R and prices pi."""
  budgets = share_equilibrium(payment, problem.costs, problem.weights, problem.eps_max, prices, options)
  return problem.lam * quality_fn(budgets, problem.weights) - payment, budgets


def payment_upper_bound(problem: LeaderProblem, quality_fn: QualityFn) -> chex.Array:
  """An R_hi >= R* (uniform prices): the least R at which every client is capped, and lam (Q_max - Q(0)).

  With all budgets at eps_max client i stays capped iff R w_i (A - x_i) / A^2 >= c_i, A = sum_j w_j
  eps_max_j, x_i = w_i eps_max_i; above that R the budgets are constant and U_s only falls. Also
  U_s(R) <= lam Q(eps_max) - R < lam Q(0) = U_s(0) for R > lam (Q(eps_max) - Q(0)) when Q is largest at
  full budgets (log quality); an infinite or negative bound (DP quality: Q(0) = -inf) is ignored.
  """
  eps_max = jnp.broadcast_to(problem.eps_max, problem.weights.shape)
  x = problem.weights * eps_max
  total = jnp.sum(x)
  all_capped = jnp.max(problem.costs * total**2 / (problem.weights * (total - x)))
  gain = problem.lam * (quality_fn(eps_max, problem.weights) - quality_fn(jnp.zeros_like(x), problem.weights))
  return jnp.where(jnp.isfinite(gain) & (gain > 0), jnp.minimum(all_capped, gain), all_capped)


def validate_problem(problem: LeaderProblem, groups=None, num_groups: int = 0) -> None:
  """Host-side check (skipped under tracing) of a leader's problem and its price groups.

  Raises:
    ConfigError naming the bad value: fewer than 2 clients, non-positive or NaN costs, weights, eps_max
    or lam, groups outside [0, num_groups).
  """
  check_clients(problem.costs, problem.weights)
  check_positive_array("eps_max", problem.eps_max)
  check_positive_array("lam", problem.lam)
  if groups is not None and not is_traced(groups):
    groups = np.asarray(groups)
    require(
      np.issubdtype(groups.dtype, np.integer)
      and groups.size
      and groups.min() >= 0
      and groups.max() < num_groups,
      f"groups={groups!r} is invalid: expected integers in [0, num_groups={num_groups})",
    )


def _group_prices(log_prices: chex.Array, groups: chex.Array) -> chex.Array:
  """pi_i = exp(theta_g(i) - mean(theta)): [N]; the mean is removed since pi -> s pi is the same game."""
  return jnp.exp(log_prices - jnp.mean(log_prices))[groups]


def _section_search(
  fn: Callable, lo: chex.Array, mid: chex.Array, hi: chex.Array, fn_mid: chex.Array, iters: int
):
  """Maximizes fn over the bracket lo < mid < hi by golden-section steps: (argmax estimate, max).

  Function values only, so kinks and jumps of a sawtooth U_s cannot mislead it; each step evaluates one
  point in the larger half of the bracket and keeps the best point seen as the middle one.
  """
  gold = (3.0 - np.sqrt(5.0)) / 2.0

  def body(_, state):
    a, b, c, fb = state
    right = c - b > b - a
    x = jnp.where(right, b + gold * (c - b), b - gold * (b - a))
    fx = fn(x)
    better = fx > fb
    a = jnp.where(better == right, jnp.where(right, b, x), a)
    c = jnp.where(better != right, jnp.where(right, x, b), c)
    return a, jnp.where(better, x, b), c, jnp.where(better, fx, fb)

  _, best, _, value = jax.lax.fori_loop(0, iters, body, (lo, mid, hi, fn_mid))
  return best, value


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


def solve_leader(
  problem: LeaderProblem,
  quality_fn: QualityFn,
  groups: chex.Array | None = None,
  num_groups: int = 0,
  options: LeaderOptions = LeaderOptions(),
) -> LeaderSolution:
  """The leader's optimal payment R* (and prices pi* if ``groups`` is given) for one game.

  Maximizes U_s(R, pi) = lam Q(eps*(R, pi)) - R (docs/model.md "Stage I") in three steps:
    1. U_s at R = 0 and on a log-grid over [R_hi 10^-grid_decades, R_hi] (R_hi from
       ``payment_upper_bound``, prices 1);
    2. golden-section search on log R within one grid step of each of the ``num_starts`` best positive
       grid points: with binding caps U_s(R) is a sawtooth (an entrant with a tiny budget adds a huge
       noise variance), so the starts pick the best tooth and the search its peak;
    3. L-BFGS (optax) on (log R, log pi) with the implicit hypergradient from the best point so far.
  The best candidate of all steps wins, so U_s* is never below the grid's best.

  Args:
    problem: the game (fields [N] or scalars; vmap over a stacked LeaderProblem for many games).
    quality_fn: Q(budgets, weights) -> []: ``log_quality`` or a ``functools.partial`` of ``dp_quality``.
      Static under jit.
    groups: optional price group of each client: int [N] in [0, num_groups); ``jnp.arange(N)`` with
      num_groups = N prices every client separately.
    num_groups: number of price groups (static).
    options: search settings (static).

  Returns:
    LeaderSolution(payment [], prices [N], budgets [N], utility []).
  """
  validate_problem(problem, groups, num_groups)
  problem = jax.tree.map(jnp.asarray, problem)
  dtype = problem.weights.dtype
  if groups is None:
    groups, num_groups = jnp.zeros(problem.weights.shape, jnp.int32), 1
  flat = jnp.zeros((num_groups,), dtype)

  def utility(log_payment, log_prices):
    prices = _group_prices(log_prices, groups)
    return server_utility(jnp.exp(log_payment), problem, quality_fn, prices, options.solver)

  log_grid = jnp.log(payment_upper_bound(problem, quality_fn)) + jnp.linspace(
    -options.grid_decades * np.log(10.0), 0.0, options.grid_size, dtype=dtype
  )
  # R = 0 rides along with the grid: every call site of the equilibrium solver compiles separately.
  payments = jnp.concatenate([jnp.zeros((1,), dtype), jnp.exp(log_grid)])
  grid_utility = jax.vmap(lambda r: server_utility(r, problem, quality_fn, None, options.solver))(payments)
  grid_utility = jnp.where(jnp.isnan(grid_utility), -jnp.inf, grid_utility)
  zero_utility, grid_utility = grid_utility[0], grid_utility[1:]

  start_utility, starts = jax.lax.top_k(grid_utility, options.num_starts)
  spacing = options.grid_decades * np.log(10.0) / max(options.grid_size - 1, 1)
  mid = log_grid[starts]
  log_r, section_utility = jax.vmap(
    lambda lo, mid, hi, f_mid: _section_search(
      lambda t: utility(t, flat), lo, mid, hi, f_mid, options.section_iters
    )
  )(mid - spacing, mid, mid + spacing, start_utility)
  best = jnp.argmax(jnp.where(jnp.isnan(section_utility), -jnp.inf, section_utility))
  start, start_utility = (log_r[best], flat), section_utility[best]

  scale = jnp.maximum(jnp.abs(start_utility), jnp.finfo(dtype).tiny)
  eps = float(np.finfo(dtype).eps)
  z, refined = _maximize(
    lambda z: utility(*z) / scale,
    start,
    start_utility > zero_utility,
    options.max_iter,
    np.sqrt(eps) if options.gtol is None else options.gtol,
    eps ** (2 / 3) if options.ftol is None else options.ftol,
  )
  use_refined = refined * scale > start_utility  # False for NaN
  log_payment, log_prices = jax.tree.map(lambda a, b: jnp.where(use_refined, a, b), z, start)
  best_utility = jnp.where(use_refined, refined * scale, start_utility)
  payment = jnp.where(zero_utility >= best_utility, 0.0, jnp.exp(log_payment))
  prices = _group_prices(log_prices, groups)
  value, budgets = _outcome(payment, problem, quality_fn, prices, options.solver)
  return LeaderSolution(payment, prices, budgets, value)

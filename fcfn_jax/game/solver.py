"""Generic differentiable follower equilibrium of aggregative budget games (docs/model.md "The game").

Clients choose budgets eps_i in [0, eps_max_i]; client i's utility u_i(eps_i, A) depends on the others only
through the aggregate A = sum_j w_j eps_j. The canonical game is proportional sharing of the payment R,
u_i = R w_i eps_i / A - c_i eps_i; per-client prices pi_i (client i receives R pi_i x_i / sum_j pi_j x_j)
are the same game with aggregation weights pi_i w_i, so prices, weights, R and costs are all ordinary
differentiable inputs.

Equilibrium = fixed point of projected best responses on [0, eps_max]^N, i.e. the KKT point of every
client's problem: F_i(eps) = d u_i / d eps_i (A moving with eps_i) is 0 for interior eps_i, <= 0 at 0 and
>= 0 at eps_max. Simultaneous best-response iteration diverges for many players (its Jacobian has an
eigenvalue near -(N-1)/2 along the all-ones direction), so the solver uses the share-function form
(Cornes & Hartley 2005): for a candidate aggregate A every client's reply consistent with A is the
projected root of F_i(eps_i, A) on [0, eps_max_i] (elementwise), and A solves sum_i w_i eps_i(A) / A = 1,
a scalar equation in log A. One safeguarded Newton/bisection root finder serves both levels under
``lax.while_loop``. Gradients come from the implicit function theorem on the KKT conditions, whose
Jacobian is diagonal plus rank one (d F_i / d eps_j = delta_ij a_i + b_i w_j), solved exactly by
Sherman-Morrison: nothing is differentiated through the loops.

Every function works on one game (arrays of shape [N]) with no Python loop over clients; ``jax.vmap``
them for many games.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax import lax

from fcfn_jax.validate import check_clients, check_positive_array

UtilityFn = Callable[[chex.Array, chex.Array, chex.Array, Any], chex.Array]
"""``utility_fn(eps, aggregate, weights, params) -> u``, all [N] except the pytree ``params``.

Elementwise: u_i may depend only on eps_i, aggregate_i (the aggregate A client i faces) and weights_i,
plus anything in ``params`` (shared or per-client arrays). The solver needs u_i concave in eps_i and
the share sum decreasing in A, as for proportional-share payments.
"""


class SolverOptions(NamedTuple):
  """Root-finder settings, the same at both levels.

  max_iter: iteration cap of each safeguarded Newton/bisection loop.
  tol: relative step tolerance; None = 16 machine epsilons of the game's dtype.
  """

  max_iter: int = 100
  tol: float | None = None


class ShareParams(NamedTuple):
  """Parameters of the proportional-share game: total payment R: [] and per-unit costs c: [N]."""

  payment: chex.Array
  costs: chex.Array


def proportional_share_utility(
  eps: chex.Array, aggregate: chex.Array, weights: chex.Array, params: ShareParams
) -> chex.Array:
  """u_i = R w_i eps_i / A - c_i eps_i: [N] (docs/model.md "Stage II"; w may include prices pi_i w_i)."""
  return params.payment * weights * eps / aggregate - params.costs * eps


def _foc_jvp(utility_fn: UtilityFn, eps, aggregate, weights, params, eps_dot, aggregate_dot):
  """F_i = du_i/deps_i + w_i du_i/dA and its derivative along (eps_dot, aggregate_dot): ([N], [N])."""

  def foc(e, a):
    return jax.jvp(lambda e, a: utility_fn(e, a, weights, params), (e, a), (jnp.ones_like(e), weights))[1]

  return jax.jvp(foc, (eps, aggregate), (eps_dot, aggregate_dot))


def _safeguarded_root(
  fn: Callable, lo: chex.Array, hi: chex.Array, *, max_iter: int, rtol: float, atol: float
):
  """Projected root of a decreasing function on [lo, hi], elementwise: safeguarded Newton/bisection.

  ``fn(t) -> (f, df/dt, aux)`` with f, df elementwise for t shaped like lo and any pytree aux. Returns
  (t*, aux(t*)) with t* = lo where f(lo) <= 0, hi where f(hi) >= 0, else f(t*) = 0 up to a Newton step of
  at most atol + rtol |t*|. Newton steps that leave the bracket or go uphill are replaced by bisection,
  so every iterate stays bracketed.
  """
  t = 0.5 * (lo + hi)
  # One batched call at both ends and the midpoint: each call site of fn is compiled separately.
  evals = jax.vmap(fn)(jnp.stack([lo, hi, t]))
  (f_lo, _, aux_lo), (f_hi, _, aux_hi), (f, df, aux) = (
    jax.tree.map(operator.itemgetter(i), evals) for i in range(3)
  )
  at_lo = f_lo <= 0
  at_hi = ~at_lo & (f_hi >= 0)

  def newton(t, f, df):
    return t - f / jnp.where(df < 0, df, -jnp.inf), df < 0

  def converged(t, f, df, lo, hi):
    step = jnp.abs(newton(t, f, df)[0] - t)
    small = atol + rtol * jnp.abs(t)
    return (f == 0) | (df < 0) & (step <= small) | (hi - lo <= small)

  done = at_lo | at_hi | converged(t, f, df, lo, hi)

  def body(state):
    lo, hi, t, f, df, _, done, it = state
    t_newton, downhill = newton(t, f, df)
    inside = downhill & (t_newton > lo) & (t_newton < hi)
    t_new = jnp.where(done, t, jnp.where(inside, t_newton, 0.5 * (lo + hi)))
    f_new, df_new, aux_new = fn(t_new)
    lo = jnp.where(f_new > 0, t_new, lo)
    hi = jnp.where(f_new < 0, t_new, hi)
    done = done | converged(t_new, f_new, df_new, lo, hi)
    return lo, hi, t_new, f_new, df_new, aux_new, done, it + 1

  def cond(state):
    return jnp.any(~state[6]) & (state[7] < max_iter)

  _, _, t, _, _, aux, _, _ = lax.while_loop(cond, body, (lo, hi, t, f, df, aux, done, 0))

  def pick(at_lo_value, at_hi_value, value):
    return jnp.where(at_lo, at_lo_value, jnp.where(at_hi, at_hi_value, value))

  return pick(lo, hi, t), jax.tree.map(pick, aux_lo, aux_hi, aux)


def _tolerance(options: SolverOptions, dtype) -> float:
  return 16 * float(jnp.finfo(dtype).eps) if options.tol is None else options.tol


def _share_responses(utility_fn: UtilityFn, aggregate, weights, params, eps_max, options):
  """Every client's KKT budget given the aggregate A: (eps(A): [N], d eps / dA: [N])."""
  agg = jnp.full_like(weights, aggregate)
  zeros, ones = jnp.zeros_like(weights), jnp.ones_like(weights)

  def fn(e):
    return *_foc_jvp(utility_fn, e, agg, weights, params, ones, zeros), None

  eps, _ = _safeguarded_root(
    fn, zeros, eps_max, max_iter=options.max_iter, rtol=_tolerance(options, weights.dtype), atol=0.0
  )
  _, a = _foc_jvp(utility_fn, eps, agg, weights, params, ones, zeros)
  _, b = _foc_jvp(utility_fn, eps, agg, weights, params, zeros, ones)
  interior = (eps > 0) & (eps < eps_max)
  return eps, jnp.where(interior, -b / jnp.where(interior, a, -1.0), 0.0)


def _solve(utility_fn: UtilityFn, weights, params, eps_max, options):
  """Share-function equilibrium: eps: [N] with sum_i w_i eps_i(A) = A, A found in log space."""
  tol = _tolerance(options, weights.dtype)
  log_hi = jnp.log(jnp.sum(weights * eps_max))
  # Aggregates below eps^2 of the cap total count as "nobody participates"; the floor keeps 1/A^2 finite.
  log_lo = log_hi + 2 * jnp.log(jnp.finfo(weights.dtype).eps)

  def share_gap(t):
    aggregate = jnp.exp(t)
    eps, deps = _share_responses(utility_fn, aggregate, weights, params, eps_max, options)
    shares = jnp.sum(weights * eps) / aggregate
    return shares - 1.0, jnp.sum(weights * deps) - shares, eps

  return _safeguarded_root(share_gap, log_lo, log_hi, max_iter=options.max_iter, rtol=tol, atol=tol)[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 4))
def _equilibrium(utility_fn, weights, params, eps_max, options):
  return _solve(utility_fn, weights, params, eps_max, options)


@_equilibrium.defjvp
def _equilibrium_jvp(utility_fn, options, primals, tangents):
  """Implicit function theorem on the KKT system r(eps, theta) = 0 at the solution.

  r_i = F_i(eps, theta) for interior clients, eps_i - bound_i(theta) for clients at 0 or eps_max.
  dr/deps = D + u w^T with D = diag(a_i interior, 1 otherwise), u_i = b_i (interior) or 0, where
  a_i = dF_i/deps_i at fixed A and b_i = dF_i/dA; then eps_dot = -(D + u w^T)^{-1} (dr/dtheta theta_dot)
  by Sherman-Morrison. Reverse mode transposes this linear map.
  """
  weights, params, eps_max = primals
  eps = _equilibrium(utility_fn, weights, params, eps_max, options)
  interior = (eps > 0) & (eps < eps_max)
  at_cap = eps >= eps_max

  zeros, ones = jnp.zeros_like(eps), jnp.ones_like(eps)

  def safe_aggregate(weights):
    # All clients out means A = 0, where F may be inf; no row uses F then, but its cotangent would be NaN.
    aggregate = jnp.dot(weights, eps)
    return jnp.full_like(eps, jnp.where(aggregate > 0, aggregate, 1.0))

  def residual(weights, params, eps_max):
    foc, _ = _foc_jvp(utility_fn, eps, safe_aggregate(weights), weights, params, zeros, zeros)
    return jnp.where(interior, foc, eps - jnp.where(at_cap, eps_max, 0.0))

  r_dot = jax.jvp(residual, primals, tangents)[1]
  agg = safe_aggregate(weights)
  _, a = _foc_jvp(utility_fn, eps, agg, weights, params, ones, zeros)
  _, b = _foc_jvp(utility_fn, eps, agg, weights, params, zeros, ones)
  d = jnp.where(interior, a, 1.0)
  u = jnp.where(interior, b, 0.0)
  h = r_dot / d
  u_d = u / d
  eps_dot = -(h - u_d * jnp.dot(weights, h) / (1.0 + jnp.dot(weights, u_d)))
  return eps, eps_dot


def validate_game(weights, eps_max) -> None:
  """Host-side check (skipped under tracing): >= 2 clients, finite weights > 0, finite eps_max > 0."""
  check_clients(weights)
  check_positive_array("eps_max", eps_max)


def solve_equilibrium(
  utility_fn: UtilityFn,
  weights: chex.Array,
  params: Any,
  eps_max: chex.Numeric,
  options: SolverOptions = SolverOptions(),
) -> chex.Array:
  """Follower equilibrium budgets eps*: [N] of an aggregative game with caps (docs/model.md "The game").

  eps* is the fixed point of projected best responses on [0, eps_max]^N of ``utility_fn`` with
  A = sum_j w_j eps_j. Differentiable (forward and reverse mode) in ``weights`` [N], every array in
  ``params`` and ``eps_max`` ([] or [N]) by the implicit function theorem. ``utility_fn`` and ``options``
  are static: pass a module-level function so ``jit`` caches it.

  Raises:
    ConfigError for fewer than 2 clients, non-positive or non-finite weights or eps_max.
  """
  validate_game(weights, eps_max)
  weights = jnp.asarray(weights)
  eps_max = jnp.broadcast_to(jnp.asarray(eps_max, weights.dtype), weights.shape)
  return _equilibrium(utility_fn, weights, params, eps_max, options)


def share_equilibrium(
  payment: chex.Numeric,
  costs: chex.Array,
  weights: chex.Array,
  eps_max: chex.Numeric,
  prices: chex.Array | None = None,
  options: SolverOptions = SolverOptions(),
) -> chex.Array:
  """Budgets eps*: [N] of the (price-weighted) proportional-share game with caps.

  Client i receives R pi_i w_i eps_i / sum_j pi_j w_j eps_j and pays c_i eps_i; pi = 1 is the canonical
  game of docs/model.md "Stage II", which matches ``closed_form_budgets`` when no cap binds.

  Args:
    payment: total payment R >= 0: [].
    costs: per-unit privacy costs c: [N].
    weights: data weights w: [N].
    eps_max: budget caps: [] or [N].
    prices: per-client price weights pi > 0: [N], or None for pi = 1.
    options: root-finder settings.

  Raises:
    ConfigError naming a bad input (fewer than 2 clients, non-positive costs/weights/prices/eps_max,
    negative payment, NaN).
  """
  check_clients(costs, weights)
  check_positive_array("payment", payment, allow_zero=True)
  check_positive_array("prices", prices)
  weights = jnp.asarray(weights)
  if prices is not None:
    weights = weights * prices
  params = ShareParams(jnp.asarray(payment, weights.dtype), jnp.asarray(costs, weights.dtype))
  return solve_equilibrium(proportional_share_utility, weights, params, eps_max, options)


def pseudo_gradient(utility_fn: UtilityFn, eps: chex.Array, weights: chex.Array, params: Any) -> chex.Array:
  """F_i(eps) = d u_i(eps_i, A) / d eps_i with A = sum_j w_j eps_j moving with eps_i: [N]."""
  agg = jnp.full_like(eps, jnp.dot(weights, eps))
  return _foc_jvp(utility_fn, eps, agg, weights, params, jnp.zeros_like(eps), jnp.zeros_like(eps))[0]


def projection_residual(
  utility_fn: UtilityFn,
  eps: chex.Array,
  weights: chex.Array,
  params: Any,
  eps_max: chex.Numeric,
  step: chex.Numeric = 1.0,
) -> chex.Array:
  """eps - clip(eps + step F(eps), 0, eps_max): [N]; zero exactly at an equilibrium (any step > 0)."""
  return eps - jnp.clip(eps + step * pseudo_gradient(utility_fn, eps, weights, params), 0.0, eps_max)


def best_response(
  utility_fn: UtilityFn,
  eps: chex.Array,
  weights: chex.Array,
  params: Any,
  eps_max: chex.Numeric,
  options: SolverOptions = SolverOptions(),
) -> chex.Array:
  """Every client's projected best reply to the others' budgets eps_{-i}: [N].

  BR_i = argmax_{e in [0, eps_max_i]} u_i(e, A_{-i} + w_i e), the projected root of the decreasing
  d/de u_i (u_i concave in its own budget), found elementwise by the same safeguarded root finder.
  Not differentiated implicitly: a diagnostic (eps* = BR(eps*) at an equilibrium).
  """
  eps_max = jnp.broadcast_to(jnp.asarray(eps_max, eps.dtype), eps.shape)
  others = jnp.dot(weights, eps) - weights * eps
  ones = jnp.ones_like(eps)

  def fn(e):
    return *_foc_jvp(utility_fn, e, others + weights * e, weights, params, ones, weights), None

  return _safeguarded_root(
    fn, jnp.zeros_like(eps), eps_max, max_iter=options.max_iter, rtol=_tolerance(options, eps.dtype), atol=0.0
  )[0]


def unilateral_gains(
  utility_fn: UtilityFn, eps: chex.Array, weights: chex.Array, params: Any, grid: chex.Array
) -> chex.Array:
  """Each client's best gain from a unilateral deviation to a budget on ``grid``: [N].

  gain_i = max_g u_i(grid_g, A_{-i} + w_i grid_g) - u_i(eps_i, A); grid: [G] (or [G, N] per client).
  <= 0 (up to round-off) at an equilibrium whenever the grid lies in [0, eps_max].
  """
  total = jnp.dot(weights, eps)
  others = total - weights * eps
  current = utility_fn(eps, jnp.full_like(eps, total), weights, params)

  def deviate(e):
    e = jnp.broadcast_to(e, eps.shape)
    return utility_fn(e, others + weights * e, weights, params)

  return jnp.max(jax.vmap(deviate)(grid), axis=0) - current

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

from fcfn_jax.validate import check_clients, check_positive_array, fail, is_traced

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
  fn: Callable,
  lo: chex.Array,
  hi: chex.Array,
  *,
  max_iter: int,
  rtol: float,
  atol: float,
  polish: bool = False,
):
  """Projected root of a decreasing function on [lo, hi], elementwise: safeguarded Newton/bisection.

  ``fn(t) -> (f, df/dt, aux)`` with f, df elementwise for t shaped like lo and any pytree aux. Returns
  (t*, aux(t*)) with t* = lo where f(lo) <= 0, hi where f(hi) >= 0, else f(t*) = 0 up to a Newton step of
  at most atol + rtol |t*|. With ``polish`` (static) one more step is taken after that, which brings t to
  the rounding floor, and the point with the smallest |f| seen is returned. Newton steps that leave the
  bracket or go uphill are replaced by bisection, so every iterate stays bracketed.
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

  def keep_best(best, t, f, aux):
    better = jnp.abs(f) < jnp.abs(best[1])
    return jax.tree.map(lambda new, old: jnp.where(better, new, old), (t, f, aux), best)

  def body(state):
    lo, hi, t, f, df, aux, done, it, best = state
    last = converged(t, f, df, lo, hi)
    stop = done if polish else done | last  # with polish, a converged element steps once more
    t_newton, downhill = newton(t, f, df)
    inside = downhill & (t_newton > lo) & (t_newton < hi)
    t_new = jnp.where(stop, t, jnp.where(inside, t_newton, 0.5 * (lo + hi)))
    f_new, df_new, aux_new = fn(t_new)
    lo = jnp.where(f_new > 0, t_new, lo)
    hi = jnp.where(f_new < 0, t_new, hi)
    if polish:
      best = keep_best(best, t_new, jnp.where(stop, jnp.inf, f_new), aux_new)
      done = done | last
    else:
      done = done | converged(t_new, f_new, df_new, lo, hi)
    return lo, hi, t_new, f_new, df_new, aux_new, done, it + 1, best

  def cond(state):
    return jnp.any(~state[6]) & (state[7] < max_iter)

  done = at_lo | at_hi | (f == 0) if polish else at_lo | at_hi | converged(t, f, df, lo, hi)
  best = (t, f, aux) if polish else ()
  lo, hi, t, _, _, aux, _, _, best = lax.while_loop(cond, body, (lo, hi, t, f, df, aux, done, 0, best))
  if polish:
    t, _, aux = best

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
  """Share-function equilibrium: (eps: [N] with sum_i w_i eps_i(A) = A, A found in log space, stats: [3]).

  stats = (g, g', max_i |eps_i'(A)| A) at the returned point, g(t) = sum_i w_i eps_i(A) / A - 1 the outer
  equation in t = log A: what :func:`_error_estimate` needs, at no extra solve.
  """
  tol = _tolerance(options, weights.dtype)
  log_hi = jnp.log(jnp.sum(weights * eps_max))
  # Aggregates below eps^2 of the cap total count as "nobody participates"; the floor keeps 1/A^2 finite.
  log_lo = log_hi + 2 * jnp.log(jnp.finfo(weights.dtype).eps)

  def share_gap(t):
    aggregate = jnp.exp(t)
    eps, deps = _share_responses(utility_fn, aggregate, weights, params, eps_max, options)
    shares = jnp.sum(weights * eps) / aggregate
    gap, slope = shares - 1.0, jnp.sum(weights * deps) - shares
    return gap, slope, (eps, jnp.stack([gap, slope, jnp.max(jnp.abs(deps)) * aggregate]))

  return _safeguarded_root(
    share_gap, log_lo, log_hi, max_iter=options.max_iter, rtol=tol, atol=tol, polish=True
  )[1]


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
  eps, stats = _equilibrium(utility_fn, weights, params, eps_max, options)
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
  return (eps, stats), (eps_dot, jnp.zeros_like(stats))


def validate_game(weights, eps_max) -> None:
  """Host-side check (skipped under tracing): >= 2 clients, finite weights > 0, finite eps_max > 0."""
  check_clients(weights)
  check_positive_array("eps_max", eps_max)


# The answer is trusted when its estimated norm-wise relative error (``_error_estimate``) is at most this
# (1e-4, the precision the solver promises): on 6,000 random float32 games with cost ratios up to 1e8
# the estimate was at least 2x the measured error.
TRUSTED_ERROR = 1e-4
# Rounding of one first-order condition and of the share sum, in machine epsilons of the terms' size.
_ROUNDING_ULPS = 8.0


def _error_estimate(utility_fn, weights, params, eps_max, eps, stats) -> chex.Array:
  """Estimated norm-wise relative error max_i |eps_i - eps*_i| / max_i eps*_i of a solution eps: [].

  Two float roundings bound what any solver can reach: (1) client i's first-order condition F_i =
  du_i/deps_i + w_i du_i/dA is a difference of terms of size m_i = |du_i/deps_i| + |w_i du_i/dA|, so its
  root is known to r_i = ulps eps m_i / |dF_i/deps_i| (large for a small client beside a large aggregate);
  (2) the outer equation g(t) = sum_i w_i eps_i(A) / A - 1 = 0, t = log A, carries those errors, its
  own summation rounding and its residual |g| (``stats`` from ``_solve``), so t is known to
  delta = noise / |g'(t)| and each budget to |eps_i'(A)| A delta. Where g is flat on one side of its root
  (one client holds nearly the whole aggregate and the others' costs are 1e6 times larger: g' ~ 1e-7
  there) float32 cannot locate the root and the estimate says so. A zero aggregate (everyone at 0
  although a participant would gain: budgets below eps^2 times the caps) counts as infinitely wrong.
  """
  gap, slope, spread = stats[0], stats[1], stats[2]
  aggregate = jnp.dot(weights, eps)
  agg = jnp.full_like(weights, jnp.where(aggregate > 0, aggregate, 1.0))
  zeros, ones = jnp.zeros_like(weights), jnp.ones_like(weights)
  unit = _ROUNDING_ULPS * jnp.finfo(weights.dtype).eps
  own = jax.jvp(lambda e: utility_fn(e, agg, weights, params), (eps,), (ones,))[1]
  shared = jax.jvp(lambda a: utility_fn(eps, a, weights, params), (agg,), (weights,))[1]
  _, curvature = _foc_jvp(utility_fn, eps, agg, weights, params, ones, zeros)
  interior = (eps > 0) & (eps < eps_max)
  inner = jnp.where(
    interior, unit * (jnp.abs(own) + jnp.abs(shared)) / jnp.where(interior, jnp.abs(curvature), 1.0), 0.0
  )
  noise = jnp.abs(gap) + unit * (2.0 + gap) + jnp.sum(weights * inner) / agg[0]
  delta = noise / jnp.maximum(jnp.abs(slope), jnp.finfo(weights.dtype).tiny)
  scale = jnp.maximum(jnp.max(eps), jnp.finfo(weights.dtype).tiny)
  error = (spread * delta + jnp.max(inner)) / scale
  return jnp.where(aggregate > 0, error, jnp.inf)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _solve_and_check(utility_fn, weights, params, eps_max, options):
  """(eps*: [N], its estimated relative error: []); the error carries no gradient."""
  eps, stats = _equilibrium(utility_fn, weights, params, eps_max, options)
  error = _error_estimate(utility_fn, weights, params, eps_max, lax.stop_gradient(eps), stats)
  return eps, lax.stop_gradient(error)


def _checked_equilibrium(utility_fn, weights, params, eps_max, options, active=True):
  """The equilibrium, never silently wrong (docs/model.md "The game", float precision).

  Traced inputs (inside jit/vmap/grad): NaN budgets where the error estimate exceeds ``TRUSTED_ERROR``
  (a loud failure the caller's host check reports). Concrete float32 inputs: an untrusted answer is
  recomputed in float64 and cast back. Concrete float64 inputs: an untrusted answer raises.
  ``active`` [] masks the check (e.g. off at payment 0, where the answer is exactly 0).
  """
  eps, error = _solve_and_check(utility_fn, weights, params, eps_max, options)
  bad = active & (error > TRUSTED_ERROR)
  leaves = jax.tree.leaves((weights, params, eps_max, active))
  if any(is_traced(leaf) for leaf in leaves):
    return jnp.where(bad, jnp.nan, eps)
  if not bool(bad):
    return eps
  dtype = weights.dtype
  if dtype != jnp.float64:
    with jax.enable_x64(True):
      wide = jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a,
        (weights, params, eps_max),
      )
      eps64, error64 = _solve_and_check(utility_fn, *wide, options)
      if float(error64) <= TRUSTED_ERROR:
        return jnp.asarray(eps64, dtype)
      error = error64
  fail(
    f"the follower equilibrium is ill-conditioned even in float64 (estimated relative error "
    f"{float(error):.3g} > {TRUSTED_ERROR}): expected games whose budgets are not below 1e-16 of the caps "
    "and whose cost ratios stay below ~1e12"
  )


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
  are static: pass a module-level function so ``jit`` caches it. Never silently wrong in low precision:
  see ``_checked_equilibrium`` (NaN under tracing, a float64 re-solve or a ConfigError on the host).

  Raises:
    ConfigError for fewer than 2 clients, non-positive or non-finite weights or eps_max, or a game that
    is ill-conditioned even in float64.
  """
  validate_game(weights, eps_max)
  weights = jnp.asarray(weights)
  eps_max = jnp.broadcast_to(jnp.asarray(eps_max, weights.dtype), weights.shape)
  return _checked_equilibrium(utility_fn, weights, params, eps_max, options)


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
  game of docs/model.md "Stage II", which matches ``closed_form_budgets`` when no cap binds. The game is
  solved in normalized units (it is unchanged by c -> c s / R, R -> 1, eps -> eps / s with s = max
  eps_max, and by any common scale of the weights), so float32 neither underflows on tiny caps nor
  overflows on large payments; the answer is checked as in :func:`solve_equilibrium`.

  Args:
    payment: total payment R >= 0: [].
    costs: per-unit privacy costs c: [N].
    weights: data weights w: [N].
    eps_max: budget caps: [] or [N].
    prices: per-client price weights pi > 0: [N], or None for pi = 1.
    options: root-finder settings.

  Raises:
    ConfigError naming a bad input (fewer than 2 clients, non-positive costs/weights/prices/eps_max,
    negative payment, NaN), or a game ill-conditioned even in float64.
  """
  check_clients(costs, weights)
  check_positive_array("payment", payment, allow_zero=True)
  check_positive_array("prices", prices)
  validate_game(weights, eps_max)
  weights = jnp.asarray(weights)
  if prices is not None:
    weights = weights * prices
  dtype = weights.dtype
  payment = jnp.asarray(payment, dtype)
  eps_max = jnp.broadcast_to(jnp.asarray(eps_max, dtype), weights.shape)
  paid = payment > 0
  scale = jnp.max(eps_max)
  params = ShareParams(jnp.ones((), dtype), jnp.asarray(costs, dtype) * scale / jnp.where(paid, payment, 1.0))
  unit_max = eps_max / scale
  unit = _checked_equilibrium(
    proportional_share_utility, weights / jnp.max(weights), params, unit_max, options, paid
  )
  # A capped client gets exactly eps_max (unit * scale may be an ulp off).
  return jnp.where(paid, jnp.where(unit >= unit_max, eps_max, unit * scale), 0.0)


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

"""Privacy budget epsilon_i <-> DP-SGD noise multiplier z_i (docs/model.md "From epsilon_i to noise").

Client i runs ``steps`` = T * S DP-SGD steps, each the Poisson-subsampled (rate q_i) Gaussian mechanism
with noise multiplier z_i (noise std z_i * clip_norm), and must be (epsilon_i, delta)-DP over the run.

Two views of the same map live side by side:

* Differentiable surrogate (jnp; jit/vmap/grad-safe, for the traced game): the Gaussian mechanism
  without subsampling, composed over k = steps steps in RDP, rdp(alpha) = k alpha / (2 z^2), converted
  with eps = rdp(alpha) + log(1/delta) / (alpha - 1) at the continuous optimal order
  alpha* = 1 + z sqrt(2 log(1/delta) / k):

      eps(z) = k / (2 z^2) + sqrt(2 k log(1/delta)) / z,

  a quadratic in u = 1/z, inverted in closed form. It ignores subsampling amplification, so it upper-
  bounds dp-accounting's epsilon for every practical budget (range in ``surrogate_epsilon``).
* Exact accounting (host side, numpy float64): dp-accounting's RDP accountant (default orders) or PLD
  accountant (pessimistic, value discretization ``PLD_VALUE_DISCRETIZATION``), a per-client ledger, and
  the calibration eps_i -> z_i that inverts them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from dp_accounting import rdp as dp_rdp
from scipy import special

from fcfn_jax.config import ACCOUNTANTS
from fcfn_jax.validate import check_array, check_choice, check_int, check_open_unit, require

# Value discretization of the PLD accountant. Its epsilon is a pessimistic (upper) estimate; at 1e-3 it
# is within 7e-4 (absolute) of dp-accounting's 1e-4 default for q in [0.01, 1], steps <= 1000,
# eps <= 11, at a tenth of the cost (~10-100 ms per evaluation).
PLD_VALUE_DISCRETIZATION = 1e-3

# Noise multipliers the calibration searches; budgets that need z outside this range are rejected.
CALIBRATION_Z_RANGE = (0.05, 1e5)

_MAX_ITERATIONS = 200

_RDP_ORDERS = np.asarray(dp_rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=np.float64)
_INTEGER_ORDERS = np.round(_RDP_ORDERS) == _RDP_ORDERS


# ----------------------------------------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------------------------------------


def _check_epsilons(value: Any) -> None:
  check_array("eps", value, lambda a: np.isfinite(a) & (a >= 0), "finite values >= 0 (0 = stays out)")


def _check_noise_multipliers(value: Any) -> None:
  check_array("noise_multiplier", value, lambda a: a > 0, "values > 0 (inf = releases nothing)")


def _check_sampling_rates(value: Any) -> None:
  check_array("sampling_rate", value, lambda a: (a > 0) & (a <= 1), "values in (0, 1]")


def _check_run(steps: Any, delta: Any, minimum: int = 1) -> int:
  """Validates the run length (Python or numpy integer) and delta; returns steps as a Python int."""
  steps = int(steps) if isinstance(steps, np.integer) else steps
  check_int("steps", steps, minimum=minimum)
  check_open_unit("delta", delta)
  return steps


# ----------------------------------------------------------------------------------------------------------
# Differentiable surrogate.
# ----------------------------------------------------------------------------------------------------------


def _inverse_noise(eps: Any, steps: Any, delta: float) -> jax.Array:
  """u = 1/z solving (k/2) u^2 + b u = eps, b = sqrt(2 k log(1/delta)); k may be an array."""
  b = jnp.sqrt(2.0 * steps * math.log(1.0 / delta))
  # The root (-b + sqrt(b^2 + 2 k eps)) / k, rewritten to avoid cancellation when k eps << b^2.
  return 2.0 * eps / (b + jnp.sqrt(b * b + 2.0 * steps * eps))


def _surrogate_inverse(eps: chex.Array, steps: int, delta: float) -> tuple[jax.Array, jax.Array]:
  """(eps > 0, u) with u = 1/z(eps) where eps > 0 and u = 1/z(1) elsewhere (the double-where branch)."""
  steps = _check_run(steps, delta)
  _check_epsilons(eps)
  eps = jnp.asarray(eps)
  eps = eps.astype(jnp.result_type(eps.dtype, float))
  live = eps > 0
  return live, _inverse_noise(jnp.where(live, eps, 1.0), steps, delta)


def surrogate_epsilon(noise_multiplier: chex.Array, steps: int, delta: float) -> chex.Array:
  """Surrogate epsilon of ``steps`` unsubsampled Gaussian steps: eps = k/(2 z^2) + sqrt(2 k log(1/delta))/z.

  Elementwise over z: [...] (z = inf gives 0). Optimal-order Gaussian RDP with the basic RDP -> DP
  conversion (docs/model.md "From epsilon_i to noise"). Conservative: never below dp-accounting's RDP or
  PLD epsilon, at any sampling rate, for surrogate budgets in [0.02, 220] and delta in [1e-9, 0.5]
  (at q = 1 the comparison depends only on delta and the optimal order alpha* = 1 + z sqrt(2 log(1/delta)
  / k), checked exhaustively; q < 1 by randomized tests). Outside, the RDP accountant's discrete orders
  lose to the continuous optimum: for budgets above ~220-600 (alpha* < ~1.25, where the grid 1.1, 1.2,
  ... is coarse) its epsilon can be a few percent larger, e.g. 2311.8 vs 2303.5 at q = 1, k = 1000,
  z = 0.5, delta = 1e-5; below ~0.01-0.03 (delta <= 1e-7, alpha* > 1024) its largest order sets a floor.

  Args:
    noise_multiplier: z > 0, [...].
    steps: k = T * S >= 1 (static).
    delta: in (0, 1) (static).
  """
  steps = _check_run(steps, delta)
  _check_noise_multipliers(noise_multiplier)
  z = jnp.asarray(noise_multiplier)
  u = 1.0 / z.astype(jnp.result_type(z.dtype, float))
  return 0.5 * steps * u * u + math.sqrt(2.0 * steps * math.log(1.0 / delta)) * u


def surrogate_noise_multiplier(eps: chex.Array, steps: int, delta: float) -> chex.Array:
  """Closed-form inverse of ``surrogate_epsilon``: z = 1/u, u = 2 eps / (b + sqrt(b^2 + 2 k eps)).

  Elementwise over eps: [...], b = sqrt(2 k log(1/delta)). eps = 0 (the client stays out) gives z = inf
  with gradient 0 (double-where: no NaN from 1/0); for eps > 0, dz/deps = -z^2 du/deps is finite.
  """
  live, u = _surrogate_inverse(eps, steps, delta)
  return jnp.where(live, 1.0 / u, jnp.inf)


def noise_variance(eps: chex.Array, steps: int, delta: float) -> chex.Array:
  """v(eps) = z(eps)^2 = 1/u^2: the surrogate's noise variance per unit sensitivity, elementwise [...].

  The v of the DP-aware quality G = -sum_i a_i^2 v(eps_i) (docs/model.md "Stage I"). v(0) = inf with
  gradient 0; mask non-participants with ``jnp.where``, not by multiplying (0 * inf = nan).
  """
  live, u = _surrogate_inverse(eps, steps, delta)
  return jnp.where(live, 1.0 / jnp.square(u), jnp.inf)


# ----------------------------------------------------------------------------------------------------------
# Exact accounting (dp-accounting).
# ----------------------------------------------------------------------------------------------------------


def dp_sgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
  """``steps`` compositions of the Poisson-subsampled (rate q) Gaussian mechanism with multiplier z.

  q = 1 is the plain Gaussian mechanism, whose composition the PLD accountant then forms in closed form.
  """
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
  step = gaussian if sampling_rate == 1 else dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
  return dp_accounting.SelfComposedDpEvent(step, steps)


def accountant_epsilon(
  noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
  """Epsilon at ``delta`` of DP-SGD (``dp_sgd_event``) by dp-accounting's RDP or PLD accountant.

  'rdp': RdpAccountant with dp-accounting's default orders.
  'pld': PLDAccountant, pessimistic estimate at value discretization ``PLD_VALUE_DISCRETIZATION``.
  z = inf releases nothing (eps = 0).
  """
  check_choice("accountant", accountant, ACCOUNTANTS)
  steps = _check_run(steps, delta, minimum=0)
  _check_noise_multipliers(noise_multiplier)
  _check_sampling_rates(sampling_rate)
  if math.isinf(noise_multiplier) or steps == 0:
    return 0.0
  acc = (
    dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    if accountant == "pld"
    else dp_rdp.RdpAccountant()
  )
  acc.compose(dp_sgd_event(float(noise_multiplier), float(sampling_rate), steps))
  return float(acc.get_epsilon(delta))


def _amplified_steps(sampling_rate: np.ndarray | float, steps: int) -> np.ndarray | float:
  """Steps of an unsubsampled Gaussian with about the same RDP: rdp ~ 2 q^2 alpha / z^2 for small q."""
  return steps * np.minimum(1.0, 4.0 * np.square(sampling_rate))


def _gaussian_optimal_order(z: float, sampling_rate: float, steps: int, delta: float) -> float:
  """alpha* = 1 + z sqrt(2 log(1/delta) / k): the surrogate's optimal order at the amplified k."""
  return 1.0 + z * math.sqrt(2.0 * math.log(1.0 / delta) / _amplified_steps(sampling_rate, steps))


class _EpsilonCurve:
  """z -> ``accountant_epsilon(z, q, steps, delta, accountant)`` for many z at one (q, steps, delta).

  For 'rdp' only the orders that can attain the accountant's minimum are evaluated, so the value equals
  the full accountant's at a fraction of the cost. Per order a, dp-accounting reports
  eps_a = R_a + c_a, R_a = steps * rdp_a(q, z), c_a = log(1 - 1/a) - log(delta a) / (a - 1), and takes
  the minimum. At integer orders R_a is the exact Renyi divergence; the true one is nondecreasing in a
  and g(a) = (a - 1) R_a is convex (a log-moment-generating function). So for an unevaluated order a,
  the evaluated integer order below a and the chords through the two nearest evaluated integer orders
  on either side of a, extended to a, bound R_a from below. dp-accounting's fractional orders are no
  anchors: they overestimate the divergence (by 2.1x at q = 0.2, z = 3, alpha = 1.5, checked by
  quadrature), which breaks convexity but keeps the bounds valid. Orders are evaluated, most promising
  first, until every other order's bound exceeds the minimum found. The accountant's KL branch
  (eps_a = 0 when R_a < -log(1 - delta^2)) cannot fire when Pinsker's bound
  R_a >= KL >= 2 steps (q (2 Phi(1/(2z)) - 1))^2 exceeds that floor; otherwise the full accountant runs.
  """

  def __init__(self, sampling_rate: float, steps: int, delta: float, accountant: str):
    self._q, self._steps, self._delta, self._accountant = sampling_rate, steps, delta, accountant
    self._c = np.log1p(-1.0 / _RDP_ORDERS) - np.log(delta * _RDP_ORDERS) / (_RDP_ORDERS - 1.0)
    self._kl_floor = -math.log1p(-delta * delta)
    self._optimum = None  # Index of the last optimal order: the next search starts there.

  def _lower_bounds(self, rdp: np.ndarray) -> np.ndarray:
    """Lower bound of eps_a for each order with unknown (nan) R_a; inf for the evaluated ones."""
    a = _RDP_ORDERS
    known = np.flatnonzero(np.isfinite(rdp) & _INTEGER_ORDERS)
    g = (a - 1.0) * rdp
    below = np.searchsorted(known, np.arange(len(a)))  # anchors below each order.
    r = np.zeros(len(a))
    some = below >= 1
    r[some] = rdp[known[below[some] - 1]]
    if known.size >= 2:
      slope = np.diff(g[known]) / np.diff(a[known])
      # Chords of the two anchors just below (extended up) and of the two just above (extended down).
      for side, chord_at, anchor in (
        (below >= 2, below - 2, below - 1),
        (below <= known.size - 2, below, below),
      ):
        b = known[anchor[side]]
        chord = g[b] + slope[chord_at[side]] * (a[side] - a[b])
        r[side] = np.maximum(r[side], chord / (a[side] - 1.0))
    return np.where(np.isnan(rdp), r + self._c, np.inf)

  def __call__(self, noise_multiplier: float) -> float:
    z, q, steps, delta = noise_multiplier, self._q, self._steps, self._delta
    pinsker = 2.0 * steps * (q * (2.0 * special.ndtr(0.5 / z) - 1.0)) ** 2
    if self._accountant == "pld" or pinsker < self._kl_floor:
      return accountant_epsilon(z, q, steps, delta, self._accountant)
    if self._optimum is None:
      self._optimum = int(np.searchsorted(_RDP_ORDERS, _gaussian_optimal_order(z, q, steps, delta)))
    event = dp_sgd_event(z, q, steps)
    rdp = np.full(_RDP_ORDERS.shape, np.nan)
    # Start at the last optimum with two integer orders on either side as anchors.
    anchors = np.flatnonzero(_INTEGER_ORDERS)
    k = np.searchsorted(anchors, self._optimum)
    todo = np.union1d(
      np.arange(max(self._optimum - 1, 0), min(self._optimum + 2, len(_RDP_ORDERS))),
      anchors[max(k - 2, 0) : k + 2],
    )
    grow = 2
    while todo.size:
      acc = dp_rdp.RdpAccountant(_RDP_ORDERS[todo])
      acc.compose(event)
      rdp[todo] = acc.rdp
      done = ~np.isnan(rdp)
      eps, order = dp_rdp.compute_epsilon(_RDP_ORDERS[done], rdp[done], delta)
      bound = self._lower_bounds(rdp)
      todo = np.sort(np.argsort(bound)[:grow])
      todo, grow = todo[bound[todo] < eps], 2 * grow
    self._optimum = int(np.searchsorted(_RDP_ORDERS, order))
    return float(eps)


def _client_arrays(**arrays: Any) -> dict[str, np.ndarray]:
  """Broadcasts per-client inputs (scalars or [N]) to one 1-D shape [N]."""
  shapes = {name: np.shape(a) for name, a in arrays.items()}
  require(
    all(len(s) <= 1 for s in shapes.values()),
    f"per-client inputs must be scalars or 1-D [N]; got shapes {shapes}",
  )
  try:
    out = np.broadcast_arrays(*(np.asarray(a) for a in arrays.values()))
  except ValueError:
    require(False, f"per-client inputs must share one length N; got shapes {shapes}")
  return {name: np.atleast_1d(a) for name, a in zip(arrays, out)}


def epsilon_spent(
  noise_multipliers: chex.ArrayNumpy,
  sampling_rates: chex.ArrayNumpy | float,
  steps_done: chex.ArrayNumpy | int,
  delta: float,
  accountant: str = "rdp",
) -> np.ndarray:
  """Per-client privacy ledger: ``accountant_epsilon(z_i, q_i, t_i, delta)`` for every client, [N].

  Args:
    noise_multipliers: z: [N] (inf = released nothing).
    sampling_rates: q: [N] or scalar, in (0, 1].
    steps_done: t: [N] or scalar, DP-SGD steps taken so far (>= 0).
    delta: target delta in (0, 1).
    accountant: 'rdp' (equal to the full accountant, cheap per client) or 'pld' (one PLD per client).

  Returns:
    eps: [N] float64; 0 where z = inf or t = 0.
  """
  check_choice("accountant", accountant, ACCOUNTANTS)
  check_open_unit("delta", delta)
  _check_noise_multipliers(noise_multipliers)
  _check_sampling_rates(sampling_rates)
  steps_arr = np.asarray(steps_done)
  require(steps_arr.dtype.kind in "iu", f"steps_done has dtype {steps_arr.dtype}: expected integers")
  check_array("steps_done", steps_arr, lambda a: a >= 0, "integers >= 0")
  cols = _client_arrays(z=noise_multipliers, q=sampling_rates, t=steps_arr)
  z, q, t = cols["z"].astype(np.float64), cols["q"].astype(np.float64), cols["t"].astype(np.int64)
  eps = np.zeros(z.shape)
  live = np.isfinite(z) & (t > 0)
  keys, inverse = np.unique(np.stack([q[live], t[live], z[live]], axis=1), axis=0, return_inverse=True)
  values = np.empty(len(keys))
  curve, curve_key = None, None
  for j, (qj, tj, zj) in enumerate(keys):  # Sorted by (q, t, z): each search starts near the last.
    if curve_key != (qj, tj):
      curve, curve_key = _EpsilonCurve(float(qj), int(tj), delta, accountant), (qj, tj)
    values[j] = curve(float(zj))
  eps[live] = values[inverse.reshape(-1)]
  return eps


# ----------------------------------------------------------------------------------------------------------
# Calibration: eps_i -> z_i.
# ----------------------------------------------------------------------------------------------------------


def _invert_curve(
  curve: _EpsilonCurve,
  target: float,
  start: int,
  slope: float,
  grid: float,
  rtol: float,
  memo: dict[int, float],
  describe: Callable[[], str],
) -> tuple[int, float]:
  """Lattice index n with eps(z_n) <= target, z_n = exp(n * grid), and tight; plus the last slope.

  Returns as soon as target (1 - rtol) <= eps(z_n) <= target, or when eps(z_{n-1}) > target (z_n is then
  within one lattice step of the smallest admissible z). Secant steps in (log z, log eps), starting
  from ``slope`` = d log(eps) / d log(z), aim at target (1 - rtol/2); one-sided steps double until the
  target is bracketed; after a few bracketed secant steps, bisection. ``memo`` caches eps by lattice
  index and is shared by the targets of one curve.
  """
  n_min, n_max = (math.ceil(math.log(z) / grid) for z in CALIBRATION_Z_RANGE)
  goal = math.log(target) + math.log1p(-rtol / 2)
  lo = hi = None  # largest index with eps > target, smallest with eps <= target.
  slope, prev, leap, secants = slope * grid, None, 1, 4
  n = min(max(start, n_min), n_max)
  for _ in range(_MAX_ITERATIONS):
    if n not in memo:
      memo[n] = curve(math.exp(n * grid))
    eps = memo[n]
    if eps <= target:
      if eps >= target * (1.0 - rtol):
        return n, slope / grid
      hi = n if hi is None else min(hi, n)
    else:
      lo = n if lo is None else max(lo, n)
    if lo is not None and hi is not None and hi - lo <= 1:
      return hi, slope / grid
    if 0 < eps < math.inf:
      y = math.log(eps)
      if prev is not None and prev[0] != n and (y - prev[1]) / (n - prev[0]) < 0:
        slope = (y - prev[1]) / (n - prev[0])
      prev, step = (n, y), (goal - y) / slope
    else:
      step = leap if eps > target else -leap
    nxt = n + int(math.copysign(max(abs(round(step)), 1), step))
    if lo is not None and hi is not None:
      nxt, secants = (nxt if secants and lo < nxt < hi else (lo + hi) // 2), max(secants - 1, 0)
    elif hi is not None:
      nxt, leap = min(nxt, hi - leap), 2 * leap
    else:
      nxt, leap = max(nxt, lo + leap), 2 * leap
    nxt = min(max(nxt, n_min), n_max)
    require(
      nxt != n,
      f"{describe()} needs a noise multiplier outside {CALIBRATION_Z_RANGE}: "
      f"accountant epsilon at z={math.exp(n * grid):.6g} is {eps!r}",
    )
    n = nxt
  raise RuntimeError(f"calibration did not converge for {describe()}")


def _solve_sorted(
  q: np.ndarray,
  eps: np.ndarray,
  guess: np.ndarray,
  steps: int,
  delta: float,
  accountant: str,
  rtol: float,
  describe: Callable[[int], str],
) -> np.ndarray:
  """Noise multipliers for targets sorted by (q ascending, eps descending), from log-z guesses: [M].

  One curve (and evaluation cache) per sampling rate. Each search starts with a secant step from the
  previous solution on the same curve, else at the guess shifted by the previous (solution - guess).
  """
  grid = math.log1p(rtol / 4)
  out = np.empty(len(eps))
  offset, slope, curve, memo, n = 0.0, -1.5, None, {}, None
  for j in range(len(eps)):
    target = float(eps[j])
    if curve is None or q[j] != q[j - 1]:
      curve, memo = _EpsilonCurve(float(q[j]), steps, delta, accountant), {}
    if not memo or not 0 < memo[n] < math.inf:
      start = (guess[j] + offset) / grid
    else:
      start = n + (math.log(target) + math.log1p(-rtol / 2) - math.log(memo[n])) / (slope * grid)
    n, slope = _invert_curve(
      curve, target, round(start), slope, grid, rtol, memo, functools.partial(describe, j)
    )
    out[j] = math.exp(n * grid)
    offset = n * grid - guess[j]
  return out


def calibrate_noise_multipliers(
  eps: chex.ArrayNumpy,
  sampling_rates: chex.ArrayNumpy | float,
  steps: int,
  delta: float,
  accountant: str = "rdp",
  rtol: float = 1e-3,
) -> np.ndarray:
  """Smallest noise multipliers z_i whose accountant epsilon is <= eps_i, up to ``rtol``: [N].

  Guarantees, for every client with eps_i > 0, by direct evaluation of the accountant at the returned
  z_i (exact for 'rdp', the pessimistic PLD estimate for 'pld'):
    accountant_epsilon(z_i) <= eps_i, and
    accountant_epsilon(z_i) >= eps_i (1 - rtol), unless z_i / (1 + rtol/4) already exceeds eps_i
    (where the accountant's epsilon jumps or is flat; z_i is then within rtol/4 of the smallest z).
  z_i lies on the lattice exp(n log(1 + rtol/4)); eps_i = 0 gives z_i = inf.

  Clients with equal (q_i, eps_i) are solved once; the rest per sampling rate in order of decreasing
  eps_i by a secant search warm-started from the previous solution. Initial guesses: for 'rdp' the
  surrogate with the small-q amplification rdp ~ 2 q^2 alpha / z^2 folded into the step count; for
  'pld' the RDP calibration (cheap: only orders near the optimum are evaluated). Cost: about one to
  three accountant evaluations per distinct (q_i, eps_i), a few ms each for 'rdp', ~0.1 s for 'pld'.

  Args:
    eps: target budgets: [N], finite, >= 0.
    sampling_rates: q: [N] or scalar, in (0, 1].
    steps: DP-SGD steps of the whole run, T * S >= 1.
    delta: target delta in (0, 1).
    accountant: 'rdp' or 'pld'.
    rtol: relative tolerance on epsilon, in (0, 1).

  Returns:
    z: [N] float64.

  Raises:
    ConfigError for invalid inputs or a budget that needs z outside ``CALIBRATION_Z_RANGE``.
  """
  check_choice("accountant", accountant, ACCOUNTANTS)
  steps = _check_run(steps, delta)
  check_open_unit("rtol", rtol)
  _check_epsilons(eps)
  _check_sampling_rates(sampling_rates)
  cols = _client_arrays(eps=eps, q=sampling_rates)
  e, q = cols["eps"].astype(np.float64), cols["q"].astype(np.float64)
  z = np.full(e.shape, np.inf)
  live = np.flatnonzero(e > 0)
  if not live.size:
    return z
  keys, first, inverse = np.unique(
    np.stack([q[live], -e[live]], axis=1), axis=0, return_index=True, return_inverse=True
  )
  q_keys, e_keys = keys[:, 0], -keys[:, 1]

  def describe(name: str) -> Callable[[int], str]:
    def message(j: int) -> str:
      i = int(live[first[j]])
      return (
        f"eps[{i}]={float(e[i])!r} (sampling_rate={float(q[i])!r}, steps={steps}, delta={delta}, "
        f"accountant={name!r})"
      )

    return message

  guess = -np.log(np.asarray(_inverse_noise(e_keys, _amplified_steps(q_keys, steps), delta), np.float64))
  # Budgets that overflow the surrogate (NaN) need the smallest z; the search clamps to the range anyway.
  log_range = np.log(CALIBRATION_Z_RANGE)
  guess = np.clip(np.nan_to_num(guess, nan=log_range[0]), *log_range)
  solution = _solve_sorted(q_keys, e_keys, guess, steps, delta, "rdp", rtol, describe("rdp"))
  if accountant == "pld":
    solution = _solve_sorted(q_keys, e_keys, np.log(solution), steps, delta, "pld", rtol, describe("pld"))
  z[live] = solution[inverse.reshape(-1)]
  return z

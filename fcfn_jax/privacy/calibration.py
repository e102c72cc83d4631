"""Host calibration eps_i -> z_i: the smallest noise multipliers the ledger certifies (numpy float64).

docs/model.md "From epsilon_i to noise". :func:`calibrate_noise_multipliers` inverts privacy/ledger.py's
accountant epsilon of :func:`events.dp_event` (RDP or PLD, truncation charge included) per distinct
(n_i, eps_i), by a secant search on a lattice of z warm-started from the surrogate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import chex
import numpy as np

from fcfn_jax.config import ACCOUNTANTS
from fcfn_jax.privacy.events import (
  MAX_ITERATIONS,
  Sampler,
  charged_delta,
  check_epsilons,
  check_examples,
  check_run,
  check_sampler,
  dp_event,
  sampling_rates,
)
from fcfn_jax.privacy.ledger import EpsilonCurve, client_arrays
from fcfn_jax.privacy.surrogate import amplified_steps, inverse_noise
from fcfn_jax.validate import check_choice, check_open_unit, require

# Noise multipliers the calibration searches (host and traced); budgets that need z outside are rejected.
CALIBRATION_Z_RANGE = (0.05, 1e5)


def _invert_curve(
  curve: Callable[[float], float],
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
  index and is shared by the targets of one curve at one delta.
  """
  n_min, n_max = (math.ceil(math.log(z) / grid) for z in CALIBRATION_Z_RANGE)
  goal = math.log(target) + math.log1p(-rtol / 2)
  lo = hi = None  # largest index with eps > target, smallest with eps <= target.
  slope, prev, leap, secants = slope * grid, None, 1, 4
  n = min(max(start, n_min), n_max)
  for _ in range(MAX_ITERATIONS):
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
  n: np.ndarray,
  eps: np.ndarray,
  guess: np.ndarray,
  steps: int,
  delta: float,
  sampler: Sampler,
  accountant: str,
  rtol: float,
  describe: Callable[[int], str],
) -> np.ndarray:
  """Noise multipliers for targets sorted by (n ascending, eps descending), from log-z guesses: [M].

  One curve per dataset size n; target eps_j is met at delta_j = delta - (1 + e^eps_j) p_n (delta itself
  unless the accountant pays a truncation charge), with an evaluation cache per (curve, delta_j). Each
  search starts with a secant step from the previous solution on the same cache, else at the guess
  shifted by the previous (solution - guess).
  """
  grid = math.log1p(rtol / 4)
  out = np.empty(len(eps))
  offset, slope, curve, memos, memo, n_lat = 0.0, -1.5, None, {}, {}, None
  for j in range(len(eps)):
    target = float(eps[j])
    if curve is None or n[j] != n[j - 1]:
      size = int(n[j])
      curve, memos = EpsilonCurve(size, steps, sampler, accountant), {}
      overflow = dp_event(1.0, size, steps, sampler, accountant).overflow
    target_delta = charged_delta(target, delta, overflow)
    require(
      target_delta > 0,
      f"{describe(j)} cannot be certified at batch_capacity={sampler.capacity}: the truncation charge "
      f"(1 + e^eps) P[some step overflows] = (1 + e^eps) {overflow:.3g} exceeds delta; raise "
      "batch_capacity or use accountant='pld'",
    )
    previous, memo = memo, memos.setdefault(target_delta, {})
    if memo is not previous or not memo or not 0 < memo[n_lat] < math.inf:
      start = (guess[j] + offset) / grid
    else:
      start = n_lat + (math.log(target) + math.log1p(-rtol / 2) - math.log(memo[n_lat])) / (slope * grid)
    n_lat, slope = _invert_curve(
      functools.partial(curve, delta=target_delta),
      target,
      round(start),
      slope,
      grid,
      rtol,
      memo,
      functools.partial(describe, j),
    )
    out[j] = math.exp(n_lat * grid)
    offset = n_lat * grid - guess[j]
  return out


def calibrate_noise_multipliers(
  eps: chex.ArrayNumpy,
  num_examples: chex.ArrayNumpy | int,
  steps: int,
  delta: float,
  sampler: Sampler,
  accountant: str = "rdp",
  rtol: float = 1e-3,
) -> np.ndarray:
  """Smallest noise multipliers z_i whose accountant epsilon is <= eps_i, up to ``rtol``: [N].

  Guarantees, for every client with eps_i > 0, by direct evaluation of ``accountant_epsilon`` (the
  accountant of :func:`dp_event`, truncation charge included) at the returned z_i:
    accountant_epsilon(z_i) <= eps_i, and
    accountant_epsilon(z_i) >= eps_i (1 - rtol), unless z_i / (1 + rtol/4) already exceeds eps_i
    (where the accountant's epsilon jumps or is flat; z_i is then within rtol/4 of the smallest z).
  With a truncation charge the search meets eps_i at delta - (1 + e^eps_i) p_i, which is what makes the
  charged epsilon <= eps_i. z_i lies on the lattice exp(n log(1 + rtol/4)); eps_i = 0 gives z_i = inf.

  Clients with equal (n_i, eps_i) are solved once; the rest per dataset size in order of decreasing
  eps_i by a secant search warm-started from the previous solution. Initial guesses: the surrogate with
  the small-q amplification rdp ~ 2 q^2 alpha / z^2 folded into the step count (twice that z for
  'fixed'); for 'pld' the RDP calibration of the untruncated Poisson event. Cost per distinct (n_i,
  eps_i): one to three accountant evaluations, a few ms each for 'rdp' with 'poisson', ~0.6 s for 'rdp'
  with 'fixed' (dp-accounting's without-replacement bound at all orders), ~0.1-0.8 s for 'pld'.

  Args:
    eps: target budgets: [N], finite, >= 0.
    num_examples: n: [N] or scalar, the clients' public dataset sizes (>= 1); q_i = min(1, B / n_i).
    steps: DP-SGD steps of the whole run, T * S >= 1.
    delta: target delta in (0, 1).
    sampler: the round's :class:`Sampler`.
    accountant: 'rdp' or 'pld' ('pld' needs 'poisson').
    rtol: relative tolerance on epsilon, in (0, 1).

  Returns:
    z: [N] float64.

  Raises:
    ConfigError for invalid inputs, a budget that needs z outside ``CALIBRATION_Z_RANGE``, or one the
    truncation charge makes uncertifiable.
  """
  check_choice("accountant", accountant, ACCOUNTANTS)
  steps = check_run(steps, delta)
  check_open_unit("rtol", rtol)
  check_sampler(sampler)
  check_epsilons(eps)
  check_examples(num_examples)
  cols = client_arrays(eps=eps, n=num_examples)
  e, n = cols["eps"].astype(np.float64), cols["n"].astype(np.int64)
  z = np.full(e.shape, np.inf)
  live = np.flatnonzero(e > 0)
  if not live.size:
    return z
  keys, first, inverse = np.unique(
    np.stack([n[live], -e[live]], axis=1), axis=0, return_index=True, return_inverse=True
  )
  n_keys, e_keys = keys[:, 0].astype(np.int64), -keys[:, 1]

  def describe(name: str) -> Callable[[int], str]:
    def message(j: int) -> str:
      i = int(live[first[j]])
      return (
        f"eps[{i}]={float(e[i])!r} (num_examples={int(n[i])}, sampler={sampler.kind!r}, steps={steps}, "
        f"delta={delta}, accountant={name!r})"
      )

    return message

  q_keys = sampling_rates(n_keys, sampler.batch_size)
  guess = -np.log(
    np.asarray(inverse_noise(e_keys, amplified_steps(q_keys, steps), math.log(1.0 / delta)), np.float64)
  )
  if sampler.kind == "fixed":  # dp-accounting's Gaussian multiplier is z / 2 (sensitivity 2C)
    guess += math.log(2.0)
  # Budgets that overflow the surrogate (NaN) need the smallest z; the search clamps to the range anyway.
  log_range = np.log(CALIBRATION_Z_RANGE)
  guess = np.clip(np.nan_to_num(guess, nan=log_range[0]), *log_range)
  if accountant == "pld":  # Warm start from the untruncated event's RDP calibration (cheap).
    untruncated = sampler._replace(capacity=max(sampler.capacity, int(n_keys.max()) + 1))
    rdp = _solve_sorted(n_keys, e_keys, guess, steps, delta, untruncated, "rdp", rtol, describe("rdp"))
    guess = np.log(rdp)
  solution = _solve_sorted(
    n_keys, e_keys, guess, steps, delta, sampler, accountant, rtol, describe(accountant)
  )
  z[live] = solution[inverse.reshape(-1)]
  return z

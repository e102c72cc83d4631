"""The per-client privacy ledger: dp-accounting's epsilon of :func:`events.dp_event`, host side (float64).

docs/model.md "From epsilon_i to noise". dp-accounting's RDP accountant (default orders) or PLD accountant
(pessimistic, value discretization ``PLD_VALUE_DISCRETIZATION``) of the event the sampler releases, the
truncation charge included (:func:`events.with_charge`): :func:`accountant_epsilon` for one client,
:func:`epsilon_spent` for all, with :class:`EpsilonCurve` evaluating only the RDP orders that can attain
the minimum. privacy/calibration.py inverts it.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any

import chex
import dp_accounting
import numpy as np
from dp_accounting import rdp as dp_rdp
from scipy import special

from fcfn_jax.config import ACCOUNTANTS
from fcfn_jax.privacy.events import (
  Sampler,
  check_examples,
  check_noise_multipliers,
  check_run,
  check_sampler,
  dp_event,
  sampling_rates,
  with_charge,
)
from fcfn_jax.privacy.surrogate import amplified_steps
from fcfn_jax.validate import check_array, check_choice, check_open_unit, fail, require

# Value discretization of the PLD accountant. Its epsilon is a pessimistic (upper) estimate; at 1e-3 it
# is within 7e-4 (absolute) of dp-accounting's 1e-4 default for q in [0.01, 1], steps <= 1000,
# eps <= 11, at a tenth of the cost (~10-100 ms per evaluation; ~0.2-0.8 s with truncation).
PLD_VALUE_DISCRETIZATION = 1e-3

_RDP_ORDERS = np.asarray(dp_rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=np.float64)
_INTEGER_ORDERS = np.round(_RDP_ORDERS) == _RDP_ORDERS


def _make_accountant(accountant: str, relation: dp_accounting.NeighboringRelation):
  if accountant == "pld":
    return dp_accounting.pld.PLDAccountant(
      neighboring_relation=relation, value_discretization_interval=PLD_VALUE_DISCRETIZATION
    )
  return dp_rdp.RdpAccountant(neighboring_relation=relation)


def accountant_epsilon(
  noise_multiplier: float,
  num_examples: int,
  steps: int,
  delta: float,
  sampler: Sampler,
  accountant: str = "rdp",
) -> float:
  """Epsilon at ``delta`` of :func:`dp_event` by dp-accounting's RDP or PLD accountant, charge included.

  'rdp': RdpAccountant with dp-accounting's default orders. 'pld': PLDAccountant, pessimistic estimate at
  value discretization ``PLD_VALUE_DISCRETIZATION``. z = inf or steps = 0 releases nothing (eps = 0).
  """
  check_choice("accountant", accountant, ACCOUNTANTS)
  steps = check_run(steps, delta, minimum=0)
  check_noise_multipliers(noise_multiplier)
  check_examples(num_examples)
  client = dp_event(noise_multiplier, num_examples, steps, sampler, accountant)
  if isinstance(client.event, dp_accounting.NoOpDpEvent):
    return 0.0
  acc = _make_accountant(accountant, client.relation)
  acc.compose(client.event)
  return float(with_charge(acc.get_epsilon, delta, client.overflow))


def _gaussian_optimal_order(z: float, sampling_rate: float, steps: int, delta: float) -> float:
  """alpha* = 1 + z sqrt(2 log(1/delta) / k): the surrogate's optimal order at the amplified k."""
  return 1.0 + z * math.sqrt(2.0 * math.log(1.0 / delta) / amplified_steps(sampling_rate, steps))


class EpsilonCurve:
  """(z, delta) -> epsilon of ``dp_event(z, n, steps, sampler, accountant)`` before any truncation charge.

  For the RDP accountant of the untruncated Poisson event only the orders that can attain the
  accountant's minimum are evaluated, so the value equals the full accountant's at a fraction of the
  cost. Per order a, dp-accounting reports eps_a = R_a + c_a, R_a = steps * rdp_a(q, z),
  c_a = log(1 - 1/a) - log(delta a) / (a - 1), and takes the minimum. At integer orders R_a is the exact
  Renyi divergence; the true one is nondecreasing in a and g(a) = (a - 1) R_a is convex (a log-moment-
  generating function). So for an unevaluated order a, the evaluated integer order below a and the chords
  through the two nearest evaluated integer orders on either side of a, extended to a, bound R_a from
  below. dp-accounting's fractional orders are no anchors: they overestimate the divergence (by 2.1x at
  q = 0.2, z = 3, alpha = 1.5, checked by quadrature), which breaks convexity but keeps the bounds valid.
  Orders are evaluated, most promising first, until every other order's bound exceeds the minimum found.
  The accountant's KL branch (eps_a = 0 when R_a < -log(1 - delta^2)) cannot fire when Pinsker's bound
  R_a >= KL >= 2 steps (q (2 Phi(1/(2z)) - 1))^2 exceeds that floor; otherwise the full accountant runs,
  as it always does for PLD and for the fixed sampler's bound (which is no exact divergence).

  R_a does not depend on delta: the curve memoizes the evaluated R_a of the last ``MEMO_SIZE`` noise
  multipliers (NaN = not evaluated), and a call at a known z (another delta, as in the truncation
  charge's fixed point, :func:`events.with_charge`) starts from them and composes only the orders whose
  bound is still below their minimum. The search still stops only when every unevaluated order's lower
  bound exceeds the minimum found, so the value is the same.
  """

  MEMO_SIZE = 64  # noise multipliers whose R_a the curve keeps (one float64 per default order each).

  def __init__(self, num_examples: int, steps: int, sampler: Sampler, accountant: str):
    self._n, self._steps, self._sampler, self._accountant = num_examples, steps, sampler, accountant
    self._q = float(sampling_rates(np.int64(num_examples), sampler.batch_size))
    self._pruned = sampler.kind == "poisson" and accountant == "rdp"
    self._optimum = None  # Index of the last optimal order: the next search starts there.
    self._memo: collections.OrderedDict[float, np.ndarray] = collections.OrderedDict()  # z -> R_a.

  @staticmethod
  def _lower_bounds(rdp: np.ndarray, c: np.ndarray) -> np.ndarray:
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
    return np.where(np.isnan(rdp), r + c, np.inf)

  def _known_rdp(self, z: float) -> np.ndarray:
    """The memo's R_a of z (NaN where not evaluated; filled in place), most recently used last."""
    rdp = self._memo.pop(z, None)
    if rdp is None:
      rdp = np.full(_RDP_ORDERS.shape, np.nan)
      if len(self._memo) >= self.MEMO_SIZE:
        self._memo.popitem(last=False)
    self._memo[z] = rdp
    return rdp

  def _full(self, z: float, delta: float) -> float:
    client = dp_event(z, self._n, self._steps, self._sampler, self._accountant)
    acc = _make_accountant(self._accountant, client.relation)
    acc.compose(client.event)
    return float(acc.get_epsilon(delta))

  def __call__(self, noise_multiplier: float, delta: float) -> float:
    z, q, steps = noise_multiplier, self._q, self._steps
    pinsker = 2.0 * steps * (q * (2.0 * special.ndtr(0.5 / z) - 1.0)) ** 2
    if not self._pruned or pinsker < -math.log1p(-delta * delta):
      return self._full(z, delta)
    c = np.log1p(-1.0 / _RDP_ORDERS) - np.log(delta * _RDP_ORDERS) / (_RDP_ORDERS - 1.0)
    if self._optimum is None:
      self._optimum = int(np.searchsorted(_RDP_ORDERS, _gaussian_optimal_order(z, q, steps, delta)))
    rdp = self._known_rdp(z)
    todo, grow, event = np.zeros(0, np.int64), 2, None
    if np.isnan(rdp).all():  # New z: the last optimum with two integer orders on either side as anchors.
      anchors = np.flatnonzero(_INTEGER_ORDERS)
      k = np.searchsorted(anchors, self._optimum)
      todo = np.union1d(
        np.arange(max(self._optimum - 1, 0), min(self._optimum + 2, len(_RDP_ORDERS))),
        anchors[max(k - 2, 0) : k + 2],
      )
    while True:
      if todo.size:
        if event is None:
          event = dp_event(z, self._n, steps, self._sampler, self._accountant).event
        acc = dp_rdp.RdpAccountant(_RDP_ORDERS[todo])
        acc.compose(event)
        rdp[todo] = acc.rdp
      done = ~np.isnan(rdp)
      eps, order = dp_rdp.compute_epsilon(_RDP_ORDERS[done], rdp[done], delta)
      bound = self._lower_bounds(rdp, c)
      todo = np.sort(np.argsort(bound)[:grow])
      todo, grow = todo[bound[todo] < eps], 2 * grow
      if not todo.size:
        break
    self._optimum = int(np.searchsorted(_RDP_ORDERS, order))
    return float(eps)


def client_arrays(**arrays: Any) -> dict[str, np.ndarray]:
  """Broadcasts per-client inputs (scalars or [N]) to one 1-D shape [N]."""
  shapes = {name: np.shape(a) for name, a in arrays.items()}
  require(
    all(len(s) <= 1 for s in shapes.values()),
    f"per-client inputs must be scalars or 1-D [N]; got shapes {shapes}",
  )
  try:
    out = np.broadcast_arrays(*(np.asarray(a) for a in arrays.values()))
  except ValueError:
    fail(f"per-client inputs must share one length N; got shapes {shapes}")
  return {name: np.atleast_1d(a) for name, a in zip(arrays, out)}


def epsilon_spent(
  noise_multipliers: chex.ArrayNumpy,
  num_examples: chex.ArrayNumpy | int,
  steps_done: chex.ArrayNumpy | int,
  delta: float,
  sampler: Sampler,
  accountant: str = "rdp",
) -> np.ndarray:
  """Per-client privacy ledger: ``accountant_epsilon(z_i, n_i, t_i, delta, sampler)`` for every client, [N].

  Args:
    noise_multipliers: z: [N] (inf = released nothing).
    num_examples: n: [N] or scalar, the clients' public dataset sizes (>= 1).
    steps_done: t: [N] or scalar, DP-SGD steps taken so far (>= 0).
    delta: target delta in (0, 1).
    sampler: the round's :class:`Sampler`.
    accountant: 'rdp' (equal to the full accountant, cheap per client) or 'pld' (one PLD per client).

  Returns:
    eps: [N] float64; 0 where z = inf or t = 0.
  """
  check_choice("accountant", accountant, ACCOUNTANTS)
  check_open_unit("delta", delta)
  check_sampler(sampler)
  check_noise_multipliers(noise_multipliers)
  check_examples(num_examples)
  steps_arr = np.asarray(steps_done)
  require(steps_arr.dtype.kind in "iu", f"steps_done has dtype {steps_arr.dtype}: expected integers")
  check_array("steps_done", steps_arr, lambda a: a >= 0, "integers >= 0")
  cols = client_arrays(z=noise_multipliers, n=num_examples, t=steps_arr)
  z, n, t = cols["z"].astype(np.float64), cols["n"].astype(np.int64), cols["t"].astype(np.int64)
  eps = np.zeros(z.shape)
  live = np.isfinite(z) & (t > 0)
  keys, inverse = np.unique(np.stack([n[live], t[live], z[live]], axis=1), axis=0, return_inverse=True)
  values = np.empty(len(keys))
  curve, curve_key = None, None
  for j, (nj, tj, zj) in enumerate(keys):  # Sorted by (n, t, z): each search starts near the last.
    nj, tj = int(nj), int(tj)
    if curve_key != (nj, tj):
      curve, curve_key = EpsilonCurve(nj, tj, sampler, accountant), (nj, tj)
      overflow = dp_event(1.0, nj, tj, sampler, accountant).overflow
    values[j] = with_charge(functools.partial(curve, float(zj)), delta, overflow)
  eps[live] = values[inverse.reshape(-1)]
  return eps

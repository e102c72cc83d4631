"""Closed-form Stackelberg equilibrium of the canonical proportional-share game (docs/model.md "The game").

Clients i = 1..N with weights w_i = d_i / mean(d) and per-unit privacy costs c_i choose budgets eps_i;
x_i = w_i eps_i is the effective contribution and k_i = c_i / w_i the normalized cost. Given the total
payment R the followers' utilities are u_i = R x_i / X - k_i x_i with X = sum_j x_j.

Every function here works on one game (arrays of shape [N]) with no Python loop over clients; ``jax.vmap``
them for many games.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax.validate import check_clients


class Participation(NamedTuple):
  """The participant set S of the follower equilibrium.

  mask: bool [N], i in S; size: |S| (int32 scalar); cost_sum: K_S = sum_{j in S} k_j;
  threshold: the participation bound K_S / (|S| - 1); clients with k_i >= threshold stay out.
  """

  mask: chex.Array
  size: chex.Array
  cost_sum: chex.Array
  threshold: chex.Array


def participation(k: chex.Array) -> Participation:
  """Participant set of the proportional-share game for normalized costs k: [N].

  S is the largest prefix of k sorted ascending with k_m < K_S / (|S| - 1). The prefix test at size m is
  (m - 2) k_(m) < K_(m-1); once it fails it fails for every larger m, so |S| is the count of passes.
  """
  k_sorted = jnp.sort(k)
  prefix = jnp.cumsum(k_sorted)
  m = jnp.arange(1, k.shape[-1] + 1, dtype=k.dtype)
  size = jnp.sum((m - 2) * k_sorted < prefix - k_sorted).astype(jnp.int32)
  cost_sum = prefix[size - 1]
  threshold = cost_sum / (size - 1)
  return Participation(mask=k < threshold, size=size, cost_sum=cost_sum, threshold=threshold)


def closed_form_contributions(payment: chex.Numeric, k: chex.Array) -> chex.Array:
  """Follower Nash equilibrium contributions x: [N] at total payment R.

  x_i = ((|S|-1) R / K_S) (1 - (|S|-1) k_i / K_S) for i in S, 0 otherwise (Yang et al., MobiCom 2012).
  """
  part = participation(k)
  n1 = (part.size - 1).astype(k.dtype)
  x = (n1 * payment / part.cost_sum) * (1.0 - n1 * k / part.cost_sum)
  return jnp.where(part.mask, x, 0.0)


def closed_form_budgets(payment: chex.Numeric, costs: chex.Array, weights: chex.Array) -> chex.Array:
  """Equilibrium privacy budgets eps_i = x_i / w_i: [N] for costs c: [N] and weights w: [N]."""
  check_clients(costs, weights)
  return closed_form_contributions(payment, costs / weights) / weights


def aggregate_response(payment: chex.Numeric, k: chex.Array) -> chex.Array:
  """Total contribution at the follower equilibrium: X(R) = (|S|-1) R / K_S."""
  part = participation(k)
  return (part.size - 1).astype(k.dtype) * payment / part.cost_sum


def closed_form_payment(lam: chex.Numeric, costs: chex.Array, weights: chex.Array) -> chex.Array:
  """Leader's optimal total payment for U_s(R) = lam log(1 + X(R)) - R: R* = max(0, lam - K_S/(|S|-1))."""
  check_clients(costs, weights)
  return jnp.maximum(0.0, lam - participation(costs / weights).threshold)


def log_server_utility(lam: chex.Numeric, payment: chex.Numeric, total_contribution: chex.Numeric):
  """U_s = lam log(1 + X) - R (docs/model.md "Stage I")."""
  return lam * jnp.log1p(total_contribution) - payment


def follower_utilities(payment: chex.Numeric, x: chex.Array, k: chex.Array) -> chex.Array:
  """u_i = R x_i / X - k_i x_i: [N] in contribution units (0 for everyone when X = 0)."""
  total = jnp.sum(x)
  share = jnp.where(total > 0, x / jnp.where(total > 0, total, 1.0), 0.0)
  return payment * share - k * x


def capped_level(total: chex.Numeric, k: chex.Array, caps: chex.Array, k_sorted: bool = False) -> chex.Array:
  """y >= 0 with sum_i clip(X - k_i y, 0, cap_i) = X for a group's total contribution X: [].

  The capped proportional-share equilibrium in contribution units (docs/model.md "Stage II"): at payment
  P every client's first-order condition P (X - x_i) / X^2 = k_i gives x_i = clip(X - k_i y, 0, cap_i)
  with y = X^2 / P. Where the left side is flat at X (every client capped or out) a range of payments
  supports the same profile; the largest y is returned, i.e. the least payment P = X^2 / y that does.
  The left side is piecewise linear and non-increasing in y with breakpoints (X - cap_i) / k_i (cap ->
  interior) and X / k_i (interior -> out): a binary search over the sorted breakpoints finds the
  segment, and the equation is solved exactly on it, y = (sum_capped cap_i + (|I| - 1) X) /
  sum_interior k_i (differentiable in X, k and caps). Slots with cap_i = 0 never contribute (padding).
  Needs 0 < X <= sum_i cap_i. With ``k_sorted`` (static; k must be non-decreasing) the breakpoints X / k_i
  are already in (reverse) order: only the K breakpoints (X - cap_i) / k_i are sorted and each list is
  searched on its own (the sort is most of the cost; same answer).
  """

  def excess(y):
    return jnp.sum(jnp.clip(total - k * y, 0.0, caps)) - total

  # Zero up to rounding: on a flat stretch (every client capped or out) the sum of caps equals X only to
  # a few ulps, and the largest y there is wanted.
  slack = 64 * jnp.finfo(k.dtype).eps * total

  def search(breaks):  # sorted, excess(breaks[0]) >= -slack > excess(breaks[-1]): the segment's ends
    def halve(_, bounds):  # invariant: excess(breaks[lo]) >= -slack > excess(breaks[hi])
      lo, hi = bounds
      mid = (lo + hi) // 2
      up = excess(breaks[mid]) >= -slack
      return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    n = breaks.shape[-1]
    lo, hi = jax.lax.fori_loop(0, max(1, int(np.ceil(np.log2(n)))), halve, (0, n - 1))
    return breaks[lo], breaks[hi]

  zero = jnp.zeros(1, k.dtype)
  # Only to locate the segment (inside is a constant for autodiff): sorted without tangents.
  entering = jax.lax.stop_gradient(jnp.maximum(total / k, 0.0))
  leaving_cap = jax.lax.stop_gradient(jnp.maximum((total - caps) / k, 0.0))
  if k_sorted:
    # The excess is non-increasing, so the segment is the tightest of the two lists' brackets; every
    # client is out at y = X / k_1 = max entering, which closes the capped list.
    top = entering[:1]
    lo_cap, hi_cap = search(jnp.concatenate([zero, jnp.sort(leaving_cap), top]))
    lo_out, hi_out = search(jnp.concatenate([zero, entering[::-1]]))
    lo, hi = jnp.maximum(lo_cap, lo_out), jnp.minimum(hi_cap, hi_out)
  else:
    lo, hi = search(jnp.sort(jnp.concatenate([leaving_cap, entering, zero])))
  inside = jax.lax.stop_gradient(0.5 * (lo + hi))
  capped = total - k * inside >= caps
  interior = ~capped & (total - k * inside > 0)
  slope = jnp.sum(jnp.where(interior, k, 0.0))
  level = (jnp.sum(jnp.where(capped, caps, 0.0)) + (jnp.sum(interior) - 1) * total) / jnp.where(
    slope > 0, slope, 1.0
  )
  return jnp.where(slope > 0, level, inside)


def capped_contributions(total: chex.Numeric, level: chex.Numeric, k: chex.Array, caps: chex.Array):
  """x_i = clip(X - k_i y, 0, cap_i): [N], the capped equilibrium contributions at total X and level y."""
  return jnp.clip(total - k * level, 0.0, caps)

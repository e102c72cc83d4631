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
import jax.numpy as jnp

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

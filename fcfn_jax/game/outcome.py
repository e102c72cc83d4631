"""Outcome of one incentive mechanism on one game, with one accounting for all (docs/model.md "Metrics").

Every mechanism (the Stackelberg game and each baseline in ``baselines.py``) ends in budgets eps: [N] and
payments: [N] (what each client receives); :func:`build_outcome` turns them into the same metrics so the
mechanisms are compared on equal terms. Payments are transfers: they cancel in the social welfare, which is
always V(eps) - sum_i c_i eps_i.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax.numpy as jnp

Valuation = Callable[[chex.Array, chex.Array], chex.Array]
"""The server's valuation V(eps, w) -> scalar of budgets eps: [N] and quality weights w: [N]."""


class Outcome(NamedTuple):
  """Metrics of one mechanism on one game (a pytree: vmap a mechanism to get a batch of them).

  budgets: eps_i [N]. payments: what client i receives [N]. client_utilities: u_i = payment_i - c_i eps_i [N].
  server_utility: U_s = V(eps) - total_payment.
  intermediary_utility: total margin of the intermediaries (three-party game; 0 otherwise).
  participants: #{i : eps_i > 0} (int32).
  total_payment: the server's total outlay = sum_i payment_i + intermediary_utility.
  social_welfare: U_s + sum_i u_i + intermediary_utility = V(eps) - sum_i c_i eps_i (payments cancel).
  mean_client_utility: sum_i u_i / N over all N clients, participants or not.
  average_utility: social_welfare / (N + 1 + M), the mean over all parties: the server, the N clients and,
    in the three-party game, the M intermediaries (M = 0 otherwise, giving (U_s + sum_i u_i) / (N + 1)).
  """

  budgets: chex.Array
  payments: chex.Array
  client_utilities: chex.Array
  server_utility: chex.Array
  intermediary_utility: chex.Array
  participants: chex.Array
  total_payment: chex.Array
  social_welfare: chex.Array
  mean_client_utility: chex.Array
  average_utility: chex.Array


def log_valuation(lam: chex.Numeric) -> Valuation:
  """Stage-I valuation V(eps, w) = lam log(1 + sum_i w_i eps_i) (docs/model.md "Stage I")."""

  def valuation(budgets: chex.Array, weights: chex.Array) -> chex.Array:
    return lam * jnp.log1p(jnp.sum(weights * budgets))

  return valuation


def build_outcome(
  budgets: chex.Array,
  payments: chex.Array,
  costs: chex.Array,
  weights: chex.Array,
  valuation: Valuation,
  intermediary_utilities: chex.Array | None = None,
) -> Outcome:
  """The metrics of budgets eps: [N] and client payments: [N] under a server valuation.

  Args:
    budgets: eps_i [N]. payments: what each client receives [N]. costs: per-unit privacy costs c_i [N].
    weights: quality weights w_i [N], passed to the valuation.
    valuation: V(eps, w) -> scalar, e.g. :func:`log_valuation` or the DP-aware quality.
    intermediary_utilities: [M] margins of the M intermediaries of the three-party game (each receives its
      share from the server and pays its clients); None = no intermediaries (M = 0).

  Returns:
    The :class:`Outcome`; the server pays sum_i payment_i + sum_m intermediary_utilities_m.
  """
  if intermediary_utilities is None:
    intermediary_utilities = jnp.zeros((0,), budgets.dtype)
  client_utilities = payments - costs * budgets
  margin = jnp.sum(intermediary_utilities)
  total_payment = jnp.sum(payments) + margin
  server_utility = valuation(budgets, weights) - total_payment
  welfare = server_utility + jnp.sum(client_utilities) + margin
  num_parties = budgets.shape[-1] + 1 + intermediary_utilities.shape[-1]
  return Outcome(
    budgets=budgets,
    payments=payments,
    client_utilities=client_utilities,
    server_utility=server_utility,
    intermediary_utility=margin,
    participants=jnp.sum(budgets > 0).astype(jnp.int32),
    total_payment=total_payment,
    social_welfare=welfare,
    mean_client_utility=jnp.mean(client_utilities),
    average_utility=welfare / num_parties,
  )

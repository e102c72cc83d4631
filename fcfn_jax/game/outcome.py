"""Outcome of one incentive mechanism on one game, with one accounting for all (docs/model.md "Metrics").

Every mechanism (the Stackelberg game in ``stackelberg.py``, each baseline in ``baselines.py``) ends in
budgets eps: [N] and payments: [N] (what each client receives); :func:`build_outcome` turns them into the
same metrics, under the game's one valuation lam Q(eps) (``valuation.quality``), so the mechanisms are
compared on equal terms. Payments are transfers: they cancel in the social welfare, which is always
lam Q(eps) - sum_i c_i eps_i.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax.numpy as jnp

from fcfn_jax.game import valuation
from fcfn_jax.game.spec import Game, GameSpec

AVERAGE_UTILITY = (
  "average_utility = (U_s + sum_i u_i + sum_m margin_m) / (N + 1 + M): the server, all N clients "
  "(participants or not) and, in three_party, its M aggregators count as parties (M = 0 otherwise)"
)
"""The definition of the average utility, printed next to every table that shows it."""


class Outcome(NamedTuple):
  """Metrics of one mechanism on one game (a pytree: vmap a mechanism to get a batch of them).

  budgets: eps_i [N]. payments: what client i receives [N]. client_utilities: u_i = payment_i - c_i eps_i [N].
  quality: Q(eps), the valuation of the model the server gets (-inf when nobody participates under 'dp').
  server_utility: U_s = lam Q(eps) - total_payment.
  intermediary_utility: total margin of the intermediaries (three-party game; 0 otherwise).
  participants: #{i : eps_i > 0} (int32).
  total_payment: the server's total outlay = sum_i payment_i + intermediary_utility.
  social_welfare: U_s + sum_i u_i + intermediary_utility = lam Q(eps) - sum_i c_i eps_i (payments cancel).
  mean_client_utility: sum_i u_i / N over all N clients, participants or not.
  average_utility: social_welfare / (N + 1 + M), the mean over all parties: the server, the N clients and,
    in the three-party game, the M intermediaries (M = 0 otherwise, giving (U_s + sum_i u_i) / (N + 1)).
  """

  budgets: chex.Array
  payments: chex.Array
  client_utilities: chex.Array
  quality: chex.Array
  server_utility: chex.Array
  intermediary_utility: chex.Array
  participants: chex.Array
  total_payment: chex.Array
  social_welfare: chex.Array
  mean_client_utility: chex.Array
  average_utility: chex.Array


def build_outcome(
  budgets: chex.Array,
  payments: chex.Array,
  game: Game,
  spec: GameSpec,
  intermediary_utilities: chex.Array | None = None,
) -> Outcome:
  """The metrics of budgets eps: [N] and client payments: [N] on ``game`` (its true costs c_i).

  Args:
    budgets: eps_i [N]. payments: what each client receives [N].
    game, spec: the game; the server values the budgets at lam Q(eps) (``valuation.quality``).
    intermediary_utilities: [M] margins of the M intermediaries of the three-party game (each receives its
      share from the server and pays its clients); None = no intermediaries (M = 0).

  Returns:
    The :class:`Outcome`; the server pays sum_i payment_i + sum_m intermediary_utilities_m.
  """
  if intermediary_utilities is None:
    intermediary_utilities = jnp.zeros((0,), budgets.dtype)
  client_utilities = payments - game.costs * budgets
  margin = jnp.sum(intermediary_utilities)
  total_payment = jnp.sum(payments) + margin
  quality = valuation.quality(budgets, game, spec)
  server_utility = game.lam * quality - total_payment
  welfare = server_utility + jnp.sum(client_utilities) + margin
  num_parties = budgets.shape[-1] + 1 + intermediary_utilities.shape[-1]
  return Outcome(
    budgets=budgets,
    payments=payments,
    client_utilities=client_utilities,
    quality=quality,
    server_utility=server_utility,
    intermediary_utility=margin,
    participants=jnp.sum(budgets > 0).astype(jnp.int32),
    total_payment=total_payment,
    social_welfare=welfare,
    mean_client_utility=jnp.mean(client_utilities),
    average_utility=welfare / num_parties,
  )

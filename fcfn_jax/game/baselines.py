"""The Stackelberg mechanism and its baselines on the same clients (docs/model.md "The game", "Baselines").

Every mechanism sees the same game: per-unit privacy costs c: [N], quality weights w: [N] (x_i = w_i eps_i,
k_i = c_i / w_i), the server's Stage-I valuation V(eps) = lam log(1 + sum_i w_i eps_i) and budgets in
[0, eps_max]; each returns an :class:`~fcfn_jax.game.outcome.Outcome` built by the shared accounting.

- stackelberg: the proposed two-stage game in closed form. R* = max(0, lam - K_S / (|S|-1)), follower
  equilibrium x_i(R*) from ``equilibrium``, eps_i = min(x_i / w_i, eps_max), payment_i = R* x_i / X.
  The closed form ignores the eps_max cap; where it binds the budgets are clipped and the payment rule is
  applied to the clipped budgets (an approximation: the generic solver gives the capped equilibrium).
- contract: contract theory under incomplete information. K = min(num_types, N) cost types are quantile
  bins of the sorted costs (bin sizes differ by at most one); the type cost theta_k is the bin's upper edge
  (its largest cost), so a menu feasible for theta_k is individually rational for every member. The server
  knows each type's count n_k and total weight W_k = sum_{i in k} w_i (the data it brings), not who is which
  type, and values the menu at lam log(1 + sum_k W_k eps_k). With eps_1 >= ... >= eps_K, binding IR of type K
  and binding local downward IC, r_k = theta_k eps_k + sum_{j>k} (theta_j - theta_{j-1}) eps_j, so the
  server pays sum_k C_k eps_k with C_k = n_k theta_k + (theta_k - theta_{k-1}) sum_{j<k} n_j (n_k times the
  virtual cost). It maximizes lam log(1 + sum_k W_k eps_k) - sum_k C_k eps_k over monotone eps in
  [0, eps_max]^K: the per-unit-contribution virtual costs C_k / W_k are ironed (weighted isotonic
  regression, i.e. slopes of the convex minorant of the cumulative (W, C) diagram), water-filled, and every
  pooled type gets the same budget. Clients then pick the item with the largest true utility r_k - c_i eps_k
  (or opt out at 0); ties up to roundoff break toward the larger budget (the usual convention).
- three_party: server -> M = max(1, min(num_aggregators, N // 2)) edge aggregators -> clients. Clients sorted
  by k are dealt round-robin (sorted rank j goes to group j mod M), so every group has >= 2 members and a
  similar spread of costs. Inside group m the aggregator pays its clients P_m as a proportional-share game:
  X_m = a_m P_m, a_m = (|S_m|-1) / K_{S_m}. The server pays R split among aggregators in proportion to X_m,
  a proportional-share game among aggregators with unit cost kappa_m = 1 / a_m (group m's participation
  threshold): aggregator utility R X_m / X - P_m. The server maximizes lam log(1 + X(R)) - R:
  R* = max(0, lam - K'_{S'} / (|S'|-1)) over the kappa's. Budgets are clipped to eps_max as in stackelberg.
  With M = 1 the lone aggregator has no competitor and no positive-effort equilibrium; the limit (nothing
  is bought, R* = 0) is reported.
- posted_price: one price p per unit of epsilon; client i takes eps_max if p >= c_i (an indifferent client
  accepts, so the optimum is attained) and 0 otherwise. U_s(p) = V(eps(p)) - p sum_i eps_i(p) is decreasing
  between consecutive sorted costs, so p* is the best of {c_(1), ..., c_(N)} or 'nobody' (p = 0, U_s = 0).
- no_incentive: every client keeps its self-protective budget eps_min and is paid nothing (u_i =
  -c_i eps_min); the server still trains on those budgets, U_s = V(eps_min 1).
- social_optimum: complete information, max_{eps in [0, eps_max]^N} V(eps) - sum_i c_i eps_i, solved by
  water-filling on k (see :func:`water_fill`). Payments are transfers; they are set to c_i eps_i
  (clients are made whole, u_i = 0, and the server's utility equals the welfare).

Each mechanism is jitted with the GameConfig static, works on one game ([N] arrays) and vmaps over games:
``jax.vmap(lambda c, w: contract(c, w, game_cfg))(costs, weights)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax.config import MECHANISMS, GameConfig
from fcfn_jax.game import equilibrium, solver
from fcfn_jax.game.outcome import Outcome, build_outcome, log_valuation
from fcfn_jax.validate import check_choice, check_clients, is_traced, require

_T = TypeVar("_T")

# Contract clients treat utilities within this many ulps of the items' size as ties.
_TIE_ULPS = 1e3


class Menu(NamedTuple):
  """A contract menu, one item per cost type (K types, ascending cost).

  type_costs: theta_k [K], each type's upper cost edge, ascending. counts: n_k [K] (int).
  type_weights: W_k = sum_{i in type k} w_i [K]. budgets: eps_k [K], non-increasing. rewards: r_k [K].
  """

  type_costs: chex.Array
  counts: chex.Array
  type_weights: chex.Array
  budgets: chex.Array
  rewards: chex.Array


def _check_game(costs, weights, game_cfg) -> None:
  require(isinstance(game_cfg, GameConfig), f"game_cfg={game_cfg!r} is invalid: expected a GameConfig")
  require(
    game_cfg.quality == "log",
    f"quality={game_cfg.quality!r} is invalid for the closed-form mechanisms: expected 'log' "
    "(the DP-aware quality is solved by the generic solver)",
  )
  check_clients(costs, weights)
  require(
    np.ndim(costs) == 1 and np.shape(costs) == np.shape(weights),
    f"costs of shape {np.shape(costs)} and weights of shape {np.shape(weights)} are invalid: "
    "expected one game, both of shape [N] (vmap over games)",
  )


def _game_function(
  core: Callable[[chex.Array, chex.Array, GameConfig], _T],
) -> Callable[[chex.Array, chex.Array, GameConfig], _T]:
  """Checks the game on the host (skipped for tracers), then runs core(costs, weights, game_cfg) under jit."""
  jitted = jax.jit(core, static_argnums=2)

  @functools.wraps(core)
  def wrapper(costs: chex.Array, weights: chex.Array, game_cfg: GameConfig) -> _T:
    _check_game(costs, weights, game_cfg)
    c, w = jnp.asarray(costs), jnp.asarray(weights)
    dtype = jnp.result_type(float, c, w)
    result = jitted(c.astype(dtype), w.astype(dtype), game_cfg)
    if not is_traced(c) and not is_traced(w):
      # Finite inputs can still overflow the game's arithmetic (k_i = c_i / w_i, K_S, R / K_S) in dtype.
      require(
        all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(result)),
        f"{core.__name__} overflows in {np.dtype(dtype).name} for costs in [{float(np.min(costs))!r}, "
        f"{float(np.max(costs))!r}] and weights in [{float(np.min(weights))!r}, "
        f"{float(np.max(weights))!r}]: expected magnitudes whose ratios c_i / w_i and their sum "
        "stay finite (rescale the costs and lam together)",
      )
    return result

  return wrapper


def _proportional(total: chex.Array, x: chex.Array) -> chex.Array:
  """Shares total * x_i / sum_j x_j along the last axis: x [..., n], total [...]; 0 where sum_j x_j = 0."""
  x_sum = jnp.sum(x, axis=-1, keepdims=True)
  positive = x_sum > 0
  return jnp.where(positive, jnp.expand_dims(total, -1) * x / jnp.where(positive, x_sum, 1.0), 0.0)


def water_fill(k: chex.Array, caps: chex.Array, lam: chex.Numeric) -> chex.Array:
  """argmax over 0 <= x <= caps of lam log(1 + sum_i x_i) - sum_i k_i x_i: [n] for k, caps: [n].

  KKT with mu = lam / (1 + X): x_i = caps_i if k_i < mu, 0 if k_i > mu, in between if k_i = mu. With k
  sorted ascending the fill of the i-th cheapest is clip(lam / k_(i) - 1 - sum_{j<i} caps_(j), 0, caps_(i)).
  """
  order = jnp.argsort(k)
  k_sorted, caps_sorted = k[order], caps[order]
  filled = jnp.clip(lam / k_sorted - 1.0 - (jnp.cumsum(caps_sorted) - caps_sorted), 0.0, caps_sorted)
  return jnp.zeros_like(filled).at[order].set(filled)


def _iron(values: chex.Array, weights: chex.Array) -> chex.Array:
  """Weighted non-decreasing isotonic regression of values_k / weights_k: [K].

  bar_k = max_{a<=k} min_{b>=k} sum_{a..b} values / sum_{a..b} weights, the slopes of the greatest convex
  minorant of the cumulative diagram (sum_{j<=k} weights, sum_{j<=k} values).
  """
  zero = jnp.zeros(1, values.dtype)
  cum_v = jnp.concatenate([zero, jnp.cumsum(values)])
  cum_w = jnp.concatenate([zero, jnp.cumsum(weights)])
  ordered = np.triu(np.ones((values.shape[-1],) * 2, dtype=bool))  # [a, b]: a <= b
  spread = jnp.where(ordered, cum_w[None, 1:] - cum_w[:-1, None], 1.0)
  average = jnp.where(ordered, (cum_v[None, 1:] - cum_v[:-1, None]) / spread, jnp.inf)
  lowest_after = jax.lax.cummin(average, axis=1, reverse=True)  # [a, k]: min over b >= k
  return jnp.max(jnp.where(ordered, lowest_after, -jnp.inf), axis=0)


@_game_function
def stackelberg(costs: chex.Array, weights: chex.Array, game_cfg: GameConfig) -> Outcome:
  """The proposed mechanism: the leader's R*, the followers' capped Nash equilibrium, payment_i = R* x_i / X.

  R* is the closed form max(0, lam - K_S / (|S| - 1)) (docs/model.md "Stage I"); the followers' budgets are
  the generic solver's equilibrium on [0, eps_max]^N, which equals the closed form when no cap binds and
  stays an exact equilibrium when caps bind (then R* is the uncapped leader optimum; ``leader.solve_leader``
  re-optimizes R under caps).
  """
  payment = equilibrium.closed_form_payment(game_cfg.lam, costs, weights)
  budgets = solver.share_equilibrium(payment, costs, weights, game_cfg.eps_max)
  payments = _proportional(payment, weights * budgets)
  return build_outcome(budgets, payments, costs, weights, log_valuation(game_cfg.lam))


@_game_function
def contract_menu(costs: chex.Array, weights: chex.Array, game_cfg: GameConfig) -> Menu:
  """The server's optimal menu for K = min(num_types, N) quantile cost types (see the module docstring)."""
  n = costs.shape[-1]
  num_types = min(game_cfg.num_types, n)
  counts = np.bincount(np.arange(n) * num_types // n, minlength=num_types)
  last = np.cumsum(counts) - 1
  order = jnp.argsort(costs)
  type_costs = costs[order][last]
  type_weights = jnp.diff(jnp.cumsum(weights[order])[last], prepend=0.0)
  rent_step = jnp.diff(type_costs, prepend=type_costs[:1])  # theta_k - theta_{k-1}; 0 for k = 1
  payment_rates = counts * type_costs + rent_step * (np.cumsum(counts) - counts)  # C_k

  slopes = _iron(payment_rates, type_weights)
  # Pools are runs of equal ironed slope; merging slopes equal up to roundoff costs nothing.
  tol = jnp.sqrt(jnp.finfo(costs.dtype).eps) * jnp.abs(slopes[1:])
  pool = jnp.cumsum(jnp.concatenate([jnp.ones(1, bool), slopes[1:] > slopes[:-1] + tol]))
  same_pool = pool[:, None] == pool[None, :]
  cum_w = jnp.cumsum(type_weights)
  pool_start = jnp.min(jnp.where(same_pool, cum_w - type_weights, jnp.inf), axis=1)
  pool_end = jnp.max(jnp.where(same_pool, cum_w, -jnp.inf), axis=1)
  total = jnp.sum(water_fill(slopes, type_weights * game_cfg.eps_max, game_cfg.lam))
  fill = jnp.clip((total / game_cfg.eps_max - pool_start) / (pool_end - pool_start), 0.0, 1.0)
  budgets = game_cfg.eps_max * fill

  rents = rent_step * budgets
  rewards = type_costs * budgets + jnp.cumsum(rents[::-1])[::-1] - rents
  return Menu(
    type_costs=type_costs,
    counts=jnp.asarray(counts),
    type_weights=type_weights,
    budgets=budgets,
    rewards=rewards,
  )


@_game_function
def contract(costs: chex.Array, weights: chex.Array, game_cfg: GameConfig) -> Outcome:
  """Clients pick their best item of :func:`contract_menu` by true cost, or opt out (0, 0)."""
  menu = contract_menu(costs, weights, game_cfg)
  item_budgets = jnp.concatenate([menu.budgets, jnp.zeros(1, costs.dtype)])
  item_rewards = jnp.concatenate([menu.rewards, jnp.zeros(1, costs.dtype)])
  value = item_rewards[None, :] - costs[:, None] * item_budgets[None, :]  # [N, K + 1]
  scale = item_rewards[None, :] + costs[:, None] * item_budgets[None, :]
  tol = _TIE_ULPS * jnp.finfo(costs.dtype).eps * jnp.max(scale, axis=1, keepdims=True)
  # Items are ordered by non-increasing budget, so the first near-best item is the largest budget.
  choice = jnp.argmax(value >= jnp.max(value, axis=1, keepdims=True) - tol, axis=1)
  return build_outcome(
    item_budgets[choice], item_rewards[choice], costs, weights, log_valuation(game_cfg.lam)
  )


@_game_function
def three_party(costs: chex.Array, weights: chex.Array, game_cfg: GameConfig) -> Outcome:
  """Server -> M aggregators -> clients, proportional-share at both levels (see the module docstring)."""
  n = costs.shape[-1]
  groups = num_intermediaries("three_party", n, game_cfg)
  slots = -(-n // groups)
  k = costs / weights
  order = jnp.argsort(k)

  def to_groups(values, fill):  # [N] -> [M, slots]; sorted rank j -> group j % M, slot j // M
    padded = jnp.concatenate([values[order], jnp.full(groups * slots - n, fill, values.dtype)])
    return padded.reshape(slots, groups).T

  def from_groups(values):  # [M, slots] -> [N]
    return jnp.zeros(n, values.dtype).at[order].set(values.T.reshape(-1)[:n])

  # A padding slot costs more than any group's participation threshold, so it never participates.
  k_groups = to_groups(k, jnp.sum(k))
  w_groups = to_groups(weights, 1.0)
  unit_costs = jax.vmap(equilibrium.participation)(k_groups).threshold  # kappa_m = 1 / a_m
  payment = jnp.maximum(0.0, game_cfg.lam - equilibrium.participation(unit_costs).threshold)
  group_payments = equilibrium.closed_form_contributions(payment, unit_costs) * unit_costs  # P_m
  x_groups = jax.vmap(equilibrium.closed_form_contributions)(group_payments, k_groups)
  budgets = jnp.minimum(x_groups / w_groups, game_cfg.eps_max)
  x_groups = w_groups * budgets
  margins = _proportional(payment, jnp.sum(x_groups, axis=1)) - group_payments
  return build_outcome(
    from_groups(budgets),
    from_groups(_proportional(group_payments, x_groups)),
    costs,
    weights,
    log_valuation(game_cfg.lam),
    margins,
  )


@_game_function
def posted_price(costs: chex.Array, weights: chex.Array, game_cfg: GameConfig) -> Outcome:
  """One price per unit of epsilon, optimized exactly over the break points (the sorted costs)."""
  order = jnp.argsort(costs)
  sorted_costs = costs[order]
  takers = jnp.searchsorted(sorted_costs, sorted_costs, side="right")  # #{i : c_i <= c_(j)}
  taken_weight = jnp.cumsum(weights[order])[takers - 1]
  utility = (
    game_cfg.lam * jnp.log1p(game_cfg.eps_max * taken_weight) - sorted_costs * game_cfg.eps_max * takers
  )
  best = jnp.argmax(utility)
  price = jnp.where(utility[best] > 0, sorted_costs[best], 0.0)
  budgets = jnp.where(costs <= price, game_cfg.eps_max, 0.0)
  return build_outcome(budgets, price * budgets, costs, weights, log_valuation(game_cfg.lam))


@_game_function
def no_incentive(costs: chex.Array, weights: chex.Array, game_cfg: GameConfig) -> Outcome:
  """Every client keeps eps_min and is paid nothing."""
  budgets = jnp.full_like(costs, game_cfg.eps_min)
  return build_outcome(budgets, jnp.zeros_like(costs), costs, weights, log_valuation(game_cfg.lam))


@_game_function
def social_optimum(costs: chex.Array, weights: chex.Array, game_cfg: GameConfig) -> Outcome:
  """Complete-information welfare maximum by water-filling on k; payments c_i eps_i (transfers)."""
  x = water_fill(costs / weights, weights * game_cfg.eps_max, game_cfg.lam)
  budgets = jnp.minimum(x / weights, game_cfg.eps_max)
  return build_outcome(budgets, costs * budgets, costs, weights, log_valuation(game_cfg.lam))


def num_intermediaries(name: str, num_clients: int, game_cfg: GameConfig) -> int:
  """M, the intermediaries that mechanism ``name`` puts between the server and num_clients clients.

  three_party: M = max(1, min(num_aggregators, N // 2)) edge aggregators; every other mechanism: 0.
  """
  return max(1, min(game_cfg.num_aggregators, num_clients // 2)) if name == "three_party" else 0


_MECHANISMS: dict[str, Callable[[chex.Array, chex.Array, GameConfig], Outcome]] = {
  "stackelberg": stackelberg,
  "contract": contract,
  "three_party": three_party,
  "posted_price": posted_price,
  "no_incentive": no_incentive,
  "social_optimum": social_optimum,
}


def solve_mechanism(name: str, costs: chex.Array, weights: chex.Array, game_cfg: GameConfig) -> Outcome:
  """The Outcome of mechanism ``name`` (one of config.MECHANISMS) on the game (costs [N], weights [N])."""
  check_choice("mechanism", name, MECHANISMS)
  return _MECHANISMS[name](costs, weights, game_cfg)

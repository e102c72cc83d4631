"""The baselines the Stackelberg mechanism is compared with, and ``solve``, which runs any mechanism by name
(docs/model.md "Baselines").

Every mechanism is ``mechanism(game, spec) -> Outcome``: the same clients (costs, quality weights,
sampling rates), the same valuation lam Q(eps) (``valuation.quality``: by default the noise of the
aggregate the server forms under the one aggregation rule), the same caps, and one accounting
(``outcome.build_outcome``). Each optimizes the server's TRUE objective with the followers' caps. The
proposed mechanism, ``stackelberg``, is in ``stackelberg.py`` (importable from here too); the baselines:

- contract: contract theory under incomplete information. K cost types are quantile bins of the
  empirical (sorted) costs, K = min(num_types, N) or N for num_types = 0 (one type per client); the type
  cost theta_k is the bin's upper edge (its largest cost), so a menu feasible for theta_k is individually
  rational for every member. With eps_1 >= ... >= eps_K, binding IR of type K and binding local downward
  IC give r_k = theta_k eps_k + sum_{j>k} (theta_j - theta_{j-1}) eps_j, so the server pays sum_k C_k eps_k
  with C_k = n_k theta_k + (theta_k - theta_{k-1}) sum_{j<k} n_j (n_k times the virtual cost), and it
  maximizes lam Q(eps_type(i)) - sum_k C_k eps_k over monotone menus in [0, eps_max]^K. 'log': exact
  (virtual costs per unit of contribution ironed, then water-filled); otherwise the best of the K + 1
  threshold menus refined by projected gradient ascent on the monotone cone. Clients then pick the item
  with the largest true utility r_k - c_i eps_k (or opt out at 0); ties break toward the larger budget.
- three_party: server -> M = max(1, min(num_aggregators, N // 2)) edge aggregators -> clients; clients
  sorted by k = c / w are dealt round-robin (rank j to group j mod M). Inside group m the aggregator's
  payment P_m buys the group's exact capped proportional-share equilibrium, total X_m at cost
  P_m = C_m(X_m) (``equilibrium.capped_level``; linear until a cap binds), whose pieces in X are swept
  once per game (``_cost_segments``), so each evaluation is a lookup. The aggregators play a
  proportional-share game for the server's R, u_m = R X_m / X - C_m(X_m), X_m in [0, sum of the group's
  caps], solved exactly by the generic solver; the server searches R for its true objective. With M = 1
  the lone aggregator has no competitor and no positive-effort equilibrium: nothing is bought.
- posted_price: one price p per unit of epsilon; client i sells eps_max if p >= c_i (an indifferent
  client accepts) and nothing otherwise. U_s(p) = lam Q(eps(p)) - p sum_i eps_i(p) falls between
  consecutive sorted costs, so p* is the best of {c_(1), ..., c_(N)} or 'nobody'.
- no_incentive: a MANDATE, not a market: every client must use eps_min and is paid nothing, so it violates
  individual rationality (u_i = -c_i eps_min < 0); the server trains on those budgets.
- social_optimum: complete information, max over [0, eps_max]^N of lam Q(eps) - sum_i c_i eps_i;
  payments c_i eps_i (transfers: clients are made whole). 'log': water-filling on k (exact); otherwise
  the best prefix of clients at eps_max (ranked by cost per unit of quality) refined by projected
  gradient ascent.

Each mechanism goes through ``common.mechanism``: it checks the game on the host, runs jitted with the
GameSpec static (compiled once per shape and spec, reused across seeds), works on one game ([N] arrays)
and vmaps over games: ``jax.vmap(lambda g: contract(g, spec))(games)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax.config import MECHANISMS
from fcfn_jax.game import common, equilibrium, leader, solver, valuation
from fcfn_jax.game.outcome import Outcome, build_outcome
from fcfn_jax.game.spec import Game, GameSpec, num_intermediaries, num_types
from fcfn_jax.game.stackelberg import stackelberg
from fcfn_jax.validate import check_choice, require

# Contract clients treat utilities within this many ulps of the items' size as ties.
_TIE_ULPS = 1e3
# Prefix evaluations (posted price, social optimum) run in batches of this many to bound memory at O(N).
_PREFIX_BATCH = 256
# Parallel pooling rounds before the sequential pass: each round is O(K) vectorized work and typical inputs
# (a monotone point plus a gradient step) are monotone after a few; the sequential pass bounds the worst case.
_POOL_ROUNDS = 16


class Menu(NamedTuple):
  """A contract menu, one item per cost type (K types, ascending cost).

  type_costs: theta_k [K], each type's upper cost edge, ascending. counts: n_k [K] (int).
  types: each client's type k(i): int [N]. budgets: eps_k [K], non-increasing. rewards: r_k [K].
  """

  type_costs: chex.Array
  counts: chex.Array
  types: chex.Array
  budgets: chex.Array
  rewards: chex.Array


def _prefix_map(fn: Callable[[chex.Array], chex.Array], count: int) -> chex.Array:
  """[fn(j) for j in 0..count-1] as an array, in batches (memory O(batch x N), not O(N^2))."""
  return jax.lax.map(fn, jnp.arange(count), batch_size=min(count, _PREFIX_BATCH))


def _projected_ascent(
  objective: Callable[[chex.Array], chex.Array],
  start: chex.Array,
  project: Callable[[chex.Array], chex.Array],
  scale: chex.Array,
  iters: int,
) -> tuple[chex.Array, chex.Array]:
  """Projected gradient ascent with backtracking from ``start``: (best point, its objective).

  Each step tries x' = project(x + s g), halving s until the objective rises (Armijo, 1e-4), and doubles
  s after an accepted step; ``scale`` is the largest move of the first trial. For a concave objective it
  converges to the maximum; otherwise to a stationary point above the start. It stops at ``iters`` steps
  or at the first rejected step: from the same point, with the same gradient, every later step could only
  retry smaller moves than the 40 just rejected.
  """
  value0 = objective(start)
  dtype = start.dtype

  def step(state):
    count, x, value, size, _ = state
    grad = jax.grad(objective)(x)
    grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
    norm = jnp.max(jnp.abs(grad))
    size = jnp.where(size > 0, size, scale / jnp.where(norm > 0, norm, 1.0))

    def trial(carry):
      s, _, _, count = carry
      s = jnp.where(count > 0, 0.5 * s, s)
      new = project(x + s * grad)
      new_value = objective(new)
      ok = new_value >= value + 1e-4 * jnp.dot(grad, new - x)
      return s, new, jnp.where(jnp.isnan(new_value), -jnp.inf, new_value), count + 1, ok

    def not_done(carry):
      return ~carry[-1] & (carry[3] < 40)

    s, new, new_value, _, ok = jax.lax.while_loop(
      not_done, lambda c: trial(c[:4]), (size, x, value, jnp.zeros((), jnp.int32), jnp.asarray(False))
    )
    better = ok & (new_value > value)
    return (
      count + 1,
      jnp.where(better, new, x),
      jnp.where(better, new_value, value),
      jnp.where(better, 2.0 * s, 0.5 * s).astype(dtype),
      better,
    )

  init = (jnp.zeros((), jnp.int32), start, value0, jnp.zeros((), dtype), jnp.asarray(True))
  _, x, value, _, _ = jax.lax.while_loop(lambda s: s[-1] & (s[0] < iters), step, init)
  return x, value


# ---------------------------------------------------------------------------------------------------------
# Contract theory.
# ---------------------------------------------------------------------------------------------------------


def water_fill(k: chex.Array, caps: chex.Array, lam: chex.Numeric) -> chex.Array:
  """argmax over 0 <= x <= caps of lam log(1 + sum_i x_i) - sum_i k_i x_i: [n] for k, caps: [n].

  KKT with mu = lam / (1 + X): x_i = caps_i if k_i < mu, 0 if k_i > mu, in between if k_i = mu. With k
  sorted ascending the fill of the i-th cheapest is clip(lam / k_(i) - 1 - sum_{j<i} caps_(j), 0, caps_(i)).
  """
  order = jnp.argsort(k)
  k_sorted, caps_sorted = k[order], caps[order]
  filled = jnp.clip(lam / k_sorted - 1.0 - (jnp.cumsum(caps_sorted) - caps_sorted), 0.0, caps_sorted)
  return jnp.zeros_like(filled).at[order].set(filled)


def _block_sums(values, weights, label):
  """Per-block sums of values and weights: ([K], [K]) for a block label [K] (non-decreasing, from 0)."""
  k = values.shape[-1]
  total = lambda x: jax.ops.segment_sum(x, label, num_segments=k, indices_are_sorted=True)
  return total(values), total(weights)


def _violations(sum_v, sum_w):
  """[K] bool: block b >= 1 has a mean at or below block b - 1's (empty blocks, sum_w = 0, never do)."""
  below = (sum_v[:-1] * sum_w[1:] >= sum_v[1:] * sum_w[:-1]) & (sum_w[1:] > 0)
  return jnp.concatenate([jnp.zeros(1, bool), below])


def _stack_pool(sum_v, sum_w, count):
  """Sequential pool-adjacent-violators over ``count`` blocks (sums [K]): each block's pooled block [K].

  A stack of pooled blocks: push the next block, merge the top two while their means are not increasing;
  at most 2 count - 1 steps (every block is pushed once and merged at most once).
  """
  k = sum_v.shape[-1]

  def violated(state):
    _, top, stack_v, stack_w, _ = state
    a, b = jnp.maximum(top - 2, 0), jnp.maximum(top - 1, 0)
    return (top >= 2) & (stack_v[a] * stack_w[b] >= stack_v[b] * stack_w[a])

  def step(state):
    i, top, stack_v, stack_w, first = state
    merge = violated(state)
    a, b, j = jnp.maximum(top - 2, 0), jnp.maximum(top - 1, 0), jnp.minimum(i, k - 1)
    at = jnp.where(merge, a, top)
    return (
      jnp.where(merge, i, i + 1),
      jnp.where(merge, top - 1, top + 1),
      stack_v.at[at].set(jnp.where(merge, stack_v[a] + stack_v[b], sum_v[j])),
      stack_w.at[at].set(jnp.where(merge, stack_w[a] + stack_w[b], sum_w[j])),
      first.at[at].set(jnp.where(merge, first[a], j)),
    )

  zero = jnp.zeros((), jnp.int32)
  init = (zero, zero, jnp.zeros_like(sum_v), jnp.zeros_like(sum_w), jnp.zeros(k, jnp.int32))
  _, top, _, _, first = jax.lax.while_loop(lambda s: (s[0] < count) | violated(s), step, init)
  starts = jnp.zeros(k, jnp.int32).at[jnp.where(jnp.arange(k) < top, first, k)].add(1, mode="drop")
  return jnp.cumsum(starts, dtype=jnp.int32) - 1


def _iron(values: chex.Array, weights: chex.Array) -> chex.Array:
  """Weighted non-decreasing isotonic regression of values_k / weights_k (weights > 0): [K].

  bar_k = max_{a<=k} min_{b>=k} sum_{a..b} values / sum_{a..b} weights, the slopes of the greatest convex
  minorant of the cumulative diagram (sum_{j<=k} weights, sum_{j<=k} values), by pool-adjacent-violators
  (pooling adjacent blocks whose means are not increasing, in any order, reaches it): up to _POOL_ROUNDS
  rounds that pool every maximal run of such blocks at once, then the sequential stack pass; O(K) time
  and memory.
  """
  k = values.shape[-1]

  def pool_runs(state):
    label, below, rounds = state
    label = (jnp.cumsum(~below, dtype=jnp.int32) - 1)[label]
    return label, _violations(*_block_sums(values, weights, label)), rounds + 1

  label = jnp.arange(k, dtype=jnp.int32)
  below = _violations(*_block_sums(values, weights, label))
  label, below, _ = jax.lax.while_loop(
    lambda s: jnp.any(s[1]) & (s[2] < _POOL_ROUNDS), pool_runs, (label, below, jnp.zeros((), jnp.int32))
  )
  sum_v, sum_w = _block_sums(values, weights, label)
  label = jax.lax.cond(jnp.any(below), lambda: _stack_pool(sum_v, sum_w, label[-1] + 1)[label], lambda: label)
  sum_v, sum_w = _block_sums(values, weights, label)
  return (sum_v / jnp.where(sum_w > 0, sum_w, 1.0))[label]


def _log_menu_budgets(game, type_weights, payment_rates):
  """The exact optimal menu for Q = log(1 + sum_k W_k eps_k): ironed virtual costs C_k / W_k,
  water-filled, every pooled type at the same budget."""
  slopes = _iron(payment_rates, type_weights)
  # Pools are runs of equal ironed slope; merging slopes equal up to roundoff costs nothing.
  tol = jnp.sqrt(jnp.finfo(slopes.dtype).eps) * jnp.abs(slopes[1:])
  pool = jnp.cumsum(jnp.concatenate([jnp.zeros(1, bool), slopes[1:] > slopes[:-1] + tol]))
  k_types = slopes.shape[-1]
  cum_w = jnp.cumsum(type_weights)
  # Each type's pool spans cumulative weight [pool_start, pool_end] (pools are contiguous runs of types).
  pool_start = jax.ops.segment_min(cum_w - type_weights, pool, k_types, indices_are_sorted=True)[pool]
  pool_end = jax.ops.segment_max(cum_w, pool, k_types, indices_are_sorted=True)[pool]
  total = jnp.sum(water_fill(slopes, type_weights * game.eps_max, game.lam))
  fill = jnp.clip((total / game.eps_max - pool_start) / (pool_end - pool_start), 0.0, 1.0)
  return game.eps_max * fill


def _monotone_projection(eps_max):
  """Euclidean projection onto {eps_max >= e_1 >= ... >= e_K >= 0}: isotonic regression, then clipping."""

  def project(e):
    return jnp.clip(-_iron(-e, jnp.ones_like(e)), 0.0, eps_max)

  return project


def _type_counts(num_clients: int, k_types: int) -> np.ndarray:
  """n_k: [K] (static), the sizes of K quantile bins of N sorted clients (they differ by at most one)."""
  return np.bincount(np.arange(num_clients) * k_types // num_clients, minlength=k_types)


def _payment_rates(type_costs: chex.Array, counts: np.ndarray) -> chex.Array:
  """C_k = n_k theta_k + (theta_k - theta_{k-1}) sum_{j<k} n_j: [K], the server pays sum_k C_k eps_k."""
  rent_step = jnp.diff(type_costs, prepend=type_costs[:1])  # theta_k - theta_{k-1}; 0 for k = 1
  return counts * type_costs + rent_step * (np.cumsum(counts) - counts)


def _generic_menu_budgets(game: Game, spec: GameSpec, types: chex.Array, type_costs: chex.Array):
  """The menu's budgets [K] for any valuation: the best threshold menu (the j cheapest types at eps_max,
  j = 0..K) refined by projected gradient ascent on {eps_max >= eps_1 >= ... >= eps_K >= 0}."""
  k_types = type_costs.shape[-1]
  payment_rates = _payment_rates(type_costs, _type_counts(game.costs.shape[-1], k_types))

  def profit(e):
    return game.lam * valuation.quality(e[types], game, spec) - jnp.dot(payment_rates, e)

  vertex = lambda j: jnp.where(jnp.arange(k_types) < j, game.eps_max, 0.0).astype(game.costs.dtype)
  values = _prefix_map(lambda j: profit(vertex(j)), k_types + 1)
  best = jnp.argmax(jnp.where(jnp.isnan(values), -jnp.inf, values))
  budgets, _ = _projected_ascent(
    profit, vertex(best), _monotone_projection(game.eps_max), game.eps_max, spec.search.ascent_iters
  )
  return budgets


@common.mechanism(uses="num_types")
def contract_menu(game: Game, spec: GameSpec) -> Menu:
  """The server's optimal menu for K quantile cost types (see the module docstring)."""
  n = game.costs.shape[-1]
  k_types = num_types(spec, n)
  counts = _type_counts(n, k_types)
  last = np.cumsum(counts) - 1
  order = jnp.argsort(game.costs)
  types = jnp.zeros(n, jnp.int32).at[order].set(jnp.asarray(np.arange(n) * k_types // n, jnp.int32))
  type_costs = game.costs[order][last]
  if spec.valuation == "log":
    type_weights = jnp.diff(jnp.cumsum(game.weights[order])[last], prepend=0.0)
    budgets = _log_menu_budgets(game, type_weights, _payment_rates(type_costs, counts))
  else:
    budgets = _generic_menu_budgets(game, spec, types, type_costs)
  rents = jnp.diff(type_costs, prepend=type_costs[:1]) * budgets
  rewards = type_costs * budgets + jnp.cumsum(rents[::-1])[::-1] - rents
  return Menu(
    type_costs=type_costs, counts=jnp.asarray(counts), types=types, budgets=budgets, rewards=rewards
  )


@common.mechanism(uses="num_types")
def contract(game: Game, spec: GameSpec) -> Outcome:
  """Clients pick their best item of :func:`contract_menu` by true cost, or opt out (0, 0)."""
  menu = contract_menu(game, spec)
  costs = game.costs
  item_budgets = jnp.concatenate([menu.budgets, jnp.zeros(1, costs.dtype)])
  item_rewards = jnp.concatenate([menu.rewards, jnp.zeros(1, costs.dtype)])
  value = item_rewards[None, :] - costs[:, None] * item_budgets[None, :]  # [N, K + 1]
  scale = item_rewards[None, :] + costs[:, None] * item_budgets[None, :]
  tol = _TIE_ULPS * jnp.finfo(costs.dtype).eps * jnp.max(scale, axis=1, keepdims=True)
  # Items are ordered by non-increasing budget, so the first near-best item is the largest budget.
  choice = jnp.argmax(value >= jnp.max(value, axis=1, keepdims=True) - tol, axis=1)
  return build_outcome(item_budgets[choice], item_rewards[choice], game, spec)


# ---------------------------------------------------------------------------------------------------------
# Three-party game.
# ---------------------------------------------------------------------------------------------------------


class _Segments(NamedTuple):
  """A group's cost C(X) = X^2 / y(X) piece by piece (:func:`_cost_segments`): on piece t, between
  breaks[t - 1] and breaks[t] (breaks[-1] = 0), y(X) = (capped[t] + (interior[t] - 1) X) / slope[t].

  breaks: [T] non-decreasing, +inf after the last; capped: sum of the capped clients' caps [T + 1];
  interior: number of interior clients [T + 1]; slope: sum of their k [T + 1]; last: the last piece
  with an interior client (int []).
  """

  breaks: chex.Array
  capped: chex.Array
  interior: chex.Array
  slope: chex.Array
  last: chex.Array


class _Groups(NamedTuple):
  """Per-aggregator parameters of the three-party game: payment R [], k [M, S], caps [M, S] (padding
  slots have cap 0 and never contribute), and each group's cost pieces (None: ``capped_level`` at every
  evaluation, the reference)."""

  payment: chex.Array
  k: chex.Array
  caps: chex.Array
  segments: _Segments | None = None


def _cost_segments(k, caps) -> _Segments:
  """The pieces of a group's level y(X) over 0 < X <= sum of caps, by one sweep in X (k non-decreasing).

  As X grows the clients only move out -> interior -> capped (r = y / X solves sum_i clip(1 - k_i r, 0,
  cap_i / X) = 1, so it falls as X grows: 1 - k_i r rises, cap_i / X falls). Near 0 the interior clients
  are the uncapped participants (``equilibrium.participation``); on a piece with capped sum a, n interior
  clients of k-sum K, y = (a + (n - 1) X) / K, so interior i caps at X = (cap_i K + k_i a) / (K - (n - 1)
  k_i) and out j enters at X = k_j a / (K - (n - 1) k_j) (when positive): the sweep takes the nearest
  event, at most 2 per client (2 S sequential steps of O(S) each, once per game). The pieces' sums are
  exact masked sums (like ``capped_level``), their derivatives in k and caps those of the same sums.
  """
  sg = jax.lax.stop_gradient
  traced_k, traced_caps = k, caps
  k, caps = sg(k), sg(caps)  # the sweep only places the pieces
  slots = k.shape[-1]
  events = 2 * slots
  real = caps > 0
  prefix = jnp.cumsum(k)
  rank = jnp.arange(1, slots + 1, dtype=k.dtype)
  size = jnp.sum(real & ((rank - 2) * k < prefix - k))
  entered = jnp.arange(slots) < size
  capped = jnp.zeros(slots, bool)

  def sums(entered, capped):
    interior = entered & ~capped
    return (
      jnp.sum(jnp.where(capped, caps, 0.0)),
      jnp.sum(interior).astype(k.dtype),
      jnp.sum(jnp.where(interior, k, 0.0)),
      interior,
    )

  def step(t, state):
    x, entered, capped, breaks, cap_sums, counts, slopes, who, capping = state
    a, n, slope, interior = sums(entered, capped)
    denom = slope - (n - 1.0) * k
    safe = jnp.where(denom > 0, denom, 1.0)
    cap_at = jnp.where(interior & (denom > 0), (caps * slope + k * a) / safe, jnp.inf)
    # Clients enter in the order of k (the smallest out client first; k_j a / (K - (n - 1) k_j) rises
    # with k_j), which also settles ties such as every out client's entry at X = a when nobody is interior.
    out = real & ~entered
    i, j = jnp.argmin(cap_at), jnp.argmax(out)
    enter_at = jnp.where(out[j] & (denom[j] > 0), k[j] * a / safe[j], jnp.inf)
    use_cap = cap_at[i] <= enter_at
    nearest = jnp.minimum(cap_at[i], enter_at)
    moves = jnp.isfinite(nearest)
    capped = capped.at[i].set(capped[i] | (moves & use_cap))
    entered = entered.at[j].set(entered[j] | (moves & ~use_cap))
    a, n, slope, _ = sums(entered, capped)
    x = jnp.where(moves, jnp.maximum(nearest, x), x)
    return (
      x,
      entered,
      capped,
      breaks.at[t].set(jnp.where(moves, x, jnp.inf)),
      cap_sums.at[t + 1].set(a),
      counts.at[t + 1].set(n),
      slopes.at[t + 1].set(slope),
      who.at[t].set(jnp.where(use_cap, i, j).astype(jnp.int32)),
      capping.at[t].set(jnp.where(moves, jnp.where(use_cap, 1, -1), 0).astype(jnp.int32)),
    )

  a, n, slope, _ = sums(entered, capped)
  table = lambda first: jnp.zeros(events + 1, k.dtype).at[0].set(first)
  init = (
    jnp.zeros((), k.dtype),
    entered,
    capped,
    jnp.full(events, jnp.inf, k.dtype),
    table(a),
    table(n),
    table(slope),
    jnp.zeros(events, jnp.int32),
    jnp.zeros(events, jnp.int32),
  )
  _, _, _, breaks, cap_sums, counts, slopes, who, capping = jax.lax.fori_loop(0, events, step, init)
  # The same sums as functions of k and caps (values from the sweep, derivatives from these): event e caps
  # client who_e (capping 1: its cap joins the capped sum, its k leaves the interior) or lets it enter (-1).
  zero = jnp.zeros(1, k.dtype)
  cap_terms = jnp.concatenate([zero, jnp.cumsum(jnp.where(capping > 0, traced_caps[who], 0.0))])
  first = jnp.sum(jnp.where(entered, traced_k, 0.0))
  slope_terms = first + jnp.concatenate([zero, jnp.cumsum(-capping.astype(k.dtype) * traced_k[who])])
  cap_sums = cap_sums + cap_terms - sg(cap_terms)
  slopes = slopes + slope_terms - sg(slope_terms)
  last = jnp.maximum(jnp.sum(jnp.isfinite(breaks)) - 1, 0)
  return _Segments(breaks, cap_sums, counts, slopes, last)


def _segment_level(total, segments: _Segments):
  """y(X) on X's piece (total > 0; at a break the piece on its left, where y is largest)."""
  piece = jnp.minimum(jnp.searchsorted(segments.breaks, jax.lax.stop_gradient(total)), segments.last)
  slope = segments.slope[piece]
  level = segments.capped[piece] + (segments.interior[piece] - 1.0) * total
  return level / jnp.where(slope > 0, slope, 1.0)


def _group_cost(total, k, caps, segments: _Segments | None = None):
  """C_m(X): the least payment P whose capped equilibrium in the group has total X: P = X^2 / y(X) (k
  non-decreasing, as every group of :func:`three_party` is), from the group's pieces when given."""
  positive = total > 0
  safe = jnp.where(positive, total, 1.0)
  if segments is None:
    level = equilibrium.capped_level(safe, k, caps, k_sorted=True)
  else:
    level = _segment_level(safe, segments)
  return jnp.where(positive, safe**2 / level, 0.0)


def _aggregator_utility(totals, aggregate, weights, params: _Groups):
  """u_m = R X_m / X - C_m(X_m): [M], the aggregators' proportional-share game (weights are 1)."""
  del weights
  costs = jax.vmap(_group_cost)(totals, params.k, params.caps, params.segments)
  return params.payment * totals / aggregate - costs


def _group_upper_bound(k, caps):
  """An R above which every aggregator buys its whole group: [] (see :func:`three_party`).

  At X_m = sum of caps the group's cost rises at most as 2 X / y_m (y_m = min_i (X_m - cap_i) / k_i, the
  level where its last client caps); aggregator m stays there iff R (X - X_m) / X^2 >= C_m'(X_m).
  """
  full = jnp.sum(caps, axis=1)
  level = jnp.min(jnp.where(caps > 0, (full[:, None] - caps) / k, jnp.inf), axis=1)
  total = jnp.sum(full)
  return jnp.max(2.0 * full / level * total**2 / (total - full))


@common.mechanism(uses="num_aggregators")
def three_party(game: Game, spec: GameSpec) -> Outcome:
  """Server -> M aggregators -> clients with exact capped followers at both levels (module docstring)."""
  return _three_party(game, spec)


def _three_party(game: Game, spec: GameSpec, pieces: bool = True) -> Outcome:
  """:func:`three_party` on a prepared game; ``pieces`` (static) False evaluates each group's cost by
  ``equilibrium.capped_level`` at every call instead of from its pieces (the slower reference)."""
  n = game.costs.shape[-1]
  dtype = game.costs.dtype
  groups = spec.num_aggregators  # M, already max(1, min(num_aggregators, N // 2)) (see common.canonical)
  if groups == 1:  # no competitor: no positive-effort equilibrium, nothing is bought
    zeros = jnp.zeros(n, dtype)
    return build_outcome(zeros, zeros, game, spec, jnp.zeros(1, dtype))
  slots = -(-n // groups)
  k = game.costs / game.weights
  order = jnp.argsort(k)

  def to_groups(values, fill):  # [N] -> [M, slots]; sorted rank j -> group j % M, slot j // M
    padded = jnp.concatenate([values[order], jnp.full(groups * slots - n, fill, dtype)])
    return padded.reshape(slots, groups).T

  def from_groups(values):  # [M, slots] -> [N]
    return jnp.zeros(n, dtype).at[order].set(values.T.reshape(-1)[:n])

  def budgets_of(x):  # contributions [M, slots] -> budgets [N], exactly eps_max where capped
    return jnp.minimum(from_groups(x) / game.weights, game.eps_max)

  k_groups = to_groups(k, jnp.max(k))
  caps = to_groups(game.weights * game.eps_max, 0.0)
  options = spec.search.solver
  # Each group's cost pieces depend on the game only: swept once, outside the payment search.
  segments = jax.vmap(_cost_segments)(k_groups, caps) if pieces else None

  # The payment search evaluates several R per step with one vmapped call; batched, the solver's nested
  # data-dependent loops run every lane to the slowest lane's count (several times the cost of solving the
  # lanes one after another), so a batch of payments is solved in a loop. Every array it reads is an
  # argument: a custom_vmap function may not close over values batched by an outer vmap (say, over costs).
  @jax.custom_batching.sequential_vmap
  def play(payment, k_groups, caps, segments):
    """(contributions [M, slots], client payments [M, slots], margins [M]) at the server's payment R > 0."""
    params = _Groups(payment, k_groups, caps, segments)
    full = jnp.sum(caps, axis=1)
    totals = solver.solve_equilibrium(_aggregator_utility, jnp.ones(groups, dtype), params, full, options)
    group_payments = jax.vmap(_group_cost)(totals, k_groups, caps, segments)
    safe = jnp.where(totals > 0, totals, 1.0)
    if pieces:
      levels = jax.vmap(_segment_level)(safe, segments)
    else:
      levels = jax.vmap(functools.partial(equilibrium.capped_level, k_sorted=True))(safe, k_groups, caps)
    x = equilibrium.capped_contributions(totals[:, None], levels[:, None], k_groups, caps)
    x = jnp.where(totals[:, None] > 0, x, 0.0)
    margins = common.proportional(payment, totals) - group_payments
    return x, common.proportional(group_payments, x), margins

  def utility(log_payment):  # log R = -inf: nothing is bought
    payment = jnp.exp(log_payment)
    x, client_payments, margins = play(jnp.where(payment > 0, payment, 1.0), k_groups, caps, segments)
    bought = jax.tree.map(
      lambda a: jnp.where(payment > 0, a, 0.0), (budgets_of(x), from_groups(client_payments), margins)
    )
    return game.lam * valuation.quality(bought[0], game, spec) - payment, bought

  upper = _group_upper_bound(k_groups, caps)
  full_budgets = jnp.broadcast_to(game.eps_max, game.costs.shape)
  gain = game.lam * (
    valuation.quality(full_budgets, game, spec) - valuation.quality(jnp.zeros_like(full_budgets), game, spec)
  )
  upper = jnp.where(jnp.isfinite(gain) & (gain > 0), jnp.minimum(upper, gain), upper)
  _, _, (budgets, payments, margins) = leader.search_payment(utility, upper, spec.search)
  return build_outcome(budgets, payments, game, spec, margins)


# ---------------------------------------------------------------------------------------------------------
# Posted price, no incentive, social optimum.
# ---------------------------------------------------------------------------------------------------------


@common.mechanism
def posted_price(game: Game, spec: GameSpec) -> Outcome:
  """One price per unit of epsilon, optimized exactly over the break points (the sorted costs)."""
  costs = game.costs
  sorted_costs = jnp.sort(costs)

  def at_price(j):  # price c_(j): every client with c_i <= c_(j) sells eps_max
    budgets = jnp.where(costs <= sorted_costs[j], game.eps_max, 0.0)
    return game.lam * valuation.quality(budgets, game, spec) - sorted_costs[j] * jnp.sum(budgets)

  utility = _prefix_map(at_price, costs.shape[-1])
  utility = jnp.where(jnp.isnan(utility), -jnp.inf, utility)
  best = jnp.argmax(utility)
  nobody = game.lam * valuation.quality(jnp.zeros_like(costs), game, spec)
  price = jnp.where(utility[best] > nobody, sorted_costs[best], 0.0)
  budgets = jnp.where((costs <= price) & (price > 0), game.eps_max, 0.0)
  return build_outcome(budgets, price * budgets, game, spec)


@common.mechanism
def no_incentive(game: Game, spec: GameSpec) -> Outcome:
  """A mandate: every client must use eps_min and is paid nothing (violates IR: u_i = -c_i eps_min)."""
  budgets = jnp.broadcast_to(game.eps_min, game.costs.shape).astype(game.costs.dtype)
  return build_outcome(budgets, jnp.zeros_like(game.costs), game, spec)


def _welfare_budgets(game: Game, spec: GameSpec) -> chex.Array:
  """argmax over [0, eps_max]^N of lam Q(eps) - sum_i c_i eps_i for a valuation without closed form.

  Clients are ranked by cost per unit of quality at full budgets, c_i eps_max / (Q(all) - Q(all but i));
  the best prefix of that ranking at eps_max (N + 1 candidates, the structure of the optimum when Q is
  concave in each client's contribution) is refined by projected gradient ascent.
  """
  n = game.costs.shape[-1]
  full = jnp.broadcast_to(game.eps_max, game.costs.shape).astype(game.costs.dtype)
  everyone = valuation.quality(full, game, spec)
  without = _prefix_map(lambda i: valuation.quality(full.at[i].set(0.0), game, spec), n)
  marginal = jnp.maximum(everyone - without, jnp.finfo(full.dtype).tiny)
  order = jnp.argsort(game.costs * game.eps_max / marginal)
  rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))

  def welfare(e):
    return game.lam * valuation.quality(e, game, spec) - jnp.dot(game.costs, e)

  prefix = lambda j: jnp.where(rank < j, full, 0.0)
  values = _prefix_map(lambda j: welfare(prefix(j)), n + 1)
  best = jnp.argmax(jnp.where(jnp.isnan(values), -jnp.inf, values))
  budgets, _ = _projected_ascent(
    welfare, prefix(best), lambda e: jnp.clip(e, 0.0, game.eps_max), game.eps_max, spec.search.ascent_iters
  )
  return budgets


@common.mechanism
def social_optimum(game: Game, spec: GameSpec) -> Outcome:
  """Complete-information welfare maximum; payments c_i eps_i (transfers: clients are made whole)."""
  if spec.valuation == "log":
    x = water_fill(game.costs / game.weights, game.weights * game.eps_max, game.lam)
    budgets = jnp.minimum(x / game.weights, game.eps_max)
  else:
    budgets = _welfare_budgets(game, spec)
  return build_outcome(budgets, game.costs * budgets, game, spec)


# ---------------------------------------------------------------------------------------------------------
# Dispatch: every mechanism by name.
# ---------------------------------------------------------------------------------------------------------


_MECHANISMS: dict[str, Callable[[Game, GameSpec], Outcome]] = {
  "stackelberg": stackelberg,
  "contract": contract,
  "three_party": three_party,
  "posted_price": posted_price,
  "no_incentive": no_incentive,
  "social_optimum": social_optimum,
}


def no_market(mechanism: str, aggregators: int, num_clients: int, participants: int) -> str:
  """Why an outcome buys nothing: '' when someone participates, else one line for the results' tables
  (whose utilities then have no trained model to value: Q = -inf under 'dp')."""
  if participants > 0:
    return ""
  spec = GameSpec(mechanism=mechanism, num_aggregators=aggregators)
  if num_intermediaries(spec, num_clients) == 1:
    return (
      f"no market: three_party has one aggregator at N={num_clients} clients (M = max(1, min("
      f"num_aggregators={aggregators}, N // 2)) = 1) and a lone aggregator buys nothing"
    )
  return f"no market: {mechanism} buys no budget from any of the {num_clients} clients"


def solve(game: Game, spec: GameSpec) -> Outcome:
  """The Outcome of mechanism ``spec.mechanism`` on ``game`` (docs/model.md "Baselines")."""
  require(isinstance(spec, GameSpec), f"spec={spec!r} is invalid: expected a GameSpec")
  check_choice("mechanism", spec.mechanism, MECHANISMS)
  return _MECHANISMS[spec.mechanism](game, spec)


def solve_each(game: Game, spec: GameSpec, mechanisms: tuple[str, ...]) -> dict[str, Outcome]:
  """{name: Outcome} of every mechanism in ``mechanisms`` on the same game (specs differ only in name)."""
  return {name: solve(game, dataclasses.replace(spec, mechanism=name)) for name in mechanisms}

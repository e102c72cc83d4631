"""What the server values: the noise of the aggregate it forms (docs/model.md "Stage I", "Aggregation").

Three functions, used by every mechanism, the leader, sweeps, tuning AND the training round, so the game
values exactly the model that is trained:

- :func:`noise_variance`: v_i(eps_i), the DP noise variance of client i's update per unit sensitivity,
  z_i(eps_i)^2 with z_i the noise multiplier that makes its run (eps_i, delta)-DP. The ONE place where
  eps -> noise is mapped for the game.
- :func:`aggregation_weights`: the server's weights a_i over the participants (sum a_i = 1).
  'noise_aware' (default): a_i proportional to 1 / sigma_i^2 with sigma_i^2 = v_i(eps_i) + s_i, where
  s_i = v_i(data_epsilon) / w_i is the data term: what a client's limited (non-IID) data costs the
  aggregate, written as the DP noise of a budget so it scales with v whatever the accountant, and
  smaller for more data. The minimum-variance combination of the clients' updates: a client with a tiny
  budget (huge noise) gets a tiny weight instead of ruining the model. 'fedavg': a_i proportional to w_i
  (plain FedAvg).
- :func:`quality`: Q. 'dp': Q = -V with V = sum_i a_i^2 sigma_i^2 the variance of the aggregate; under
  'noise_aware' V = 1 / sum_i 1/sigma_i^2, so more budget or one more participant never lowers Q.
  Nobody participating means no model: Q = -inf. 'log': Q = log(1 + sum_i w_i eps_i) (verification).

Everything is elementwise over clients ([N]), jit/vmap/grad-safe; clients with eps_i = 0 carry no weight
and v is never evaluated at 0 (double ``where``), so gradients stay finite.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from fcfn_jax.game.spec import Game, GameSpec
from fcfn_jax.privacy import accounting


def noise_multiplier(budgets: chex.Array, game: Game, spec: GameSpec) -> chex.Array:
  """z_i(eps_i): [N], the noise multiplier of a participant's whole run; inf for eps_i = 0.

  Today the conservative surrogate of docs/model.md "From epsilon_i to noise" (ignores the sampling rates
  ``game.sampling_rates``); a tighter traced accountant taking (eps, q_i, steps, delta) replaces this line.
  """
  return accounting.surrogate_noise_multiplier(budgets, spec.steps, spec.delta)


def noise_variance(budgets: chex.Array, game: Game, spec: GameSpec) -> chex.Array:
  """v_i = z_i(eps_i)^2: [N] (inf for eps_i = 0; mask with ``where``, never multiply: 0 * inf = nan)."""
  return jnp.square(noise_multiplier(budgets, game, spec))


def contribution_variance(budgets: chex.Array, game: Game, spec: GameSpec) -> chex.Array:
  """sigma_i^2 = v_i(eps_i) + v_i(data_epsilon) / w_i: [N]; inf for eps_i = 0 (with a finite gradient)."""
  inside = budgets > 0
  data = noise_variance(jnp.broadcast_to(game.data_epsilon, budgets.shape), game, spec) / game.weights
  variance = noise_variance(jnp.where(inside, budgets, 1.0), game, spec) + data
  return jnp.where(inside, variance, jnp.inf)


def aggregation_weights(budgets: chex.Array, game: Game, spec: GameSpec) -> chex.Array:
  """The server's aggregation weights a_i: [N], sum 1 over the participants (eps_i > 0), 0 elsewhere.

  'noise_aware': a_i = (1 / sigma_i^2) / sum_j (1 / sigma_j^2); 'fedavg': a_i = w_i / sum_j w_j (over
  participants). All zeros when nobody participates. The training round aggregates with these weights.
  """
  inside = budgets > 0
  if spec.aggregation == "noise_aware":
    variance = contribution_variance(budgets, game, spec)
    raw = jnp.where(inside, 1.0 / jnp.where(inside, variance, 1.0), 0.0)
  else:
    raw = jnp.where(inside, game.weights, 0.0)
  total = jnp.sum(raw)
  return raw / jnp.where(total > 0, total, 1.0)


def aggregate_variance(budgets: chex.Array, game: Game, spec: GameSpec) -> chex.Array:
  """V = sum_i a_i^2 sigma_i^2: [], the variance of the aggregate the server forms; inf with nobody."""
  inside = budgets > 0
  a = aggregation_weights(budgets, game, spec)
  variance = contribution_variance(budgets, game, spec)
  terms = jnp.where(inside, jnp.square(a) * jnp.where(inside, variance, 0.0), 0.0)
  return jnp.where(jnp.any(inside), jnp.sum(terms), jnp.inf)


def quality(budgets: chex.Array, game: Game, spec: GameSpec) -> chex.Array:
  """Q(eps): [] for budgets eps: [N] (docs/model.md "Stage I").

  'dp': Q = -V (``aggregate_variance``), -inf when nobody participates. 'log': Q = log(1 + sum_i w_i eps_i).
  """
  if spec.valuation == "log":
    return jnp.log1p(jnp.dot(game.weights, budgets))
  return -aggregate_variance(budgets, game, spec)

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

The eps -> z map is ``GameSpec.noise_model``: 'surrogate' (closed form, the same for every client) or
'accountant': the traced RDP accountant of the Poisson-subsampled Gaussian at client i's sampling rate q_i,
the map the round's noise is calibrated with. Inverting it costs a root find per client and call, too slow
inside leader searches, so :func:`noise_table` tabulates log z_i once per game at the fixed budgets
exp(``NOISE_LOG_EPS``) (from the accountant's forward map eps_i(z) on a fine grid of z: no root finds), and
:func:`noise_multiplier` interpolates it linearly in (log eps, log z): within ~0.1% of the accountant's z,
with the exact gradient of the interpolant between the knots.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax.game.spec import NOISE_LOG_EPS, Game, GameSpec
from fcfn_jax.privacy import calibration, surrogate, traced
from fcfn_jax.validate import require

# The noise multipliers at which the accountant's forward map eps_i(z) is evaluated to build the table: the
# traced accountant's calibration range, 256 points (its inverse, read off by linear interpolation in
# log-log, then sits within the table's interpolation error of the root find's; 192 points lost ~0.1%).
_TABLE_LOG_Z = np.linspace(*(math.log(z) for z in calibration.CALIBRATION_Z_RANGE), 256)
# A table budget counts as certified by the accountant only this far (relative) above the budget of the
# largest z of the range: the order -> DP conversion floors eps (~0.02 at delta 1e-5) and z(eps) is ill
# defined near that floor; below it the table follows the surrogate's slope.
_FLOOR_MARGIN = math.log(1.5)
_TABLE_CLIENTS_PER_BATCH = 16  # bounds the forward map's [clients, z grid, RDP terms] working memory


def _surrogate_log_noise(eps: chex.Array, steps: int, delta: float) -> chex.Array:
  return jnp.log(surrogate.surrogate_noise_multiplier(eps, steps, delta))


def noise_table(sampling_rates: chex.Array, spec: GameSpec) -> jax.Array:
  """log z_i at the budgets exp(NOISE_LOG_EPS): [..., N, len(NOISE_LOG_EPS)] for rates q_i [..., N].

  z_i(eps) is the traced accountant's noise multiplier (``traced.traced_epsilon``: ``spec.steps``
  Poisson-subsampled Gaussian steps at rate q_i, delta ``spec.delta``; docs/model.md "From epsilon_i to
  noise") read off its forward map: eps_i(z_j) on a log-grid of z, inverted by linear interpolation in
  (log eps, log z). Budgets the accountant cannot certify in its z range (below 1.5 x its floor, or
  above eps_i(0.05)) continue from the nearest certified one with the surrogate's slope d log z / d log eps.
  Truncation's overflow charge is left out (below 1e-12 per step at the default capacity).
  """
  return _noise_table(jnp.asarray(sampling_rates), spec.steps, spec.delta)


@functools.partial(jax.jit, static_argnames=("steps", "delta"))
def _noise_table(q: jax.Array, steps: int, delta: float) -> jax.Array:
  """noise_table for (steps, delta): one compiled program per shape, whatever the mechanism."""
  dtype = jnp.result_type(q.dtype, float)
  log_z = jnp.asarray(_TABLE_LOG_Z, dtype)
  grid = jnp.asarray(NOISE_LOG_EPS, dtype)
  surrogate = _surrogate_log_noise(jnp.exp(grid), steps, delta)
  index = jnp.arange(grid.shape[0])

  def one(rate):
    eps = traced.traced_epsilon(jnp.exp(log_z), rate, steps, delta)
    # Increasing in eps once reversed (z decreasing); eps = 0 (the KL branch at huge z) stays finite.
    log_eps = jnp.log(jnp.maximum(eps, jnp.finfo(dtype).tiny))[::-1]
    table = jnp.interp(grid, log_eps, log_z[::-1])
    valid = (grid > log_eps[0] + _FLOOR_MARGIN) & (grid < log_eps[-1])
    first = jnp.argmax(valid)
    last = grid.shape[0] - 1 - jnp.argmax(valid[::-1])
    below = table[first] + surrogate - surrogate[first]
    above = table[last] + surrogate - surrogate[last]
    table = jnp.where(index < first, below, jnp.where(index > last, above, table))
    return jnp.where(jnp.any(valid), table, surrogate)

  flat = q.astype(dtype).reshape(-1)
  tables = jax.lax.map(one, flat, batch_size=_TABLE_CLIENTS_PER_BATCH)
  return tables.reshape(*q.shape, grid.shape[0])


def with_noise_table(game: Game, spec: GameSpec) -> Game:
  """The game with its ``noise_table`` when ``spec.noise_model`` is 'accountant' and it has none yet.

  Once per game (every mechanism's entry, ``baselines.solve``, calls it), so leader searches interpolate.
  """
  if spec.noise_model != "accountant" or game.noise_table is not None:
    return game
  return game._replace(noise_table=noise_table(game.sampling_rates, spec))


def _table_log_noise(eps: chex.Array, table: chex.Array, spec: GameSpec) -> chex.Array:
  """log z(eps) interpolated linearly in log eps on ``table`` [N, G] (eps > 0: [N]); outside the grid the
  nearest end continues with the surrogate's slope."""
  grid = jnp.asarray(NOISE_LOG_EPS, table.dtype)
  step = (NOISE_LOG_EPS[-1] - NOISE_LOG_EPS[0]) / (len(NOISE_LOG_EPS) - 1)
  x = jnp.log(eps)
  t = (x - grid[0]) / step
  k = jnp.clip(jnp.floor(t), 0, grid.shape[0] - 2).astype(jnp.int32)
  at = lambda j: jnp.take_along_axis(table, j[..., None], axis=-1)[..., 0]
  low, high = at(k), at(k + 1)
  inside = low + (t - k) * (high - low)
  # Extension: the surrogate's log-ratio to the end knot (never evaluated at eps = 0 by the callers).
  end = jnp.where(t < 0, 0, grid.shape[0] - 1)
  surrogate = functools.partial(_surrogate_log_noise, steps=spec.steps, delta=spec.delta)
  extended = at(end) + surrogate(eps) - surrogate(jnp.exp(grid[end]))
  outside = (t < 0) | (t > grid.shape[0] - 1)
  return jnp.where(outside, extended, inside)


def noise_multiplier(budgets: chex.Array, game: Game, spec: GameSpec) -> chex.Array:
  """z_i(eps_i): [N], the noise multiplier of a participant's whole run; inf for eps_i = 0.

  'surrogate': the closed form of docs/model.md "From epsilon_i to noise" (ignores the sampling rates).
  'accountant': the traced accountant at q_i, interpolated on ``game.noise_table`` (:func:`noise_table`).
  """
  if spec.noise_model == "surrogate":
    return surrogate.surrogate_noise_multiplier(budgets, spec.steps, spec.delta)
  require(
    game.noise_table is not None,
    "noise_model='accountant' needs game.noise_table: build the game with valuation.with_noise_table",
  )
  budgets = jnp.asarray(budgets)
  live = budgets > 0
  log_z = _table_log_noise(jnp.where(live, budgets, 1.0), game.noise_table, spec)
  return jnp.where(live, jnp.exp(log_z), jnp.inf)


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

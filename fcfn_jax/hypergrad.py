"""Hypergradients: the server's utility of the TRAINED model as a differentiable function of its price.

  U(R, pi) = lambda_acc * (-L_val(theta_T(R, pi; xi))) - R

for Stackelberg's total payment R (and optional per-client price weights pi; per-group prices are pi_i =
pi_{g(i)}), where theta_T are the server's parameters after T DP FedAvg rounds and L_val the mean
cross-entropy on a validation split held out from the test split (:func:`split_validation`). lambda_acc
converts nats of validation loss into the game's payment units (the server's exchange rate between
model loss and money; the proxy objective's lam plays the same role for Q). R is the total payment
(sum_i R pi_i x_i / sum_j pi_j x_j = R whenever someone participates, 0 otherwise).

What is differentiated (reverse mode, one traced program, float64 under ``jax.enable_x64``):
  R, pi -> eps_i: the capped follower equilibrium (``leader.follower_budgets``; implicit function theorem
    on its first-order conditions, ``solver.share_equilibrium``);
  eps_i -> z_i: the traced accountant's inverse (``traced.program_noise``: 'traced' is implicit,
    'surrogate' a closed form); the float32 rounding the rounds train with (``simulation.trainable_noise``,
    a step function with zero derivative) enters as a straight-through value z + stop_gradient(round(z) -
    z): the forward pass trains with the rounded z, the gradient is dz/deps of the map;
  eps_i -> a_i: the game's aggregation weights (``valuation.aggregation_weights``, noise-aware by default);
  z_i, a_i -> theta_T: T rounds of ``federated.federated_round`` unrolled: the DP noise z_i C xi / (q n)
    is reparameterized (xi fixed by the key), so for fixed keys U is a deterministic function of (R, pi).
The objective is averaged over K noise draws (K keys, vmapped); the gradient's standard error is the
draws' standard deviation / sqrt(K) (:class:`Hypergradient`).

Where it is not differentiable:
  * participation thresholds: client i enters at eps_i = 0 when R crosses its threshold. At and below it
    the equilibrium holds eps_i = 0 with d eps_i / dR = 0 and z_i = inf with zero gradient (double
    where), so the gradient there is the ONE-SIDED derivative of the configuration with client i out
    (the left derivative in R); the right derivative differs (the other clients' slopes change when i
    enters). A budget below the accountant's floor (``calibration.CALIBRATION_Z_RANGE``) also sits out.
  * the clipping min(1, C / |g_j|) has a kink where a per-example norm equals C (measure zero);
  * a cap eps_i = eps_max starting to bind (a kink of the equilibrium, as for the proxy objective);
  * the samplers (which examples a step draws) are piecewise constant in nothing: they depend only on
    the keys, never on R, so they contribute no gradient and need none.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax import data, federated, models, simulation, stats
from fcfn_jax.config import SimulationConfig
from fcfn_jax.game import leader, valuation
from fcfn_jax.game.spec import Game, GameSpec
from fcfn_jax.privacy import events, traced
from fcfn_jax.validate import check_open_unit, require

_VALIDATION_STREAM = 4  # fold_in tag of the run key's validation/test split (simulation uses 1..3)
_DRAW_AXIS = "draws"


class TrainedProblem(NamedTuple):
  """The traced inputs of :func:`trained_objective` (a pytree).

  game: the run's Game (float64). overflow: p_i [N]. pool: the clients' ClientPool. validation_x uint8
  [m, H, W, C], validation_y int32 [m]: the held-out validation split. params: the initial model (float64
  leaves).
  """

  game: Game
  overflow: chex.Array
  pool: data.ClientPool
  validation_x: chex.Array
  validation_y: chex.Array
  params: chex.ArrayTree


class Hypergradient(NamedTuple):
  """value: mean U over the K draws []; grad: d(mean U)/dR [] (and d/dpi [N] as ``price_grad``, or None);
  values: U per draw [K]; grads: dU/dR per draw [K]; stderr: std(grads) / sqrt(K) [] (K = 1: nan)."""

  value: chex.Array
  grad: chex.Array
  price_grad: chex.Array | None
  values: chex.Array
  grads: chex.Array
  stderr: chex.Array


def split_validation(
  test: data.Dataset, fraction: float, key: chex.PRNGKey
) -> tuple[data.Dataset, data.Dataset]:
  """(validation, held-out test): a seeded random ``fraction`` of the test split and the rest, disjoint."""
  check_open_unit("fraction", fraction)
  n = len(test.y)
  size = int(round(fraction * n))
  require(
    0 < size < n, f"fraction={fraction!r} is invalid for {n} test examples: expected both parts non-empty"
  )
  order = np.asarray(jax.random.permutation(jax.random.fold_in(key, _VALIDATION_STREAM), n))
  take = lambda rows: data.Dataset(
    test.x[rows], test.y[rows], None if test.groups is None else test.groups[rows], test.num_classes
  )
  return take(np.sort(order[:size])), take(np.sort(order[size:]))


def make_problem(
  cfg: SimulationConfig, fed_data: data.FederatedData, validation_fraction: float = 0.5
) -> tuple[TrainedProblem, GameSpec, Any, data.Dataset]:
  """The run's game, clients and initial model as a :class:`TrainedProblem` (float64), its GameSpec, the
  model's apply_fn and the held-out test split (what is left of ``fed_data.test`` after validation).

  Costs, weights, sampling rates, overflow and the initial model are those ``simulation.prepare`` and
  ``simulation.init_state`` draw for ``cfg`` (same seed, same streams).
  """
  require(
    cfg.privacy.calibration in ("traced", "surrogate"),
    f"calibration={cfg.privacy.calibration!r} is invalid for hypergradients: expected 'traced' or "
    "'surrogate' (the jax maps; 'exact' runs on the host)",
  )
  key = jax.random.PRNGKey(cfg.seed)
  n = np.asarray(fed_data.pool.num_examples)
  costs = simulation.client_costs(key, n.shape[0], cfg.game)
  weights = simulation.quality_weights(n)
  sampler = events.sampler_of(cfg.federated, cfg.privacy)
  overflow = events.overflow_probability(n, simulation.total_steps(cfg), sampler)
  validation, held_out = split_validation(fed_data.test, validation_fraction, key)
  model = simulation.model_of(cfg.model, fed_data.input_shape, fed_data.num_classes)
  params = models.init_params(model, jax.random.fold_in(key, simulation.INIT_STREAM), fed_data.input_shape)
  with jax.enable_x64(True):
    game, spec = simulation.game_of(cfg, costs, weights, n)
    problem = TrainedProblem(
      game=game,
      overflow=jnp.asarray(overflow, jnp.float64),
      pool=jax.device_put(fed_data.pool),
      validation_x=jnp.asarray(validation.x),
      validation_y=jnp.asarray(validation.y),
      params=jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params),
    )
  return problem, spec, model.apply, held_out


def straight_through_noise(z: chex.Array) -> chex.Array:
  """The value of ``simulation.trainable_noise`` (z rounded up to float32) with the derivative of z:
  z + stop_gradient(round(z) - z) where z is finite; inf (zero gradient) where it is not."""
  finite = jnp.isfinite(z)
  safe = jnp.where(finite, z, 1.0)
  rounded = simulation.trainable_noise(jax.lax.stop_gradient(safe), jnp).astype(safe.dtype)
  return jnp.where(finite, safe + (rounded - jax.lax.stop_gradient(safe)), jnp.inf)


class Trained(NamedTuple):
  """What one draw of :func:`train` produces: budgets eps [N], noise z [N] (straight-through), weights
  a [N], final params, validation loss [] and accuracy []."""

  budgets: chex.Array
  noise: chex.Array
  aggregation: chex.Array
  params: chex.ArrayTree
  loss: chex.Array
  accuracy: chex.Array


def train(
  payment: chex.Numeric,
  problem: TrainedProblem,
  key: chex.PRNGKey,
  prices: chex.Array | None = None,
  *,
  apply_fn,
  cfg: SimulationConfig,
  spec: GameSpec,
  outer_axes: tuple[str, ...] = (),
) -> Trained:
  """R (and pi) -> eps (equilibrium) -> z (accountant, straight-through float32) and a -> T rounds from
  ``problem.params`` with training key ``key`` -> validation loss; differentiable (module docstring)."""
  game = problem.game
  n = jnp.asarray(problem.pool.num_examples, game.costs.dtype)
  budgets = leader.follower_budgets(payment, game, spec, prices)
  z = traced.program_noise(
    budgets,
    game.sampling_rates,
    problem.overflow,
    simulation.total_steps(cfg),
    cfg.privacy.delta,
    cfg.privacy.sampling,
    cfg.privacy.calibration,
  )
  z = straight_through_noise(z)
  aggregation = valuation.aggregation_weights(budgets, game, spec)
  weights = simulation.round_weights(aggregation, n)
  server = federated.init_server_state(problem.params, cfg.federated)
  for _ in range(cfg.federated.rounds):
    server, _ = federated.federated_round(
      server,
      problem.pool,
      z,
      weights,
      key,
      apply_fn=apply_fn,
      fed=cfg.federated,
      privacy=cfg.privacy,
      outer_axes=outer_axes,
    )
  logits = apply_fn({"params": server.params}, models.normalize_pixels(problem.validation_x))
  loss = jnp.mean(models.cross_entropy(logits, problem.validation_y))
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == problem.validation_y)
  return Trained(budgets, z, aggregation, server.params, loss, accuracy)


def trained_objective(
  payment: chex.Numeric,
  problem: TrainedProblem,
  key: chex.PRNGKey,
  prices: chex.Array | None = None,
  *,
  lambda_acc: float,
  apply_fn,
  cfg: SimulationConfig,
  spec: GameSpec,
  outer_axes: tuple[str, ...] = (),
) -> chex.Array:
  """U = lambda_acc (-L_val(theta_T)) - R (R paid only when someone participates): [], for ONE noise
  draw (training key ``key``); a deterministic, differentiable function of (R, pi) for a fixed key."""
  trained = train(payment, problem, key, prices, apply_fn=apply_fn, cfg=cfg, spec=spec, outer_axes=outer_axes)
  paid = jnp.where(jnp.any(trained.budgets > 0), payment, 0.0)
  return -lambda_acc * trained.loss - paid


@functools.partial(jax.jit, static_argnames=("apply_fn", "cfg", "spec"))
def objective_draws(
  payment: chex.Numeric,
  problem: TrainedProblem,
  keys: chex.PRNGKey,
  prices: chex.Array | None = None,
  *,
  lambda_acc: float,
  apply_fn,
  cfg: SimulationConfig,
  spec: GameSpec,
) -> chex.Array:
  """U per noise draw: [K] for keys [K, 2] (the draws trained side by side, one vmap)."""
  one = functools.partial(
    trained_objective, lambda_acc=lambda_acc, apply_fn=apply_fn, cfg=cfg, spec=spec, outer_axes=(_DRAW_AXIS,)
  )
  return jax.vmap(one, in_axes=(None, None, 0, None), axis_name=_DRAW_AXIS)(payment, problem, keys, prices)


@functools.partial(jax.jit, static_argnames=("apply_fn", "cfg", "spec"))
def hypergradient(
  payment: chex.Numeric,
  problem: TrainedProblem,
  keys: chex.PRNGKey,
  prices: chex.Array | None = None,
  *,
  lambda_acc: float,
  apply_fn,
  cfg: SimulationConfig,
  spec: GameSpec,
) -> Hypergradient:
  """U and dU/dR (and dU/dpi) averaged over the K draws of keys [K, 2], with dU/dR's standard error.

  Reverse mode per draw (vmapped): memory holds the T rounds' residuals of K draws.
  """
  one = functools.partial(
    trained_objective, lambda_acc=lambda_acc, apply_fn=apply_fn, cfg=cfg, spec=spec, outer_axes=(_DRAW_AXIS,)
  )
  argnums = (0,) if prices is None else (0, 3)
  value_and_grad = jax.value_and_grad(one, argnums=argnums)
  values, grads = jax.vmap(value_and_grad, in_axes=(None, None, 0, None), axis_name=_DRAW_AXIS)(
    payment, problem, keys, prices
  )
  draws = values.shape[0]
  stderr = jnp.std(grads[0], ddof=1) / jnp.sqrt(draws) if draws > 1 else jnp.full((), jnp.nan)
  return Hypergradient(
    value=jnp.mean(values),
    grad=jnp.mean(grads[0]),
    price_grad=None if prices is None else jnp.mean(grads[1], axis=0),
    values=values,
    grads=grads[0],
    stderr=stderr,
  )


def draw_keys(cfg: SimulationConfig, num_draws: int) -> chex.PRNGKey:
  """K training keys [K, 2]: fold_in(fold_in(fold_in(PRNGKey(seed), TRAIN), draw), k), k < K."""
  return jax.vmap(lambda k: jax.random.fold_in(simulation.training_key(cfg), k))(jnp.arange(num_draws))


@functools.partial(jax.jit, static_argnames=("apply_fn", "cfg", "spec"))
def trained_draws(
  payment: chex.Numeric,
  problem: TrainedProblem,
  keys: chex.PRNGKey,
  prices: chex.Array | None = None,
  *,
  apply_fn,
  cfg: SimulationConfig,
  spec: GameSpec,
) -> Trained:
  """:func:`train` for each key of keys [K, 2]: a Trained with a leading [K] axis on every leaf."""
  one = functools.partial(train, apply_fn=apply_fn, cfg=cfg, spec=spec, outer_axes=(_DRAW_AXIS,))
  return jax.vmap(one, in_axes=(None, None, 0, None), axis_name=_DRAW_AXIS)(payment, problem, keys, prices)


ARMS = ("Q", "training")  # tuned for the proxy objective lam Q - R / for the trained objective U
# Metrics compared side by side (per seed) and as paired differences training - Q (over seeds).
COMPARED = ("R", "payment", "trained_objective", "test_accuracy", "validation_loss", "proxy_utility")


def standard_error(values: np.ndarray) -> float:
  """std(values, ddof=1) / sqrt(K) of values [K] (K = 1: nan)."""
  values = np.asarray(values, np.float64)
  return float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else float("nan")


def tuning_comparison(
  evaluations: Sequence[Mapping[str, Any]], confidence: float = 0.95
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Tuned-for-Q vs tuned-for-training over seeds (issue 23).

  evaluations: one per seed, ``{"seed": s, "Q": m, "training": m}`` with m[metric] (metric in COMPARED)
  a number or the values of the held-out noise draws [K] (K equal over seeds). Returns (per-seed rows:
  one per seed x arm, each metric's mean over the draws, its standard error over the draws for metrics
  with draws, and the arm's other entries (e.g. participants); difference rows: one per metric, the paired
  difference training - Q: draws averaged per seed, Student's t interval over the seeds,
  ``stats.pairwise_table``'s columns with each arm's mean beside it).
  """
  require(
    len(evaluations) >= 2,
    f"evaluations has {len(evaluations)} seeds: expected >= 2 (a confidence interval needs two)",
  )
  rows = []
  for evaluation in evaluations:
    for arm in ARMS:
      measured = evaluation[arm]
      row = {"seed": evaluation["seed"], "tuned_for": arm}
      for metric in COMPARED:
        values = np.asarray(measured[metric], np.float64)
        row[metric] = float(values.mean())
        if values.ndim:
          row[f"{metric}_stderr"] = standard_error(values)
      row.update({k: v for k, v in measured.items() if k not in COMPARED})
      rows.append(row)
  differences = []
  for metric in COMPARED:
    per_seed = {
      f"tuned_for_{arm}": np.stack([np.asarray(e[arm][metric], np.float64) for e in evaluations])
      for arm in ("training", "Q")
    }
    (row,) = stats.pairwise_table(per_seed, "tuned_for_Q", confidence)
    means = {name: float(stats.mean_interval(values, confidence).mean) for name, values in per_seed.items()}
    differences.append({"metric": metric, **means, **row})
  return rows, differences

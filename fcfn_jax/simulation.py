"""The simulation loop: mechanism -> budgets -> noise multipliers -> DP FedAvg rounds -> evaluation.

One experiment (docs/model.md "What it is"):
  1. Clients are the data partition's clients; their quality weights are w_i = n_i / mean(n) and their
     private per-unit privacy costs c_i ~ Uniform[cost_low, cost_high] (seeded, fold_in of the run key).
  2. The mechanism (GameConfig.mechanism) sets every client's total budget eps_i and payment, on the game
     :func:`game_of` builds from the config (the valuation sees the run's steps, delta and sampling rates).
  3. eps_i -> noise multiplier z_i for the whole run (T rounds x S local steps of the configured sampler,
     sampling rate q_i = min(1, B / n_i)), once per experiment in :func:`prepare`, by the configured map:
     'exact' inverts dp-accounting's accountant (numpy float64), 'traced' and 'surrogate' evaluate the
     tight traced RDP accountant or the closed-form surrogate (jax, float64); once per distinct input of
     the map, then scattered back. Every map accounts the sampler that runs (events.dp_event), and its
     z_i is rounded up to float32 (:func:`trainable_noise`): the value every round trains with and the
     ledger accounts. Clients with eps_i = 0 sit out: z_i = inf, weight 0, no payment.
  4. The server aggregates with the game's weights a_i (``valuation.aggregation_weights``: noise-aware by
     default, docs/model.md "Aggregation"), so the model trained is the one the valuation Q values; they
     reach the round as its per-client ``weights`` a_i / n_i (the round weighs client i by weight_i n_i).
  5. T rounds of :func:`fcfn_jax.federated.federated_round` over the participants only, evaluated on the
     test split; every K rounds the state (model, optimizer, round, key, per-client privacy ledger) is
     checkpointed atomically, and a run restarted with the same config resumes from the newest checkpoint
     with identical results.

:func:`mechanism_round` is the differentiable variant: one program that solves the game, maps eps -> z
('surrogate' or 'traced') and trains one round on every client, for studies that need the round as a
function of the game's inputs.

Resume (README "Resume, fingerprints and corrupt checkpoints"; :mod:`fcfn_jax.resume`): every checkpoint
carries the run's fingerprint (:func:`~fcfn_jax.resume.run_fingerprint`: every config field that can
change results, the data's digest, the state layout version); a checkpoint with another fingerprint is
refused, or moved aside with ``restart_on_mismatch``, so a resumed run never mixes two configs, and its
round counter, history and privacy ledger are checked to agree before it continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from fcfn_jax import checkpoint, data, distributed, federated, fingerprint, models
from fcfn_jax.config import MECHANISM_LABELS, GameConfig, ModelConfig, SimulationConfig
from fcfn_jax.game import baselines, misreport, valuation
from fcfn_jax.game.outcome import Outcome
from fcfn_jax.game.spec import Game, GameSpec, make_game, spec_from_config
from fcfn_jax.privacy import calibration, events, ledger, traced
from fcfn_jax.report import Timer
from fcfn_jax.resume import OTHER_RUN as OTHER_RUN
from fcfn_jax.resume import STATE_LAYOUT_VERSION as STATE_LAYOUT_VERSION
from fcfn_jax.resume import check_checkpoint, check_resumed, data_digest, run_fingerprint
from fcfn_jax.validate import require

COST_STREAM = 1  # fold_in tags of the run key's independent streams
INIT_STREAM = 2
TRAIN_STREAM = 3
# The game-level columns of a summary row (deterministic per seed: the mechanism's outcome, not training).
GAME_COLUMNS = (
  "quality",
  "server_utility",
  "mean_client_utility",
  "social_welfare",
  "average_utility",
  "participants",
  "total_payment",
  "mean_epsilon",
  "min_epsilon",
)

logger = logging.getLogger(__name__)


class SimState(NamedTuple):
  """Everything a resumed run needs: server model/optimizer/round and the per-client privacy ledger.

  server: federated.ServerState. steps_done: int32 [clients], DP-SGD steps each client has run so far.
  """

  server: federated.ServerState
  steps_done: chex.Array


class Experiment(NamedTuple):
  """A prepared experiment (host side): data, model, the clients' game and their noise multipliers.

  costs, weights, sampling_rates: [clients]. outcome: the mechanism's Outcome (budgets eps_i [clients]).
  sampler: the rounds' events.Sampler. overflow: p_i [clients], the probability that some step of
    client i's run overflows B_max (0 for 'fixed'); the 'traced' and 'surrogate' maps pay (1 + e^eps_i)
    p_i from delta.
  noise_multipliers: z_i [clients] float64 holding float32 values (:func:`trainable_noise`): what every
    round trains with and the ledger accounts (inf = sits out).
  aggregation_weights: a_i [clients], the server's weights of the clients' updates (0 = sits out).
  train_pool: the clients that train (z_i < inf), on device, in client order.
  mesh: None in a single process; with several processes (docs/model.md "Multi-host") the client mesh
    over every process's devices: train_pool is then split over it (each process holds only its own
    block, padded with clients that have no examples) and every round meets in one all-reduce.
  """

  cfg: SimulationConfig
  data: data.FederatedData
  apply_fn: Any
  costs: np.ndarray
  weights: np.ndarray
  sampling_rates: np.ndarray
  sampler: events.Sampler
  overflow: np.ndarray
  outcome: Outcome
  noise_multipliers: np.ndarray
  aggregation_weights: np.ndarray
  train_pool: data.ClientPool
  mesh: jax.sharding.Mesh | None = None


@functools.cache
def model_of(model_cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
  """``models.make_model``, one module instance per architecture: jit caches on ``model.apply``, so reuse
  avoids recompiles (what :func:`prepare`, :func:`init_state` and ``hypergrad`` build their model with)."""
  return models.make_model(model_cfg, input_shape, num_classes)


def total_steps(cfg: SimulationConfig) -> int:
  """k = T * S, the DP-SGD steps of each participating client over the whole run."""
  return cfg.federated.rounds * cfg.federated.local_steps


def training_key(cfg: SimulationConfig) -> chex.PRNGKey:
  """The key of the rounds' sampling and noise: fold_in(fold_in(PRNGKey(seed), TRAIN), draw)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), TRAIN_STREAM), cfg.draw)


def client_costs(key: chex.PRNGKey, num_clients: int, game: GameConfig) -> np.ndarray:
  """Per-unit privacy costs c_i ~ Uniform[cost_low, cost_high]: float64 [clients] (seeded)."""
  # float32 draws whatever the x64 mode, so the same seed gives the same costs everywhere.
  u = np.asarray(
    jax.random.uniform(jax.random.fold_in(key, COST_STREAM), (num_clients,), jnp.float32), np.float64
  )
  return game.cost_low + (game.cost_high - game.cost_low) * u


def quality_weights(num_examples: np.ndarray) -> np.ndarray:
  """w_i = d_i / mean(d): float64 [clients] (docs/model.md "The game")."""
  d = np.asarray(num_examples, np.float64)
  return d / d.mean()


def game_of(
  cfg: SimulationConfig, costs: chex.Array, weights: chex.Array, num_examples: chex.Array, dtype=None
) -> tuple[Game, GameSpec]:
  """The game the run plays (docs/model.md "The game"): the clients' costs, quality weights and sampling
  rates with the GameConfig's scalars (and, for noise_model='accountant', the clients' noise table), and
  the spec with the run's DP-SGD steps and delta."""
  rates = events.sampling_rates(jnp.asarray(num_examples), cfg.federated.batch_size)
  spec = spec_from_config(cfg.game, total_steps(cfg), cfg.privacy.delta)
  return valuation.with_noise_table(make_game(costs, weights, rates, cfg.game, dtype), spec), spec


def round_weights(aggregation: chex.Array, num_examples: chex.Array) -> chex.Array:
  """The round's per-client ``weights`` a_i / n_i: [clients], so that its weight_i n_i is a_i."""
  return aggregation / num_examples


def trainable_noise(z: chex.Array, xp=np) -> chex.Array:
  """The least float32 value >= z_i, elementwise: float32 [...] (inf stays inf).

  The round trains in float32, so the z_i it trains with is this rounding of the calibrated one, never
  below it: more noise than the map asked for, so still within the budget; the ledger accounts this value
  itself. ``xp``: ``np`` on the host, ``jnp`` inside a program.
  """
  z = xp.asarray(z)
  nearest = z.astype(xp.float32)
  return xp.where(nearest < z, xp.nextafter(nearest, xp.float32(np.inf)), nearest)


def _program_noise(
  budgets: chex.Array, sampling_rates: chex.Array, overflow: chex.Array, cfg: SimulationConfig
) -> chex.Array:
  """z_i of the jax map ('surrogate' or 'traced') for the run's sampler; inf where eps_i = 0."""
  return traced.program_noise(
    budgets,
    sampling_rates,
    overflow,
    total_steps(cfg),
    cfg.privacy.delta,
    cfg.privacy.sampling,
    cfg.privacy.calibration,
  )


CALIBRATION_ROWS = 32  # calibrate's least padded row count: small runs of any N share one program


def calibrate(
  eps: np.ndarray,
  num_examples: np.ndarray,
  overflow: np.ndarray,
  cfg: SimulationConfig,
  sampler: events.Sampler,
) -> np.ndarray:
  """z_i = :func:`trainable_noise` of the configured map at eps_i > 0: float64 [clients] of float32 values.

  'exact': ``calibration.calibrate_noise_multipliers`` (one search per distinct (n_i, eps_i): the event
  depends on n_i beyond q_i). 'traced' / 'surrogate': the jax map in float64, once per distinct (eps_i,
  q_i, p_i) (the run's T x S steps are every client's), scattered back; inf where it certifies nothing.

  Args:
    eps: budgets eps_i > 0 [clients]. num_examples: n_i [clients]. overflow: p_i [clients]
      (``events.overflow_probability``). cfg: the run. sampler: its events.Sampler.
  """
  privacy = cfg.privacy
  if privacy.calibration == "exact":
    z = calibration.calibrate_noise_multipliers(
      eps, num_examples, total_steps(cfg), privacy.delta, sampler, privacy.accountant
    )
  else:
    rates = np.asarray(events.sampling_rates(num_examples, cfg.federated.batch_size), np.float64)
    _, first, inverse = np.unique(
      np.stack([eps, rates, overflow], axis=1), axis=0, return_index=True, return_inverse=True
    )
    # Padded to a power of two, at least CALIBRATION_ROWS (repeating a row): few compiled programs whatever
    # the distinct count (the map is elementwise: a row's z does not depend on the padding).
    size = max(1 << max(len(first) - 1, 0).bit_length(), CALIBRATION_ROWS)
    rows = np.pad(first, (0, size - len(first)), mode="edge")
    with jax.enable_x64(True):
      distinct = np.asarray(_program_noise(eps[rows], rates[rows], overflow[rows], cfg), np.float64)
    z = distinct[inverse.reshape(-1)]
  return np.asarray(trainable_noise(z), np.float64)


@functools.partial(jax.jit, static_argnames=("apply_fn", "cfg", "mesh"))
def mechanism_round(
  state: SimState,
  pool: data.ClientPool,
  costs: chex.Array,
  weights: chex.Array,
  overflow: chex.Array,
  key: chex.PRNGKey,
  *,
  apply_fn,
  cfg: SimulationConfig,
  mesh: jax.sharding.Mesh | None = None,
):
  """ONE traced program: solve the mechanism, map eps -> z ('surrogate' or 'traced'), run one DP round
  on every client aggregated with the game's weights a_i; differentiable in the game's inputs.

  :func:`run` does not use it (it calibrates once in :func:`prepare` and trains the participants only);
  it is the round as a function of the costs and weights, solved in the inputs' dtype each call.

  Args:
    state: SimState at round t. pool: all clients' data (with ``mesh``: [padded clients] split over it,
      e.g. ``federated.shard_clients``). costs, weights: c_i, w_i [clients]. overflow: p_i [clients]
      (``Experiment.overflow``). key: the run's training key. apply_fn, cfg: static.
    mesh: static client mesh of the round, or None.

  Returns:
    (SimState at t + 1, federated.RoundMetrics, Outcome, z): z float32 [clients] the noise multipliers
    the round trained with (:func:`trainable_noise` of the map's; inf = sat out), for the ledger.
  """
  num_examples = jnp.asarray(pool.num_examples[: costs.shape[0]], costs.dtype)  # without mesh padding
  game, spec = game_of(cfg, costs, weights, num_examples, costs.dtype)
  outcome = baselines.solve(game, spec)
  z = trainable_noise(_program_noise(outcome.budgets, game.sampling_rates, overflow, cfg), jnp)
  joined = jnp.isfinite(z)
  aggregation = valuation.aggregation_weights(outcome.budgets, game, spec)
  round_z, round_w = z, round_weights(aggregation, num_examples).astype(jnp.float32)
  if pool.y.shape[0] > costs.shape[0]:
    round_z, round_w = federated.pad_sit_outs(round_z, round_w, pool.y.shape[0])
  server, metrics = federated.federated_round(
    state.server,
    pool,
    round_z,
    round_w,
    key,
    apply_fn=apply_fn,
    fed=cfg.federated,
    privacy=cfg.privacy,
    mesh=mesh,
  )
  steps_done = state.steps_done + jnp.where(joined, cfg.federated.local_steps, 0).astype(jnp.int32)
  return SimState(server=server, steps_done=steps_done), metrics, outcome, z


def participants_round(exp: Experiment, state: SimState, key: chex.PRNGKey):
  """One DP round over the participants only, with the calibrated z_i and the game's weights a_i.

  Clients with eps_i = 0 would contribute nothing, so they are left out of the batch rather than computed
  and masked; the round's program depends only on the federated/privacy configs and the participant
  count, so mechanisms with equal counts share it.
  """
  cfg = exp.cfg
  joined = np.isfinite(exp.noise_multipliers)
  if not joined.any():  # nobody sells privacy: the model stays as it is
    server = state.server._replace(round=state.server.round + 1)
    return state._replace(server=server), federated.RoundMetrics(jnp.nan, jnp.nan, jnp.zeros((), jnp.int32))
  n = np.asarray(exp.data.pool.num_examples, np.float64)
  z = exp.noise_multipliers[joined].astype(np.float32)
  w = round_weights(exp.aggregation_weights[joined], n[joined]).astype(np.float32)
  if exp.mesh is not None:
    z, w = federated.pad_sit_outs(z, w, exp.train_pool.y.shape[0], xp=np)
  server, metrics = federated.federated_round(
    state.server,
    exp.train_pool,
    jnp.asarray(z),
    jnp.asarray(w),
    key,
    apply_fn=exp.apply_fn,
    fed=cfg.federated,
    privacy=cfg.privacy,
    mesh=exp.mesh,
  )
  steps_done = state.steps_done + jnp.asarray(np.where(joined, cfg.federated.local_steps, 0), jnp.int32)
  return SimState(server=server, steps_done=steps_done), metrics


def _check_unmet_budgets(
  eps: np.ndarray,
  z: np.ndarray,
  light: np.ndarray,
  overflow: np.ndarray,
  rates: np.ndarray,
  cfg: SimulationConfig,
  sampler: events.Sampler,
) -> None:
  """Why the map gave z_i = inf to a budget eps_i > 0 (all [clients]; ``light``: too light to change the
  float32 aggregate, skipped), and what happens ('traced' and 'surrogate'; 'exact' refuses such budgets).

  Two causes. The truncation charge (1 + e^eps) p >= delta leaves no delta to spend: a configuration
  error (B_max too small for this budget), refused naming it. A budget that needs more noise than the top
  of ``calibration.CALIBRATION_Z_RANGE`` (at or just above the RDP conversion's floor, 0.0035 at delta =
  1e-5 for the largest order 1024): the client sits out (z = inf releases nothing, within any budget);
  a warning says so, and its clients.csv row reads noise_multiplier = inf, epsilon_spent = 0.
  """
  unmet = (eps > 0) & np.isinf(z) & ~light
  charged = unmet & (events.charged_delta(eps, cfg.privacy.delta, overflow) <= 0)
  bad = np.flatnonzero(charged)
  require(
    not bad.size,
    f"eps[{bad[0] if bad.size else 0}]={float(eps[bad[0]]) if bad.size else 0.0!r} cannot be certified by "
    f"calibration={cfg.privacy.calibration!r} at batch_capacity={sampler.capacity}: the truncation "
    "charge (1 + e^eps) P[some step overflows] exceeds delta; raise batch_capacity",
  )
  out_of_range = np.flatnonzero(unmet)
  if out_of_range.size:
    i = out_of_range[0]
    logger.warning(
      "%d client(s) sit out (z = inf): their budgets need more noise than z = %g (calibration=%r, "
      "delta=%g, %d steps), e.g. eps[%d]=%r at sampling rate %.4g",
      out_of_range.size,
      calibration.CALIBRATION_Z_RANGE[1],
      cfg.privacy.calibration,
      cfg.privacy.delta,
      total_steps(cfg),
      i,
      float(eps[i]),
      float(rates[i]),
    )


def prepare(
  cfg: SimulationConfig, fed_data: data.FederatedData | None = None, *, cost_factors: np.ndarray | None = None
) -> Experiment:
  """Loads data (unless given), draws costs, solves the mechanism and calibrates z_i once (:func:`calibrate`).

  cost_factors: m_i >= 1 [clients] or None (honest). Client i reports the cost m_i c_i; the mechanism is
    solved on the reports and the outcome accounted with the true c_i (``misreport.misreported_outcome``).
  """
  fed_data = data.load_federated(cfg.data) if fed_data is None else fed_data
  key = jax.random.PRNGKey(cfg.seed)
  n = np.asarray(fed_data.pool.num_examples)
  costs = client_costs(key, n.shape[0], cfg.game)
  weights = quality_weights(n)
  sampler = events.sampler_of(cfg.federated, cfg.privacy)
  overflow = events.overflow_probability(n, total_steps(cfg), sampler)
  with jax.enable_x64(True):
    game, spec = game_of(cfg, costs, weights, n)
    rates = np.asarray(game.sampling_rates)
    outcome = (
      baselines.solve(game, spec)
      if cost_factors is None
      else misreport.misreported_outcome(game, spec, cost_factors)
    )
    aggregation = np.asarray(valuation.aggregation_weights(outcome.budgets, game, spec))
    outcome = jax.tree.map(np.asarray, outcome)
  eps = outcome.budgets
  require(np.all(np.isfinite(eps)), f"mechanism {cfg.game.mechanism!r} returned non-finite budgets {eps}")
  # A participant whose aggregation weight is below float32's epsilon relative to the largest cannot
  # change the float32 aggregate: it is not trained (z = inf releases nothing, within any budget), which
  # spares the maps budgets like 1e-11 (a client just inside the participation threshold).
  light = aggregation < np.finfo(np.float32).eps * aggregation.max(initial=0.0)
  calibrated = np.flatnonzero((eps > 0) & ~light)
  z = np.full(eps.shape, np.inf)
  if calibrated.size:
    z[calibrated] = calibrate(eps[calibrated], n[calibrated], overflow[calibrated], cfg, sampler)
  _check_unmet_budgets(eps, z, light, overflow, rates, cfg, sampler)
  trains = np.isfinite(z)
  aggregation = np.where(trains, aggregation, 0.0) / max(aggregation[trains].sum(), 1e-300)
  model = model_of(cfg.model, fed_data.input_shape, fed_data.num_classes)
  rows = np.flatnonzero(trains)
  mesh = federated.client_mesh() if distributed.is_multiprocess() else None
  if mesh is None:
    train_pool = jax.device_put(jax.tree.map(lambda a: a[rows], fed_data.pool))
  else:  # each process puts only its own block of the training clients on its devices
    train_pool = federated.shard_clients(
      mesh, max(len(rows), 1), lambda block: jax.tree.map(lambda a: a[rows[block]], fed_data.pool)
    )
  return Experiment(
    cfg=cfg,
    data=fed_data,
    apply_fn=model.apply,
    costs=costs,
    weights=weights,
    sampling_rates=rates,
    sampler=sampler,
    overflow=overflow,
    outcome=outcome,
    noise_multipliers=z,
    aggregation_weights=aggregation,
    train_pool=train_pool,
    mesh=mesh,
  )


def init_state(exp: Experiment) -> SimState:
  """Round-0 state: freshly initialized model (seeded), empty privacy ledger."""
  cfg = exp.cfg
  model = model_of(cfg.model, exp.data.input_shape, exp.data.num_classes)
  params = models.init_params(
    model, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), INIT_STREAM), exp.data.input_shape
  )
  return SimState(
    server=federated.init_server_state(params, cfg.federated),
    steps_done=jnp.zeros(exp.costs.shape, jnp.int32),
  )


def privacy_spent(exp: Experiment, steps_done: np.ndarray) -> np.ndarray:
  """epsilon each client has spent so far [clients] by dp-accounting (0 for clients that sat out)."""
  cfg = exp.cfg
  spent = np.zeros(exp.costs.shape)
  joined = np.isfinite(exp.noise_multipliers) & (np.asarray(steps_done) > 0)
  if joined.any() and cfg.privacy.private:
    spent[joined] = ledger.epsilon_spent(
      exp.noise_multipliers[joined],
      np.asarray(exp.data.pool.num_examples)[joined],
      np.asarray(steps_done)[joined],
      cfg.privacy.delta,
      exp.sampler,
      cfg.privacy.accountant,
    )
  return spent


@dataclasses.dataclass
class RunResult:
  """One experiment: the rounds' history rows, the final summary row, one privacy record per client
  (:func:`client_rows`) and the final state."""

  history: list[dict[str, Any]]
  summary: dict[str, Any]
  clients: list[dict[str, Any]]
  state: SimState


class Comparison(NamedTuple):
  """The tables of :func:`compare`: one summary row per mechanism, the per-round history rows, and one
  privacy record per (mechanism, client) (what ``clients.csv`` holds)."""

  summary: list[dict[str, Any]]
  history: list[dict[str, Any]]
  clients: list[dict[str, Any]]


def client_rows(exp: Experiment, steps_done: np.ndarray, spent: np.ndarray) -> list[dict[str, Any]]:
  """One record per client of what ran: enough to recompute its privacy claim without the simulator.

  client: row of the (size-sorted) pool; num_examples n_i; cost c_i; budget_epsilon eps_i sold;
  noise_multiplier z_i (inf = sat out); sampling_rate q_i = min(1, B / n_i); steps: DP-SGD steps taken;
  sampler, batch_size B, batch_capacity B_max (the step's slots), delta and accountant: the rest of what
  ``events.dp_event`` needs; epsilon_spent: the accountant's epsilon of those steps at ``delta``
  (0 for clients that sat out). Adjacency: add/remove one example for 'poisson', replace one for 'fixed'.
  """
  cfg = exp.cfg
  n = np.asarray(exp.data.pool.num_examples)
  return [
    {
      "mechanism": cfg.game.mechanism,
      "client": i,
      "num_examples": int(n[i]),
      "cost": float(exp.costs[i]),
      "budget_epsilon": float(exp.outcome.budgets[i]),
      "noise_multiplier": float(exp.noise_multipliers[i]),
      "sampling_rate": float(exp.sampling_rates[i]),
      "steps": int(steps_done[i]),
      "sampler": exp.sampler.kind,
      "batch_size": exp.sampler.batch_size,
      "batch_capacity": exp.sampler.capacity,
      "delta": cfg.privacy.delta,
      "accountant": cfg.privacy.accountant,
      "epsilon_spent": float(spent[i]),
    }
    for i in range(len(n))
  ]


def summary_row(exp: Experiment, accuracy: float, wall_time: float, spent: np.ndarray) -> dict[str, Any]:
  """One comparison-table row: the mechanism's valuation Q, utilities (``outcome.AVERAGE_UTILITY`` defines
  the average) and the trained model's accuracy; ``label`` names no_incentive a mandate. An outcome that
  buys nothing says why in ``note`` and leaves its non-finite values (-inf under 'dp') empty (None)."""
  o = exp.outcome
  eps = np.asarray(o.budgets)
  joined = eps > 0
  game = exp.cfg.game
  note = baselines.no_market(game.mechanism, game.num_aggregators, len(eps), int(o.participants))
  row = {
    "mechanism": exp.cfg.game.mechanism,
    "label": MECHANISM_LABELS[exp.cfg.game.mechanism],
    "quality": float(o.quality),
    "server_utility": float(o.server_utility),
    "mean_client_utility": float(o.mean_client_utility),
    "social_welfare": float(o.social_welfare),
    "average_utility": float(o.average_utility),
    "participants": int(o.participants),
    "total_payment": float(o.total_payment),
    "mean_epsilon": float(eps[joined].mean()) if joined.any() else 0.0,
    "min_epsilon": float(eps[joined].min()) if joined.any() else 0.0,
    "max_epsilon_spent": float(spent.max()) if spent.size else 0.0,
    "median_noise_multiplier": (
      float(np.median(exp.noise_multipliers[joined])) if joined.any() else float("inf")
    ),
    "test_accuracy": accuracy,
    "wall_time_s": wall_time,
    "note": note,
  }
  if note:
    row = {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in row.items()}
  return row


def run(
  cfg: SimulationConfig,
  *,
  fed_data: data.FederatedData | None = None,
  progress: bool = True,
  stop_after: int | None = None,
  cost_factors: np.ndarray | None = None,
  restart_on_mismatch: bool = False,
) -> RunResult:
  """Runs (or resumes, when cfg.checkpoint_dir holds a checkpoint of this run) one experiment.

  Args:
    cfg: the experiment. fed_data: preloaded data (e.g. shared across mechanisms); None = load it.
    progress: show a progress bar over rounds.
    stop_after: stop after this round (a deliberate interruption, for resume tests); None = run all.
    cost_factors: clients' cost exaggeration factors [clients] (see :func:`prepare`); None = honest.
    restart_on_mismatch: a checkpoint of another run in cfg.checkpoint_dir is moved aside (see
      :func:`check_checkpoint`) instead of refused.

  Raises:
    ConfigError: cfg.checkpoint_dir holds another run (and not restart_on_mismatch), or an inconsistent
      step; bad inputs.
  """
  with Timer() as timer, contextlib.ExitStack() as stack:
    fed_data = data.load_federated(cfg.data) if fed_data is None else fed_data
    parts: fingerprint.Fingerprint | None = None
    if cfg.checkpoint_dir:
      parts = run_fingerprint(cfg, data_digest(fed_data), cost_factors)
      check_checkpoint(cfg, parts, restart_on_mismatch=restart_on_mismatch)
    exp = prepare(cfg, fed_data, cost_factors=cost_factors)
    state = init_state(exp)
    history: list[dict[str, Any]] = []
    ckpt = stack.enter_context(checkpoint.Checkpointer(cfg.checkpoint_dir)) if cfg.checkpoint_dir else None
    if ckpt is not None:
      restored = ckpt.restore(state)
      if restored is not None:
        state, history = restored.state, list(restored.metadata.get("history", []))
        check_resumed(cfg, restored, history)
    train_key = training_key(cfg)
    test = exp.data.test
    start = int(state.server.round)
    rounds = range(start, cfg.federated.rounds)
    bar = tqdm.tqdm(rounds, desc=cfg.game.mechanism, disable=not progress, leave=False)
    for t in bar:
      state, metrics = participants_round(exp, state, train_key)
      accuracy, loss = federated.evaluate(
        state.server.params, test.x, test.y, exp.apply_fn, federated.EVAL_BATCH
      )
      history.append(
        {
          "mechanism": cfg.game.mechanism,
          "round": t + 1,
          "test_accuracy": float(accuracy),
          "test_loss": float(loss),
          "train_loss": float(metrics.train_loss),
          "clip_fraction": float(metrics.clip_fraction),
          "participants": int(metrics.participants),
        }
      )
      bar.set_postfix(acc=f"{float(accuracy):.3f}")
      done = t + 1
      periodic = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
      if ckpt is not None and (periodic or done == cfg.federated.rounds):
        ckpt.save(done, state, {"history": history, "round": done, "fingerprint": parts})
      if stop_after is not None and done >= stop_after:
        break
    # The ledger is replicated (every process computes the same z_i); gathered to host memory whole.
    steps_done = np.asarray(distributed.gather(state.steps_done))
    spent = privacy_spent(exp, steps_done)
    accuracy = history[-1]["test_accuracy"] if history else float("nan")
  return RunResult(
    history=history,
    summary=summary_row(exp, accuracy, timer.elapsed, spent),
    clients=client_rows(exp, steps_done, spent),
    state=state,
  )


def compare(
  cfg: SimulationConfig,
  mechanisms: tuple[str, ...],
  *,
  progress: bool = True,
  fed_data: data.FederatedData | None = None,
  restart_on_mismatch: bool = False,
) -> Comparison:
  """Runs ``cfg`` once per mechanism on the same clients and data: summary, history and client rows.

  Each summary row gains ``redundant_accuracy_loss`` = accuracy(social optimum budgets) - accuracy(row's
  budgets) (docs/model.md "Metrics"); the social optimum is run too when it is not among ``mechanisms``.
  With ``cfg.checkpoint_dir`` = D, mechanism m checkpoints into ``D/<m>`` and resumes from it; every
  mechanism's checkpoint is checked (:func:`check_checkpoint`) before any of them trains, so a refusal
  comes before any work.
  """
  fed_data = data.load_federated(cfg.data) if fed_data is None else fed_data
  configs = {
    mech: dataclasses.replace(
      cfg,
      game=dataclasses.replace(cfg.game, mechanism=mech),
      checkpoint_dir=os.path.join(cfg.checkpoint_dir, mech) if cfg.checkpoint_dir else None,
    )
    for mech in dict.fromkeys(mechanisms + ("social_optimum",))
  }
  if cfg.checkpoint_dir:
    digest = data_digest(fed_data)
    for mech_cfg in configs.values():
      check_checkpoint(mech_cfg, run_fingerprint(mech_cfg, digest), restart_on_mismatch=restart_on_mismatch)
  runs = {mech: run(mech_cfg, fed_data=fed_data, progress=progress) for mech, mech_cfg in configs.items()}
  best = runs["social_optimum"].summary["test_accuracy"]
  summary = [
    dict(runs[m].summary, redundant_accuracy_loss=best - runs[m].summary["test_accuracy"]) for m in mechanisms
  ]
  history = [row for m in mechanisms for row in runs[m].history]
  clients = [row for m in mechanisms for row in runs[m].clients]
  return Comparison(summary=summary, history=history, clients=clients)

"""Tune the server's payment and prices by Adam on the implicit hypergradient (``fcfn_jax.game.tuning``).

One game of --num_clients clients (costs ~ Uniform[--cost_low, --cost_high], data sizes ~ Uniform[1,
--weight_spread], seeded by --seed) is priced with --price_groups groups (clients ranked by data weight,
split into equal groups; 1 = one uniform price, i.e. only the payment R is tuned). Adam on (log R,
log pi) starts from --start_payment, or from the best point of a --grid_points log-grid over the uniform
payment when it is 0. Also reported: the grid's best uniform payment, ``leader.solve_leader`` with the
same groups and, for --valuation=log, the closed form R* = max(0, lam - K_S / (|S|-1)) with the tuned
payment's absolute error |R - R*| and, where R* > 0, its relative error.

--objective=trained (issue 23) prices against the trained model instead of Q, tuned-for-Q vs
tuned-for-training side by side over --seeds seeds (--seed, --seed + 1, ...; each draws the costs, the
partition and the initial model; the seeds share one pool capacity and one compiled program). Per seed the
game is the data's (--num_clients clients of the embedded FEMNIST digits, costs and weights as
``simulation.prepare`` draws them), and Adam on log R maximizes U = lambda_acc (-validation loss after T
rounds) - R (``fcfn_jax.hypergrad``, --draws noise draws, uniform prices) from the Q-optimal R*
(``leader.solve_leader``). Both R are then evaluated on --draws held-out noise draws (keys the tuning
never saw): U, test accuracy on the test split left after the validation split, payment, validation loss,
lam Q - R. Outputs: comparison.{csv,json,md} (one row per seed x arm), differences.{csv,json,md} (tuned-
for-training minus tuned-for-Q paired by seed, draws averaged per seed, 95% t intervals over the seeds:
``fcfn_jax.stats``; a verdict needs stats.MIN_SEEDS seeds), trajectory.{csv,json,md} (per seed and step),
objective_along_R.{csv,json,md,png} (the first seed: U on the held-out draws at --plot_points payments
around both R, with a standard-error band and the hypergradient as tangents) and summary.json ('traced'
calibration; 'exact' is replaced by it). Example:

  python scripts/tune_pricing.py --objective=trained --seeds=5 --num_clients=12 --rounds=5 \
      --local_steps=2 --steps=20 --draws=4 --out=results/tune_trained

Outputs in --out (written whole at the end): trajectory.{csv,json,md} (one row per step), summary.json,
trajectory.png (objective and parameters per step) and manifest.json. Example (about a minute on a CPU):

  python scripts/tune_pricing.py --valuation=dp --price_groups=4 --lam=200 --eps_max=50 --out=results/tune
  python scripts/tune_pricing.py --valuation=log --price_groups=1 --lam=20 --eps_max=1000 --nosafeguard \
      --learning_rate=0.2 --decay_steps=50 --steps=1000 --start_payment=1 --out=results/tune_log
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from fcfn_jax import config as fc
from fcfn_jax import data, federated, hypergrad, plotting, report, stats, study, validate
from fcfn_jax.game import equilibrium, leader, sweep, tuning
from fcfn_jax.game.spec import Game, GameSpec

import sim_flags

# One game, no data or model: the quality's noise variance needs delta and the steps T x S.
SIM = sim_flags.ConfigFlags(
  fc.SimulationConfig, skip=("data", "model", "game.mechanism", "checkpoint_dir", "checkpoint_every")
)
RUN = sim_flags.ConfigFlags(fc.RunConfig, skip=sim_flags.CHECKPOINT_FLAGS)
flags.DEFINE_integer("num_clients", 12, "Clients in the game.")
flags.DEFINE_integer(
  "price_groups",
  4,
  "Price groups by data-weight rank, in [1, num_clients] (1 = uniform price; num_clients = one per client).",
)
flags.DEFINE_integer("steps", 300, "Adam steps.")
flags.DEFINE_float("learning_rate", 0.05, "Adam's initial step on (log R, log pi).")
flags.DEFINE_integer("decay_steps", 60, "The step halves every decay_steps steps.")
flags.DEFINE_float("start_payment", 0.0, "Initial R (> 0), or 0 = the best point of the uniform grid.")
flags.DEFINE_integer("grid_points", 200, "Points of the log-grid over the uniform payment.")
flags.DEFINE_bool(
  "safeguard",
  True,
  "Reject Adam steps that lower U_s: needed where U_s has kinks (a cap starts to bind, "
  "a client enters); on a smooth U_s it slows the final convergence (momentum "
  "overshoots get rejected), so use --nosafeguard there.",
)
flags.DEFINE_float(
  "weight_spread", 4.0, "Data sizes d_i ~ Uniform[1, weight_spread] (finite, >= 1), w = d / mean(d)."
)
flags.DEFINE_enum(
  "objective",
  "proxy",
  ["proxy", "trained"],
  "proxy: lam Q - R on a drawn game; trained: lambda_acc (-validation loss of the trained model) - R.",
)
flags.DEFINE_integer("draws", 4, "--objective=trained: noise draws averaged per hypergradient (>= 2).")
flags.DEFINE_integer(
  "seeds",
  5,
  "--objective=trained: seeds compared, --seed .. --seed + seeds - 1 (each draws the costs, the partition "
  "and the initial model; >= 2, a verdict needs stats.MIN_SEEDS = 3).",
)
flags.DEFINE_integer(
  "plot_points", 7, "--objective=trained: payments of objective_along_R.png besides R*_Q and R*_trained."
)
flags.DEFINE_float("lambda_acc", 100.0, "--objective=trained: payment units per nat of validation loss.")
FLAGS = flags.FLAGS
FLAGS.set_default("out", "results/tune")
FLAGS.set_default("lam", 200.0)
FLAGS.set_default("eps_max", 50.0)
_MAX = 10**6
_COMPARISON_COLUMNS = (
  "seed",
  "tuned_for",
  "R",
  "payment",
  "trained_objective",
  "trained_objective_stderr",
  "test_accuracy",
  "validation_loss",
  "proxy_utility",
  "participants",
)
_DIFFERENCE_COLUMNS = (
  "metric",
  "tuned_for_Q",
  "tuned_for_training",
  "mean_difference",
  "ci_low",
  "ci_high",
  "seeds",
  "verdict",
)


def _problem() -> tuple[Game, GameSpec, jax.Array, fc.SimulationConfig]:
  """The game, its spec, the price group of each client and the config; raises ConfigError naming a bad
  flag."""
  cfg = SIM.value({"game.mechanism": "stackelberg"})
  # Caps far above any useful run keep a typo from allocating the machine away (the grid solves
  # grid_points games of num_clients clients; the trajectory keeps steps x price_groups values).
  validate.check_int("num_clients", FLAGS.num_clients, minimum=2, maximum=_MAX)
  validate.check_int("price_groups", FLAGS.price_groups)
  validate.require(
    FLAGS.price_groups <= FLAGS.num_clients,
    f"price_groups={FLAGS.price_groups} is invalid for num_clients={FLAGS.num_clients}: expected an "
    f"integer in [1, {FLAGS.num_clients}] (every price group needs a client)",
  )
  validate.check_int("steps", FLAGS.steps, maximum=_MAX)
  validate.check_positive("learning_rate", FLAGS.learning_rate)
  validate.check_int("decay_steps", FLAGS.decay_steps)
  validate.check_nonnegative("start_payment", FLAGS.start_payment)
  validate.check_int("grid_points", FLAGS.grid_points, minimum=2, maximum=_MAX)
  validate.check_finite("weight_spread", FLAGS.weight_spread)  # inf would surface as weights[0]=nan
  validate.require(
    FLAGS.weight_spread >= 1, f"weight_spread={FLAGS.weight_spread!r} is invalid: expected a number >= 1"
  )
  game_cfg = cfg.game
  settings = sweep.SweepSettings(
    game=game_cfg,
    num_clients=FLAGS.num_clients,
    weight_spread=FLAGS.weight_spread,
    batch_size=cfg.federated.batch_size,
    steps=cfg.federated.rounds * cfg.federated.local_steps,
    delta=cfg.privacy.delta,
  )
  configs = sweep.make_grid(
    [0], [game_cfg.lam], [(game_cfg.cost_low, game_cfg.cost_high)], [game_cfg.eps_max], jnp.float64
  )
  game = sweep.draw_game(jax.random.PRNGKey(cfg.seed), jax.tree.map(lambda a: a[0], configs), settings)
  rank = jnp.argsort(jnp.argsort(game.weights))
  groups = rank * FLAGS.price_groups // FLAGS.num_clients
  return game, settings.spec("stackelberg"), groups, cfg


def _tune(game: Game, spec: GameSpec, groups: jax.Array) -> tuple[dict, list]:
  """Grid, Adam and solve_leader on the game: the summary dict and one trajectory row per Adam step."""
  with jax.enable_x64(True):
    grid_payments, grid_utilities = tuning.uniform_grid(game, spec, FLAGS.grid_points)
    best_grid = int(jnp.argmax(grid_utilities))
    start = FLAGS.start_payment or grid_payments[best_grid]
    optimizer = optax.adam(optax.exponential_decay(FLAGS.learning_rate, FLAGS.decay_steps, 0.5))
    with report.Timer() as timer:
      best, trace = jax.block_until_ready(
        tuning.tune_pricing(
          tuning.initial_params(start, FLAGS.price_groups),
          game,
          spec,
          groups,
          optimizer,
          FLAGS.steps,
          safeguard=FLAGS.safeguard,
        )
      )
    reference = leader.solve_leader(game, spec, groups, FLAGS.price_groups)
    trace = jax.tree.map(np.asarray, trace)
    summary = {
      "valuation": spec.valuation,
      "price_groups": FLAGS.price_groups,
      "steps": FLAGS.steps,
      "safeguard": FLAGS.safeguard,
      "seconds_with_compile": timer.elapsed,
      "grid_best_payment": float(grid_payments[best_grid]),
      "grid_best_utility": float(grid_utilities[best_grid]),
      "start_utility": float(trace.objective[0]),
      "tuned_payment": float(jnp.exp(best.log_payment)),
      "tuned_prices": tuning.group_prices(best),
      "tuned_utility": float(trace.objective.max()),
      "solve_leader_payment": float(reference.payment),
      "solve_leader_utility": float(reference.utility),
    }
    if spec.valuation == "log":
      r_star = equilibrium.closed_form_payment(game.lam, game.costs, game.weights)
      error = abs(summary["tuned_payment"] - float(r_star))
      summary.update(
        closed_form_payment=float(r_star),
        closed_form_utility=float(leader.server_utility(r_star, game, spec)),
        tuned_payment_error=error,
        # |R - R*| / R*; None where R* = 0 (no payment is optimal: the absolute error is the measure).
        tuned_payment_relative_error=error / float(r_star) if r_star > 0 else None,
      )
  rows = [
    {
      "step": t,
      "objective": trace.objective[t],
      "payment": trace.payment[t],
      **{f"price_{g}": trace.prices[t, g] for g in range(FLAGS.price_groups)},
      "grad_norm": trace.grad_norm[t],
    }
    for t in range(FLAGS.steps + 1)
  ]
  return summary, rows


def _evaluate_trained(payment, problem, spec, apply_fn, program, keys, held_out) -> dict:
  """One R on the noise draws ``keys`` [K, 2]: per draw [K] the trained objective U (the server's utility of
  the trained model), the validation loss and the held-out test accuracy; the payment actually made (R
  when someone participates, else 0), the proxy utility lam Q - R and the participants."""
  trained = hypergrad.trained_draws(
    jnp.float64(payment), problem, keys, apply_fn=apply_fn, cfg=program, spec=spec
  )
  draw = lambda k: jax.tree.map(lambda a: np.asarray(a[k], np.float32), trained.params)
  with jax.enable_x64(False):  # the evaluation runs in float32, as in the simulation
    accuracy = [
      float(federated.evaluate(draw(k), held_out.x, held_out.y, apply_fn, 512)[0])
      for k in range(keys.shape[0])
    ]
  paid = float(payment) * bool(np.any(np.asarray(trained.budgets) > 0))
  loss = np.asarray(trained.loss, np.float64)
  return {
    "R": float(payment),
    "payment": paid,
    "trained_objective": -FLAGS.lambda_acc * loss - paid,
    "test_accuracy": np.asarray(accuracy),
    "validation_loss": loss,
    "proxy_utility": float(leader.server_utility(jnp.float64(payment), problem.game, spec)),
    "participants": int(np.sum(np.asarray(trained.budgets[0]) > 0)),
  }


def _seed_data(
  cfg: fc.SimulationConfig,
) -> tuple[list[tuple[fc.SimulationConfig, data.FederatedData]], fc.SimulationConfig]:
  """Each seed's config and data (seeds cfg.seed .. cfg.seed + --seeds - 1: costs, partition, initial
  model) with one pool capacity and one test-split size, and the program config: every traced program
  takes it as its static config, so all seeds reuse one compilation (the seed enters only through the
  traced problem and the keys)."""
  seeds = [cfg.seed + s for s in range(FLAGS.seeds)]
  configs = [dataclasses.replace(cfg, seed=s, data=dataclasses.replace(cfg.data, seed=s)) for s in seeds]
  loaded = study.load_shared([c.data for c in configs])
  capacity = int(loaded[0].pool.x.shape[1])
  size = min(len(d.test.y) for d in loaded)
  loaded = [
    d if len(d.test.y) == size else d._replace(test=data.subsample(d.test, size, c.seed))
    for c, d in zip(configs, loaded)
  ]
  configs = [dataclasses.replace(c, data=dataclasses.replace(c.data, capacity=capacity)) for c in configs]
  program = dataclasses.replace(configs[0], seed=0, data=dataclasses.replace(configs[0].data, seed=0))
  return list(zip(configs, loaded)), program


def _tune_seed(cfg, program, problem, spec, apply_fn, keys) -> tuple[float, float, list]:
  """Adam on log R for the trained objective on the draws ``keys`` from the Q-optimal R*: (R*_Q, the best R
  of the trajectory, one row per step). A non-finite hypergradient ends the trajectory (its row is kept)."""
  start = float(leader.solve_leader(problem.game, spec).payment)
  optimizer = optax.adam(optax.exponential_decay(FLAGS.learning_rate, FLAGS.decay_steps, 0.5))
  theta = jnp.log(jnp.float64(start))
  state = optimizer.init(theta)
  rows, best = [], (-np.inf, start)
  for t in range(FLAGS.steps + 1):
    payment = jnp.exp(theta)
    hg = hypergrad.hypergradient(
      payment, problem, keys, lambda_acc=FLAGS.lambda_acc, apply_fn=apply_fn, cfg=program, spec=spec
    )
    rows.append(
      {
        "seed": cfg.seed,
        "step": t,
        "payment": float(payment),
        "objective": float(hg.value),
        "grad": float(hg.grad),
        "grad_stderr": float(hg.stderr),
      }
    )
    if not np.isfinite(float(hg.grad)):  # e.g. the traced accountant's gradient at a very small z: stop
      break
    best = max(best, (float(hg.value), float(payment)))
    if t < FLAGS.steps:  # ascent on U in log R: dU/dlog R = R dU/dR
      updates, state = optimizer.update(-payment * hg.grad, state, theta)
      theta = optax.apply_updates(theta, updates)
  return start, best[1], rows


def _along_payment(r_q: float, r_trained: float, problem, spec, apply_fn, program, keys) -> list:
  """The trained objective on the held-out draws ``keys`` at --plot_points payments log-spaced over
  [min R / 1.5, max R * 1.5] plus R*_Q and R*_trained: per point the mean U, its standard error over the
  draws and the mean hypergradient dU/dR."""
  low, high = min(r_q, r_trained) / 1.5, max(r_q, r_trained) * 1.5
  grid = sorted({*np.geomspace(low, high, FLAGS.plot_points).tolist(), r_q, r_trained})
  rows = []
  for payment in grid:
    hg = hypergrad.hypergradient(
      jnp.float64(payment),
      problem,
      keys,
      lambda_acc=FLAGS.lambda_acc,
      apply_fn=apply_fn,
      cfg=program,
      spec=spec,
    )
    rows.append(
      {
        "payment": payment,
        "objective": float(hg.value),
        "objective_stderr": hypergrad.standard_error(np.asarray(hg.values)),
        "grad": float(hg.grad),
        "grad_stderr": float(hg.stderr),
        "is_R_Q": payment == r_q,
        "is_R_trained": payment == r_trained,
      }
    )
  return rows


def _tune_trained(cfg: fc.SimulationConfig) -> tuple[dict, list, list, list, list]:
  """Per seed: Adam on log R for the trained objective from the Q-optimal R* on --draws tuning draws, then
  both R evaluated on --draws held-out draws (keys the tuning never saw). Returns (summary, per-seed
  comparison rows, paired-difference rows, trajectory rows, the first seed's objective along R)."""
  validate.check_int("draws", FLAGS.draws, minimum=2, maximum=_MAX)
  validate.check_int("seeds", FLAGS.seeds, minimum=2, maximum=_MAX)
  validate.check_int("plot_points", FLAGS.plot_points, minimum=2, maximum=_MAX)
  validate.check_positive("lambda_acc", FLAGS.lambda_acc)
  privacy = cfg.privacy
  if privacy.calibration == "exact":
    privacy = dataclasses.replace(privacy, calibration="traced")
  cfg = dataclasses.replace(
    cfg, data=dataclasses.replace(cfg.data, num_clients=FLAGS.num_clients), privacy=privacy
  )
  seeds, program = _seed_data(cfg)
  evaluations, trajectory, along = [], [], []
  with jax.enable_x64(True):
    for seed_cfg, fed_data in seeds:
      problem, spec, apply_fn, held_out = hypergrad.make_problem(seed_cfg, fed_data)
      keys = hypergrad.draw_keys(seed_cfg, 2 * FLAGS.draws)
      tune_keys, eval_keys = keys[: FLAGS.draws], keys[FLAGS.draws :]
      r_q, r_trained, rows = _tune_seed(seed_cfg, program, problem, spec, apply_fn, tune_keys)
      trajectory += rows
      evaluate = lambda r: _evaluate_trained(r, problem, spec, apply_fn, program, eval_keys, held_out)  # noqa: B023
      evaluations.append({"seed": seed_cfg.seed, "Q": evaluate(r_q), "training": evaluate(r_trained)})
      if not along:
        along = _along_payment(r_q, r_trained, problem, spec, apply_fn, program, eval_keys)
  per_seed, differences = hypergrad.tuning_comparison(evaluations)
  summary = {
    "objective": "trained",
    "lambda_acc": FLAGS.lambda_acc,
    "draws": FLAGS.draws,
    "steps": FLAGS.steps,
    "seeds": [e["seed"] for e in evaluations],
    "min_seeds_for_a_verdict": stats.MIN_SEEDS,
    "differences": differences,
  }
  return summary, per_seed, differences, trajectory, along


def main(_):
  run = sim_flags.run_config(RUN)
  if FLAGS.objective == "trained":
    cfg = SIM.value({"game.mechanism": "stackelberg"})
    validate.check_int("num_clients", FLAGS.num_clients, minimum=2, maximum=_MAX)
    validate.check_int("steps", FLAGS.steps, maximum=_MAX)
    header = (
      f"trained objective: {FLAGS.seeds} seeds from {cfg.seed}, {FLAGS.num_clients} clients, lambda_acc "
      f"{FLAGS.lambda_acc}, {FLAGS.draws} tuning + {FLAGS.draws} held-out draws, {FLAGS.steps} Adam steps "
      f"on log R; {cfg.federated.rounds} x {cfg.federated.local_steps} steps"
    )
    with sim_flags.results(run, header, dataclasses.asdict(cfg)) as out:
      summary, per_seed, differences, trajectory, along = _tune_trained(cfg)
      note = (
        f"Differences tuned-for-training minus tuned-for-Q over {len(summary['seeds'])} seeds, draws "
        f"averaged per seed, 95% t intervals (fcfn_jax/stats.py; a verdict needs >= {stats.MIN_SEEDS} seeds)."
      )
      out.table(
        "comparison",
        per_seed,
        _COMPARISON_COLUMNS,
        note="Per seed: each R evaluated on held-out training-noise draws (means, _stderr over the draws).",
      )
      out.table("differences", differences, _DIFFERENCE_COLUMNS, note=note)
      out.table("trajectory", trajectory)
      out.table("objective_along_R", along)
      out.json("summary", summary)
      plotting.objective_along_payment(along, out.file("objective_along_R.png"), FLAGS.lambda_acc)
    print(report.format_table(per_seed, _COMPARISON_COLUMNS, floatfmt=".6g"))
    print(report.format_table(differences, _DIFFERENCE_COLUMNS, floatfmt=".4g"))
    return
  with jax.enable_x64(True):
    game, spec, groups, cfg = _problem()
  header = (
    f"one game of {FLAGS.num_clients} clients, {FLAGS.price_groups} price groups, {FLAGS.steps} Adam steps"
    f"; game: {sim_flags.fields(cfg.game, skip=('mechanism',))}; delta {cfg.privacy.delta}, "
    f"{cfg.federated.rounds} x {cfg.federated.local_steps} steps, seed {cfg.seed}"
  )
  with sim_flags.results(run, header, dataclasses.asdict(cfg)) as out:
    summary, rows = _tune(game, spec, groups)
    out.table("trajectory", rows)
    out.json("summary", summary)
    plotting.tuning_trajectory(rows, FLAGS.price_groups, out.file("trajectory.png"))
  print(
    report.format_table(
      [{"quantity": k, "value": v} for k, v in summary.items() if k != "tuned_prices"], floatfmt=".8g"
    )
  )
  print("tuned group prices:", np.round(np.asarray(summary["tuned_prices"]), 4).tolist())


if __name__ == "__main__":
  sim_flags.run(main)

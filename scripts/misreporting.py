"""Strategic misreporting: what each mechanism yields when some clients exaggerate their privacy cost.

A seeded --liar_fraction of the clients report m c_i instead of their true cost c_i, for every factor m in
--factors; each mechanism is solved on the reports (vmapped over the factors) and accounted with the true
costs (``fcfn_jax.game.misreport``). With --train each (mechanism, factor) also trains with the budgets the
mechanism picked on the reports (``simulation.run(..., cost_factors=...)``; runs with equal budgets train
once).

Outputs in --out: misreporting.{csv,json,md} (one row per mechanism and factor) and PNGs of each metric vs
the factor. Example (offline, seconds without --train):

  python scripts/misreporting.py --factors=1,1.5,2,3 --liar_fraction=0.5 --out=results/misreporting
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fcfn_jax import config as fc
from fcfn_jax import data, plotting, report, simulation, validate
from fcfn_jax.game import misreport

import sim_flags

flags.DEFINE_list("mechanisms", list(fc.MECHANISMS), f"Mechanisms to run, from {list(fc.MECHANISMS)}.")
flags.DEFINE_list("factors", ["1", "1.5", "2", "3"], "Cost exaggeration factors m >= 1 of the liars.")
flags.DEFINE_float("liar_fraction", 0.5, "Fraction of the clients that lie, in (0, 1] (seeded choice).")
flags.DEFINE_bool("train", False, "Also train with each outcome's budgets and report the test accuracy.")
FLAGS = flags.FLAGS
FLAGS.set_default("model", "logreg")
FLAGS.set_default("out", "results/misreporting")

COLUMNS = (
  "mechanism",
  "factor",
  "server_utility",
  "liars_mean_utility",
  "honest_mean_utility",
  "social_welfare",
  "participants",
  "liar_participants",
  "total_payment",
)
PLOTTED = ("server_utility", "liars_mean_utility", "honest_mean_utility", "social_welfare", "participants")


def _settings() -> tuple[list[float], fc.SimulationConfig]:
  """The factors and the config the flags describe; raises ConfigError naming a bad flag."""
  for mech in FLAGS.mechanisms:
    validate.check_choice("mechanisms", mech, fc.MECHANISMS)
  factors = []
  for value in FLAGS.factors:
    try:
      factors.append(float(value))
    except ValueError:
      validate.require(False, f"factors has {value!r}: expected numbers >= 1")
    validate.require(
      math.isfinite(factors[-1]) and factors[-1] >= 1,
      f"factors has {value!r}: expected finite numbers >= 1 (liars exaggerate their cost)",
    )
  validate.require(
    0 < FLAGS.liar_fraction <= 1,
    f"liar_fraction={FLAGS.liar_fraction!r} is invalid: expected a number in (0, 1]",
  )
  cfg = sim_flags.simulation_config(FLAGS.mechanisms[0])
  validate.require(
    not (FLAGS.train and cfg.privacy.private and cfg.privacy.calibration != "exact"),
    f"calibration={cfg.privacy.calibration!r} is invalid with --train: misreported budgets need "
    "calibration='exact' (or private=False)",
  )
  return factors, cfg


def _mean(values: np.ndarray) -> float:
  return float(values.mean()) if values.size else math.nan


def game_rows(
  cfg: fc.SimulationConfig,
  num_examples: np.ndarray,
  mechanisms: list[str],
  factors: list[float],
  liars: np.ndarray,
) -> tuple[list[dict], list[np.ndarray]]:
  """One row per (mechanism, factor): the outcome on the reports, accounted with the true costs.

  num_examples: [clients]; liars: bool [clients]. Costs and weights are drawn as ``simulation.prepare``
  draws them, so the rows match the trained runs. Also returns each row's budgets eps [clients].
  """
  costs = simulation.client_costs(jax.random.PRNGKey(cfg.seed), len(num_examples), cfg.game)
  weights = simulation.quality_weights(num_examples)
  rows, budgets = [], []
  with jax.enable_x64(True):
    for mech in mechanisms:
      out = jax.vmap(
        lambda m, mech=mech: misreport.misreported_outcome(mech, costs, weights, cfg.game, m, liars)
      )(jnp.asarray(factors))
      out = jax.tree.map(np.asarray, out)
      for j, factor in enumerate(factors):
        utilities = out.client_utilities[j]
        rows.append(
          {
            "mechanism": mech,
            "factor": factor,
            "server_utility": float(out.server_utility[j]),
            "liars_mean_utility": _mean(utilities[liars]),
            "honest_mean_utility": _mean(utilities[~liars]),
            "social_welfare": float(out.social_welfare[j]),
            "participants": int(out.participants[j]),
            "liar_participants": int(np.sum(out.budgets[j][liars] > 0)),
            "total_payment": float(out.total_payment[j]),
          }
        )
        budgets.append(out.budgets[j])
  return rows, budgets


def train_accuracy(
  cfg: fc.SimulationConfig,
  fed_data: data.FederatedData,
  rows: list[dict],
  budgets: list[np.ndarray],
  liars: np.ndarray,
) -> list[dict]:
  """Adds test_accuracy to every row: training with the row's budgets (equal budgets train once).

  Returns the trained runs' privacy records (``simulation.client_rows``), tagged with their factor."""
  trained, clients = {}, []
  for row, eps in zip(rows, budgets):
    key = eps.tobytes()
    if key not in trained:
      mech_cfg = dataclasses.replace(cfg, game=dataclasses.replace(cfg.game, mechanism=row["mechanism"]))
      result = simulation.run(
        mech_cfg, fed_data=fed_data, progress=FLAGS.progress, cost_factors=np.where(liars, row["factor"], 1.0)
      )
      trained[key] = result.summary["test_accuracy"]
      clients += [dict(client, factor=row["factor"]) for client in result.clients]
    row["test_accuracy"] = trained[key]
  return clients


def main(argv):
  del argv
  factors, cfg = sim_flags.config_or_exit(_settings)
  fed_data = sim_flags.config_or_exit(lambda: data.load_federated(cfg.data))
  num_examples = np.asarray(fed_data.pool.num_examples)
  liars = misreport.choose_liars(len(num_examples), FLAGS.liar_fraction, cfg.seed)
  rows, budgets = game_rows(cfg, num_examples, FLAGS.mechanisms, factors, liars)
  columns = COLUMNS
  if FLAGS.train:
    clients = sim_flags.config_or_exit(lambda: train_accuracy(cfg, fed_data, rows, budgets, liars))
    columns += ("test_accuracy",)
    os.makedirs(FLAGS.out, exist_ok=True)
    report.write_csv_atomic(os.path.join(FLAGS.out, "clients.csv"), clients)

  os.makedirs(FLAGS.out, exist_ok=True)
  setup = {
    "dataset": cfg.data.dataset,
    "source": cfg.data.source,
    "clients": len(num_examples),
    "liars": int(liars.sum()),
    "liar_fraction": FLAGS.liar_fraction,
    "lam": cfg.game.lam,
    "cost_low": cfg.game.cost_low,
    "cost_high": cfg.game.cost_high,
    "eps_max": cfg.game.eps_max,
    "seed": cfg.seed,
    "trained": FLAGS.train,
  }
  if FLAGS.train:
    setup.update(model=cfg.model.name, rounds=cfg.federated.rounds, local_steps=cfg.federated.local_steps)
  report.write_results(FLAGS.out, "misreporting", rows, columns, {"setup": setup})
  plotted = PLOTTED + (("test_accuracy",) if FLAGS.train else ())
  for metric in plotted:
    plotting.metric_vs_parameter(rows, "factor", metric, os.path.join(FLAGS.out, f"{metric}_vs_factor.png"))
  print(
    f"\n{cfg.data.dataset} ({cfg.data.source}), {len(num_examples)} clients, {int(liars.sum())} liars "
    f"(seed {cfg.seed}); lam={cfg.game.lam:g}, c ~ U[{cfg.game.cost_low:g}, {cfg.game.cost_high:g}], "
    f"eps_max={cfg.game.eps_max:g}"
  )
  print(report.format_table(rows, columns))
  print(
    f"\nwrote {FLAGS.out}/misreporting.{{csv,json,md}}, *_vs_factor.png" + (", clients.csv" * FLAGS.train)
  )


if __name__ == "__main__":
  app.run(main, flags_parser=sim_flags.parse_flags)

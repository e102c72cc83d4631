"""Strategic misreporting: what each mechanism yields when some clients exaggerate their privacy cost.

A seeded --liar_fraction of the clients report m c_i instead of their true cost c_i, for every factor m in
--factors; each mechanism is solved on the reports (vmapped over the factors) and accounted with the true
costs (``fcfn_jax.game.misreport``). With --train each (mechanism, factor) also trains with the budgets the
mechanism picked on the reports (``simulation.run(..., cost_factors=...)``; runs with equal budgets train
once).

Outputs in --out (written whole at the end): misreporting.{csv,json,md} (one row per mechanism and factor),
PNGs of each metric vs the factor, manifest.json and, with --train, history.csv and clients.csv of the
runs. Example (offline, seconds without --train):

  python scripts/misreporting.py --factors=1,1.5,2,3 --liar_fraction=0.5 --out=results/misreporting
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from fcfn_jax import config as fc
from fcfn_jax import data, plotting, report, simulation, validate
from fcfn_jax.game import misreport

import sim_flags


def _factor(name: str, value: float) -> None:
  validate.check_finite(name, value)
  validate.require(value >= 1, f"{name}={value!r} is invalid: expected a number >= 1 (liars exaggerate)")


SIM = sim_flags.ConfigFlags(
  fc.SimulationConfig, skip=("game.mechanism", "checkpoint_dir", "checkpoint_every")
)
RUN = sim_flags.ConfigFlags(fc.RunConfig, skip=sim_flags.CHECKPOINT_FLAGS)
MECHANISMS = sim_flags.define_list(
  "mechanisms", fc.MECHANISMS, sim_flags.choice(fc.MECHANISMS), "Mechanisms."
)
FACTORS = sim_flags.define_list(
  "factors", [1, 1.5, 2, 3], sim_flags.number(_factor), "Cost exaggeration factors m >= 1 of the liars."
)
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


def _settings() -> fc.SimulationConfig:
  """The config the flags describe; raises ConfigError naming a bad flag."""
  validate.require(
    0 < FLAGS.liar_fraction <= 1,
    f"liar_fraction={FLAGS.liar_fraction!r} is invalid: expected a number in (0, 1]",
  )
  return SIM.value({"game.mechanism": MECHANISMS.value[0]})


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
    game, spec = simulation.game_of(cfg, costs, weights, num_examples)
    for mech in mechanisms:
      mech_spec = dataclasses.replace(spec, mechanism=mech)
      out = jax.vmap(lambda m, s=mech_spec: misreport.misreported_outcome(game, s, m, liars))(
        jnp.asarray(factors)
      )
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
) -> simulation.Comparison:
  """Adds test_accuracy to every row: training with the row's budgets (equal budgets train once).

  Returns the trained runs' tables (summary, history and clients rows, each with its factor).
  """
  trained, runs = {}, simulation.Comparison([], [], [])
  for row, eps in zip(rows, budgets):
    key = eps.tobytes()
    if key not in trained:
      mech_cfg = dataclasses.replace(cfg, game=dataclasses.replace(cfg.game, mechanism=row["mechanism"]))
      result = simulation.run(
        mech_cfg, fed_data=fed_data, progress=FLAGS.progress, cost_factors=np.where(liars, row["factor"], 1.0)
      )
      trained[key] = result.summary["test_accuracy"]
      runs.summary.append({"factor": row["factor"], **result.summary})
      runs.history.extend({"factor": row["factor"], **r} for r in result.history)
      runs.clients.extend({"factor": row["factor"], **r} for r in result.clients)
    row["test_accuracy"] = trained[key]
  return runs


def main(argv):
  del argv
  run = sim_flags.run_config(RUN)
  cfg = _settings()
  fed_data = data.load_federated(cfg.data)
  num_examples = np.asarray(fed_data.pool.num_examples)
  liars = misreport.choose_liars(len(num_examples), FLAGS.liar_fraction, cfg.seed)
  header = (
    f"{int(liars.sum())} of {len(num_examples)} clients lie by factors {FACTORS.value}; game: "
    f"{sim_flags.fields(cfg.game, skip=('mechanism',))}"
    + (f"; trained: {sim_flags.describe(cfg, fed_data)}" if FLAGS.train else "")
  )
  setup = {"clients": len(num_examples), "liars": int(liars.sum()), "liar_fraction": FLAGS.liar_fraction}
  setup.update(trained=FLAGS.train, config=dataclasses.asdict(cfg))
  with sim_flags.results(run, header, setup) as out:
    rows, budgets = game_rows(cfg, num_examples, MECHANISMS.value, FACTORS.value, liars)
    columns = COLUMNS + (("test_accuracy",) if FLAGS.train else ())
    if FLAGS.train:
      runs = train_accuracy(cfg, fed_data, rows, budgets, liars)
      out.csv("history", runs.history)
      out.csv("clients", runs.clients)
    out.table("misreporting", rows, columns, {"setup": setup})
    for metric in PLOTTED + (("test_accuracy",) if FLAGS.train else ()):
      plotting.metric_vs_parameter(rows, "factor", metric, out.file(f"{metric}_vs_factor.png"))
  print(report.format_table(rows, columns))
  print(f"\nwrote {run.out}/: misreporting.{{csv,json,md}}, *_vs_factor.png, manifest.json")


if __name__ == "__main__":
  sim_flags.run(main)

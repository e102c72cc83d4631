"""Runs every incentive mechanism on the same clients and data and writes the comparison.

Outputs in --out: comparison.{csv,json,md} (one row per mechanism: utilities, accuracy, redundant
accuracy loss, wall time), history.csv (per-round accuracy) and PNG plots. Example (offline):

  python scripts/compare_mechanisms.py --rounds=10 --out=results/femnist
"""

from __future__ import annotations

import os

from absl import app, flags

from fcfn_jax import config as fc
from fcfn_jax import plotting, report, simulation, validate
from fcfn_jax.game import outcome

import sim_flags

flags.DEFINE_list("mechanisms", list(fc.MECHANISMS), f"Mechanisms to compare, from {list(fc.MECHANISMS)}.")
FLAGS = flags.FLAGS

COLUMNS = (
  "label",
  "quality",
  "server_utility",
  "mean_client_utility",
  "social_welfare",
  "average_utility",
  "participants",
  "total_payment",
  "mean_epsilon",
  "min_epsilon",
  "test_accuracy",
  "redundant_accuracy_loss",
  "wall_time_s",
)


def main(argv):
  del argv
  sim_flags.config_or_exit(
    lambda: [validate.check_choice("mechanisms", mech, fc.MECHANISMS) for mech in FLAGS.mechanisms]
  )
  cfg = sim_flags.config_or_exit(lambda: sim_flags.simulation_config(FLAGS.mechanisms[0]))
  ckpt_root = os.path.join(FLAGS.out, "checkpoints") if FLAGS.checkpoint else None
  summary, history, clients = sim_flags.config_or_exit(
    lambda: simulation.compare(
      cfg, tuple(FLAGS.mechanisms), progress=FLAGS.progress, checkpoint_root=ckpt_root
    )
  )
  os.makedirs(FLAGS.out, exist_ok=True)
  report.write_csv_atomic(os.path.join(FLAGS.out, "comparison.csv"), summary)
  report.write_json_atomic(os.path.join(FLAGS.out, "comparison.json"), summary)
  report.write_csv_atomic(os.path.join(FLAGS.out, "history.csv"), history)
  report.write_csv_atomic(os.path.join(FLAGS.out, "clients.csv"), clients)
  report.write_text_atomic(
    os.path.join(FLAGS.out, "comparison.md"),
    report.markdown_table(summary, COLUMNS) + f"\n\n{outcome.AVERAGE_UTILITY}.\n",
  )
  plotting.accuracy_per_round(history, os.path.join(FLAGS.out, "accuracy_per_round.png"))
  plotting.bars(
    summary,
    ("quality", "server_utility", "social_welfare", "average_utility"),
    os.path.join(FLAGS.out, "utilities.png"),
    "Utilities per mechanism",
  )
  plotting.bars(
    summary,
    ("participants", "total_payment", "mean_epsilon", "test_accuracy"),
    os.path.join(FLAGS.out, "participation.png"),
    "Participation, payments, accuracy",
  )
  n = cfg.data.num_clients
  print(
    f"\n{cfg.data.dataset} ({cfg.data.source}), {n} clients, {cfg.federated.rounds} rounds x "
    f"{cfg.federated.local_steps} local steps, batch {cfg.federated.batch_size}, model {cfg.model.name}"
  )
  print(report.format_table(summary, COLUMNS))
  print(f"{outcome.AVERAGE_UTILITY}; valuation {cfg.game.valuation!r}, aggregation {cfg.game.aggregation!r}")
  print(f"\nwrote {FLAGS.out}/comparison.{{csv,json,md}}, history.csv, clients.csv, *.png")


if __name__ == "__main__":
  app.run(main, flags_parser=sim_flags.parse_flags)

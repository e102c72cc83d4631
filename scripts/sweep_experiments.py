"""Trains every mechanism across values of one parameter: accuracy and utilities vs clients / lambda / cost.

For each value of --sweep (a flag of scripts/sim_flags.py: num_clients, lam or cost_high), runs the
mechanism comparison of scripts/compare_mechanisms.py and writes sweep.{csv,json} (one row per value x
mechanism) and PNG plots of test accuracy, redundant accuracy loss and welfare vs the parameter. Example:

  python scripts/sweep_experiments.py --sweep=lam --values=10,50,200 --out=results/sweep_lam
"""

from __future__ import annotations

import os

from absl import app, flags

from fcfn_jax import config as fc
from fcfn_jax import plotting, report, simulation, validate

import sim_flags

_SWEEPABLE = {"num_clients": int, "lam": float, "cost_high": float}
flags.DEFINE_enum("sweep", "lam", list(_SWEEPABLE), "The parameter to sweep.")
flags.DEFINE_list("values", ["10", "50", "200"], "Its values.")
flags.DEFINE_list("mechanisms", list(fc.MECHANISMS), f"Mechanisms to compare, from {list(fc.MECHANISMS)}.")
FLAGS = flags.FLAGS

PLOTTED = ("test_accuracy", "redundant_accuracy_loss", "social_welfare", "average_utility")


def main(argv):
  del argv
  sim_flags.config_or_exit(
    lambda: [validate.check_choice("mechanisms", mech, fc.MECHANISMS) for mech in FLAGS.mechanisms]
  )
  cast = _SWEEPABLE[FLAGS.sweep]
  values = sim_flags.config_or_exit(lambda: _parse_values(cast))
  rows, clients = [], []
  for value in values:
    setattr(FLAGS, FLAGS.sweep, value)
    cfg = sim_flags.config_or_exit(lambda: sim_flags.simulation_config(FLAGS.mechanisms[0]))
    summary, _, client_rows = sim_flags.config_or_exit(
      lambda cfg=cfg: simulation.compare(cfg, tuple(FLAGS.mechanisms), progress=FLAGS.progress)
    )
    rows += [dict(row, **{FLAGS.sweep: value}) for row in summary]
    clients += [dict(row, **{FLAGS.sweep: value}) for row in client_rows]
    print(f"{FLAGS.sweep}={value}: done", flush=True)
  os.makedirs(FLAGS.out, exist_ok=True)
  report.write_csv_atomic(os.path.join(FLAGS.out, "sweep.csv"), rows)
  report.write_json_atomic(os.path.join(FLAGS.out, "sweep.json"), rows)
  report.write_csv_atomic(os.path.join(FLAGS.out, "clients.csv"), clients)  # every client's privacy record
  for metric in PLOTTED:
    plotting.metric_vs_parameter(
      rows, FLAGS.sweep, metric, os.path.join(FLAGS.out, f"{metric}_vs_{FLAGS.sweep}.png")
    )
  print(report.format_table(rows, (FLAGS.sweep, "mechanism") + PLOTTED + ("participants",)))


def _parse_values(cast):
  try:
    return [cast(v) for v in FLAGS.values]
  except ValueError:
    validate.fail(
      f"values={FLAGS.values!r} is invalid for sweep={FLAGS.sweep!r}: expected {cast.__name__} values"
    )


if __name__ == "__main__":
  app.run(main, flags_parser=sim_flags.parse_flags)

"""Trains every mechanism across values of one parameter: accuracy and utilities vs one flag.

For each value of --sweep (any numeric experiment flag: num_clients, lam, cost_high, eps_max, num_types
for contract theory's types (0 = one per client), num_aggregators for the three-party game, ...) runs the
mechanism comparison of scripts/compare_mechanisms.py. Every value is checked (and its data loaded) before
the first one trains. Outputs in --out (written whole at the end): comparison.{csv,json,md} (one row per
value x mechanism, the parameter as a column), history.csv and clients.csv (likewise), PNG plots of test
accuracy, redundant accuracy loss and welfare vs the parameter, manifest.json. Examples:

  python scripts/sweep_experiments.py --sweep=lam --values=10,50,200 --out=results/sweep_lam
  python scripts/sweep_experiments.py --sweep=num_types --values=2,4,8,16,0 --mechanisms=contract
  python scripts/sweep_experiments.py --sweep=num_aggregators --values=2,4,8 --mechanisms=three_party
"""

from __future__ import annotations

import dataclasses

from fcfn_jax import config as fc
from fcfn_jax import data, plotting, report, simulation, validate
from fcfn_jax.game import outcome

import sim_flags

SIM = sim_flags.ConfigFlags(
  fc.SimulationConfig, skip=("game.mechanism", "checkpoint_dir", "checkpoint_every")
)
RUN = sim_flags.ConfigFlags(fc.RunConfig, skip=sim_flags.CHECKPOINT_FLAGS)
_SWEEPABLE = [
  path for path, flag in SIM.flag_names.items() if sim_flags.FLAGS[flag].flag_type() in ("int", "float")
]
SWEEP = sim_flags.flags.DEFINE_enum(
  "sweep", "lam", [SIM.flag_names[p] for p in _SWEEPABLE], "The experiment flag to sweep."
)
VALUES = sim_flags.define_list("values", ["10", "50", "200"], lambda name, text: text, "Its values.")
MECHANISMS = sim_flags.define_list(
  "mechanisms", fc.MECHANISMS, sim_flags.choice(fc.MECHANISMS), "Mechanisms to compare."
)
sim_flags.FLAGS.set_default("out", "results/sweep_experiments")

PLOTTED = ("test_accuracy", "redundant_accuracy_loss", "social_welfare", "average_utility")


def COLUMNS() -> tuple[str, ...]:  # noqa: N802  (a constant once the flags are parsed)
  return (SWEEP.value, "label", "quality", *PLOTTED, "participants")


def _configs() -> list[tuple[float, fc.SimulationConfig]]:
  """(value, config) for every --values entry, each parsed like --<sweep> and validated in its config."""
  paths = [path for path, flag in SIM.flag_names.items() if flag == SWEEP.value]  # seed sets two fields
  configs = []
  for i, text in enumerate(VALUES.value):
    with validate.reraise(
      (ValueError, validate.ConfigError),
      lambda e, i=i, text=text: f"values[{i}]={text!r} is invalid for --sweep={SWEEP.value}: {e}",
    ):
      value = sim_flags.FLAGS[SWEEP.value].parser.parse(text)
      overrides = dict.fromkeys(paths, value) | {"game.mechanism": MECHANISMS.value[0]}
      configs.append((value, SIM.value(overrides)))
  return configs


def main(argv):
  del argv
  run = sim_flags.run_config(RUN)
  configs = _configs()
  datasets = {}
  for _, cfg in configs:  # every value's clients, before any work (e.g. num_clients beyond the data)
    if cfg.data not in datasets:
      datasets[cfg.data] = data.load_federated(cfg.data)
  value0, cfg0 = configs[0]
  header = (
    f"{SWEEP.value} in {[v for v, _ in configs]}; at {SWEEP.value}={value0}: "
    f"{sim_flags.describe(cfg0, datasets[cfg0.data])}; mechanisms {','.join(MECHANISMS.value)}"
  )
  setup = {"sweep": SWEEP.value, "values": [v for v, _ in configs], "config": dataclasses.asdict(cfg0)}
  with sim_flags.results(run, header, setup) as out:
    tables = simulation.Comparison([], [], [])
    for value, cfg in configs:
      result = simulation.compare(
        cfg, tuple(MECHANISMS.value), progress=run.progress, fed_data=datasets[cfg.data]
      )
      for table, rows in zip(tables, result):
        table += [{SWEEP.value: value, **row} for row in rows]
      print(f"{SWEEP.value}={value}: done", flush=True)
    out.comparison(tables, COLUMNS(), note=outcome.AVERAGE_UTILITY)
    for metric in PLOTTED:
      plotting.metric_vs_parameter(
        tables.summary, SWEEP.value, metric, out.file(f"{metric}_vs_{SWEEP.value}.png")
      )
  print(report.format_table(tables.summary, COLUMNS()))
  print(outcome.AVERAGE_UTILITY)


if __name__ == "__main__":
  sim_flags.run(main)

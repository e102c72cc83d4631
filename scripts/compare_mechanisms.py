"""Runs every incentive mechanism on the same clients and data and writes the comparison.

Outputs in --out (written whole at the end; an earlier run's folder is replaced): comparison.{csv,json,md}
(one row per mechanism: utilities, accuracy, redundant accuracy loss, wall time), history.csv (per-round
accuracy), clients.csv (one privacy record per mechanism and client), PNG plots and manifest.json. With
--checkpoint every mechanism checkpoints into <out>.checkpoints/<mechanism> and a rerun resumes from there
(README "Resume, fingerprints and corrupt checkpoints"). Example (offline):

  python scripts/compare_mechanisms.py --rounds=10 --out=results/femnist
"""

from __future__ import annotations

import dataclasses

from fcfn_jax import config as fc
from fcfn_jax import data, plotting, report, simulation
from fcfn_jax.game import outcome

import sim_flags

SIM = sim_flags.ConfigFlags(fc.SimulationConfig, skip=("game.mechanism", "checkpoint_dir"))
RUN = sim_flags.ConfigFlags(fc.RunConfig)
MECHANISMS = sim_flags.define_list(
  "mechanisms", fc.MECHANISMS, sim_flags.choice(fc.MECHANISMS), "Mechanisms to compare."
)
sim_flags.FLAGS.set_default("out", "results/compare")

COLUMNS = (
  "label",
  *simulation.GAME_COLUMNS,
  "test_accuracy",
  "redundant_accuracy_loss",
  "wall_time_s",
  "note",
)


def _note(cfg: fc.SimulationConfig) -> str:
  """What the table's averages mean and which valuation/aggregation produced it."""
  return f"{outcome.AVERAGE_UTILITY}; valuation {cfg.game.valuation!r}, aggregation {cfg.game.aggregation!r}."


def main(argv):
  del argv
  run = sim_flags.run_config(RUN)
  cfg = SIM.value({"game.mechanism": MECHANISMS.value[0], "checkpoint_dir": sim_flags.checkpoint_dir(run)})
  fed_data = data.load_federated(cfg.data)
  header = f"{sim_flags.describe(cfg, fed_data)}; mechanisms {','.join(MECHANISMS.value)}"
  with sim_flags.results(run, header, dataclasses.asdict(cfg)) as out:
    comparison = simulation.compare(
      cfg,
      tuple(MECHANISMS.value),
      progress=run.progress,
      fed_data=fed_data,
      restart_on_mismatch=run.restart_on_mismatch,
    )
    out.comparison(comparison, COLUMNS, note=_note(cfg))
    plotting.comparison(comparison.summary, comparison.history, out.folder)
  print(report.format_table(comparison.summary, COLUMNS))
  print(_note(cfg))
  print(f"\nwrote {run.out}/: comparison.{{csv,json,md}}, history.csv, clients.csv, *.png, manifest.json")


if __name__ == "__main__":
  sim_flags.run(main)

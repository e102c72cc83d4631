"""Is the valuation Q what training produces? Rank correlation of Q with test accuracy over seeds.

For every seed in --seeds (costs, data partition and training noise all follow the seed, as --seed does
in compare_mechanisms.py) every --mechanisms mechanism is solved and trained with the flags' settings;
each (mechanism, seed) gives the valuation Q of the outcome (docs/model.md "Stage I") and the measured
test accuracy. Reported: Spearman's rank correlation of Q and accuracy over all pairs, over all pairs
but no_incentive's (a mandate at one fixed budget: the easy ranks), and within each seed (over the
mechanisms), averaged. Outputs in --out: valuation_study.{csv,json,md} (one row per mechanism and seed)
and valuation_study_summary.{csv,json,md}, written whole at the end, and manifest.json. Example (about a
minute per seed on a 2-core CPU):

  python scripts/valuation_study.py --seeds=0,1,2,3,4,5,6,7,8,9 --out=results/valuation_study
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fcfn_jax import config as fc
from fcfn_jax import data, report, simulation, stats

import sim_flags

SIM = sim_flags.ConfigFlags(
  fc.SimulationConfig, skip=("game.mechanism", "checkpoint_dir", "checkpoint_every")
)
RUN = sim_flags.ConfigFlags(fc.RunConfig, skip=sim_flags.CHECKPOINT_FLAGS)
SEEDS = sim_flags.define_list(
  "seeds", range(10), sim_flags.integer(minimum=0), "Seeds: a client pool, cost draw and training noise each."
)
MECHANISMS = sim_flags.define_list(
  "mechanisms", fc.MECHANISMS, sim_flags.choice(fc.MECHANISMS), "Mechanisms to train."
)
sim_flags.FLAGS.set_default("out", "results/valuation_study")

COLUMNS = ("seed", "label", "quality", "participants", "mean_epsilon", "min_epsilon", "test_accuracy")


def spearman(rows: list[dict]) -> float:
  """Spearman's rho of quality and test accuracy over ``rows`` (NaN for fewer than 3 rows); Q = -inf
  (nobody participates: no model) ranks below every finite Q."""
  if len(rows) < 3:
    return float("nan")
  quality = np.asarray([r["quality"] for r in rows], np.float64)
  finite = np.isfinite(quality)
  floor = quality[finite].min(initial=0.0) - 1.0
  return stats.spearman(np.where(finite, quality, floor), [r["test_accuracy"] for r in rows])


def summarize(rows: list[dict]) -> list[dict]:
  """The three correlations of the module docstring, with the number of pairs each uses."""
  market = [r for r in rows if r["mechanism"] != "no_incentive"]
  per_seed = [spearman([r for r in rows if r["seed"] == s]) for s in dict.fromkeys(r["seed"] for r in rows)]
  return [
    {"pairs": "all (mechanism, seed)", "count": len(rows), "spearman": spearman(rows)},
    {"pairs": "all but no_incentive", "count": len(market), "spearman": spearman(market)},
    {"pairs": "within a seed, mean", "count": len(per_seed), "spearman": float(np.nanmean(per_seed))},
  ]


def main(argv):
  del argv
  run = sim_flags.run_config(RUN)
  # --seed is replaced by each --seeds entry (data partition, costs and training noise).
  first = MECHANISMS.value[0]
  configs = [SIM.value({"seed": s, "data.seed": s, "game.mechanism": first}) for s in SEEDS.value]
  datasets = {cfg.data: data.load_federated(cfg.data) for cfg in configs}
  cfg0 = configs[0]
  header = (
    f"seeds {SEEDS.value}; at seed {cfg0.seed}: {sim_flags.describe(cfg0, datasets[cfg0.data])}; mechanisms "
    f"{','.join(MECHANISMS.value)}; valuation {cfg0.game.valuation}, aggregation {cfg0.game.aggregation}"
  )
  setup = {"seeds": SEEDS.value, "config": dataclasses.asdict(cfg0)}
  with sim_flags.results(run, header, setup) as out:
    rows = []
    for cfg in configs:
      summary = simulation.compare(
        cfg, tuple(MECHANISMS.value), progress=run.progress, fed_data=datasets[cfg.data]
      ).summary
      rows += [dict(row, seed=cfg.seed) for row in summary]
      print(
        f"seed {cfg.seed}: " + ", ".join(f"{r['mechanism']} {r['test_accuracy']:.3f}" for r in summary),
        flush=True,
      )
    correlations = summarize(rows)
    out.table("valuation_study", rows, COLUMNS)
    out.table("valuation_study_summary", correlations)
  print(report.format_table(rows, COLUMNS))
  print(report.format_table(correlations))
  print(f"\nwrote {run.out}/valuation_study{{,_summary}}.{{csv,json,md}}, manifest.json")


if __name__ == "__main__":
  sim_flags.run(main)

"""Is the valuation Q what training produces? Rank correlation of Q with test accuracy over seeds.

For every seed in --seeds (costs, data partition and training noise all follow the seed, as --seed does
in compare_mechanisms.py) every --mechanisms mechanism is solved and trained with the flags' settings;
each (mechanism, seed) gives the valuation Q of the outcome (docs/model.md "Stage I") and the measured
test accuracy. Reported: Spearman's rank correlation of Q and accuracy over all pairs, over all pairs
but no_incentive's (a mandate at one fixed budget: the easy ranks), and within each seed (over the
mechanisms), averaged. Outputs in --out: valuation_study.{csv,json,md} (one row per mechanism and seed)
and valuation_study_summary.{csv,json,md}. Example (about a minute per seed on a 2-core CPU):

  python scripts/valuation_study.py --seeds=0,1,2,3,4,5,6,7,8,9 --out=results/valuation_study
"""

from __future__ import annotations

import numpy as np
from absl import app, flags
from scipy import stats

from fcfn_jax import config as fc
from fcfn_jax import report, simulation, validate

import sim_flags

flags.DEFINE_list("seeds", [str(s) for s in range(10)], "Seeds (>= 0): one client pool and cost draw each.")
flags.DEFINE_list("mechanisms", list(fc.MECHANISMS), f"Mechanisms to train, from {list(fc.MECHANISMS)}.")
FLAGS = flags.FLAGS
FLAGS.set_default("out", "results/valuation_study")

COLUMNS = ("seed", "label", "quality", "participants", "mean_epsilon", "min_epsilon", "test_accuracy")


def spearman(rows: list[dict]) -> float:
  """Spearman's rho of quality and test accuracy over ``rows`` (NaN for fewer than 3 rows)."""
  if len(rows) < 3:
    return float("nan")
  return float(stats.spearmanr([r["quality"] for r in rows], [r["test_accuracy"] for r in rows])[0])


def summarize(rows: list[dict]) -> list[dict]:
  """The three correlations of the module docstring, with the number of pairs each uses."""
  market = [r for r in rows if r["mechanism"] != "no_incentive"]
  per_seed = [spearman([r for r in rows if r["seed"] == s]) for s in dict.fromkeys(r["seed"] for r in rows)]
  return [
    {"pairs": "all (mechanism, seed)", "count": len(rows), "spearman": spearman(rows)},
    {"pairs": "all but no_incentive", "count": len(market), "spearman": spearman(market)},
    {"pairs": "within a seed, mean", "count": len(per_seed), "spearman": float(np.nanmean(per_seed))},
  ]


def _seeds() -> list[int]:
  seeds = []
  for text in FLAGS.seeds:
    validate.require(text.strip().isdigit(), f"seeds has {text!r}: expected integers >= 0")
    seeds.append(int(text))
  for mech in FLAGS.mechanisms:
    validate.check_choice("mechanisms", mech, fc.MECHANISMS)
  return seeds


def main(argv):
  del argv
  seeds = sim_flags.config_or_exit(_seeds)
  rows = []
  for seed in seeds:
    FLAGS.seed = seed
    cfg = sim_flags.config_or_exit(lambda: sim_flags.simulation_config(FLAGS.mechanisms[0]))
    summary = simulation.compare(cfg, tuple(FLAGS.mechanisms), progress=FLAGS.progress).summary
    rows += [dict(row, seed=seed) for row in summary]
    print(
      f"seed {seed}: " + ", ".join(f"{r['mechanism']} {r['test_accuracy']:.3f}" for r in summary), flush=True
    )
  correlations = summarize(rows)
  setup = {"seeds": seeds, "valuation": cfg.game.valuation, "aggregation": cfg.game.aggregation}
  report.write_results(FLAGS.out, "valuation_study", rows, None, setup)
  report.write_results(FLAGS.out, "valuation_study_summary", correlations, None, setup)
  print(report.format_table(rows, COLUMNS))
  print(report.format_table(correlations))
  print(f"\nwrote {FLAGS.out}/valuation_study{{,_summary}}.{{csv,json,md}}")


if __name__ == "__main__":
  app.run(main, flags_parser=sim_flags.parse_flags)

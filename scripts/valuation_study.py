"""Is the valuation Q what training produces? Rank correlation of Q with test accuracy over seeds.

For every seed in --seeds (costs, data partition and training noise all follow the seed, as --seed does in
compare_mechanisms.py) every --mechanisms mechanism is solved with the flags' settings and trained --draws
times (training-noise draws 0 .. D-1, as replicas of one program: ``fcfn_jax.replicas``); each (mechanism,
seed) gives the valuation Q of the outcome (docs/model.md "Stage I") and the test accuracy, averaged over
the draws, and max_epsilon_spent, the largest epsilon the accountant's ledger charges any of its clients
for the steps they ran (at most the budget sold). Each outcome's Q is also re-valued under the other eps
-> noise map (--noise_model surrogate <-> accountant) on the same budgets: column quality_accountant (or
quality_surrogate). Reported (``fcfn_jax.study.quality_spearman``): Spearman's rank correlation of Q and
accuracy over all pairs, over all pairs but no_incentive's (a mandate at one fixed budget: the easy
ranks), and within each seed (over the mechanisms), averaged; for Q as trained (spearman) and re-valued
(spearman_accountant), with the draws' mean accuracy and with draw 0's alone (..._draw0). Outputs in
--out: valuation_study.{csv,json,md} (one row per mechanism and seed, each draw's accuracy in
accuracy_draw_<d>) and valuation_study_summary.{csv,json,md}, written whole at the end, and
manifest.json. docs/RESULTS.md's figures (10 seeds x 3 draws, about 30 minutes on a 2-core CPU):

  python scripts/valuation_study.py --seeds=0,1,2,3,4,5,6,7,8,9 --draws=3 --out=results/valuation_study
"""

from __future__ import annotations

import dataclasses

from absl import flags

from fcfn_jax import config as fc
from fcfn_jax import report
from fcfn_jax import study as st

import sim_flags

SIM = sim_flags.ConfigFlags(
  fc.SimulationConfig, skip=("game.mechanism", "draw", "checkpoint_dir", "checkpoint_every")
)
RUN = sim_flags.ConfigFlags(fc.RunConfig, skip=sim_flags.CHECKPOINT_FLAGS)
SEEDS = sim_flags.define_list(
  "seeds", range(10), sim_flags.integer(minimum=0), "Seeds: a client pool, cost draw and training noise each."
)
MECHANISMS = sim_flags.define_list(
  "mechanisms", fc.MECHANISMS, sim_flags.choice(fc.MECHANISMS), "Mechanisms to train."
)
DRAWS = flags.DEFINE_integer("draws", 1, "Training-noise draws per (seed, mechanism) (>= 1), averaged.")
sim_flags.FLAGS.set_default("out", "results/valuation_study")

COLUMNS = (
  "seed",
  "label",
  "quality",
  "participants",
  "mean_epsilon",
  "min_epsilon",
  "max_epsilon_spent",
  "test_accuracy",
)
NOTE = (
  "spearman: Q as trained; spearman_<map>: Q re-valued under the other noise map on the same budgets; "
  "accuracy = the draws' mean, or draw 0's alone (_draw0). count: pairs (within a seed: seeds)."
)


def main(argv):
  del argv
  st.check_valuation(SEEDS.value, MECHANISMS.value, DRAWS.value)
  run = sim_flags.run_config(RUN)
  # --seed is replaced by each --seeds entry (data partition, costs and training noise).
  first = MECHANISMS.value[0]
  configs = [SIM.value({"seed": s, "data.seed": s, "game.mechanism": first}) for s in SEEDS.value]
  datasets = st.load_shared([cfg.data for cfg in configs])
  cfg0 = configs[0]
  header = (
    f"seeds {SEEDS.value} x {DRAWS.value} draws; at seed {cfg0.seed}: "
    f"{sim_flags.describe(cfg0, datasets[0])}; "
    f"mechanisms {','.join(MECHANISMS.value)}; valuation {cfg0.game.valuation}, aggregation "
    f"{cfg0.game.aggregation}, noise model {cfg0.game.noise_model}"
  )
  setup = {"seeds": SEEDS.value, "draws": DRAWS.value, "config": dataclasses.asdict(cfg0)}
  with sim_flags.results(run, header, setup) as out:
    rows = st.valuation_outcomes(configs, datasets, MECHANISMS.value, DRAWS.value, progress=run.progress)
    for seed in SEEDS.value:
      print(
        f"seed {seed}: "
        + ", ".join(f"{r['mechanism']} {r['test_accuracy']:.3f}" for r in rows if r["seed"] == seed),
        flush=True,
      )
    rescored = next(k for k in rows[0] if k.startswith("quality_"))
    correlations = st.quality_spearman(rows, ("quality", rescored))
    columns = (*COLUMNS[:3], rescored, *COLUMNS[3:])
    out.table("valuation_study", rows, columns)
    out.table("valuation_study_summary", correlations, note=NOTE)
  print(report.format_table(rows, columns))
  print(report.format_table(correlations))
  print(NOTE)
  print(f"\nwrote {run.out}/valuation_study{{,_summary}}.{{csv,json,md}}, manifest.json")


if __name__ == "__main__":
  sim_flags.run(main)

"""The study: every mechanism over seeds x training-noise draws, trained as replicas, reported with
confidence intervals and paired differences (docs/model.md "Metrics", "Study"; docs/RESULTS.md).

  settings         :class:`Setting` (one design over seeds x draws x mechanisms) and the presets
  runner           :func:`run_setting`: a setting's replicas and ceiling in resumable units of seeds
  tables           the CI and paired-difference tables of a setting's Result, and its Result read back
  valuation_study  is the valuation Q what training produces? (Spearman's rho of Q and accuracy)

Every public name of these modules is importable from here (``from fcfn_jax import study as st``).
"""

from fcfn_jax.study.runner import (
  CEILING,
  DATA_PARTS,
  OTHER_RUN,
  UNIT_LAYOUT,
  Result,
  capacity_of,
  check_data,
  check_units,
  load_seeds,
  load_shared,
  run_setting,
  unit_fingerprint,
  unit_label,
  unit_path,
  unit_seeds,
  write_unit,
)
from fcfn_jax.study.settings import (
  PAPER_CNN_ROUNDS,
  PAPER_LOGREG_ROUNDS,
  PAPER_SEEDS_PER_UNIT,
  PRESETS,
  REFERENCES,
  SCALING_DRAWS,
  Row,
  Setting,
  preset,
)
from fcfn_jax.study.tables import (
  GAME_METRICS,
  PAIRED_GAME_METRICS,
  accuracy_table,
  curves,
  game_paired_table,
  game_table,
  gap_vs_clients,
  groups,
  load_result,
  paired_table,
  per_seed,
  redundant_loss_table,
  setting_parts,
  summary_rows,
)
from fcfn_jax.study.valuation_study import (
  QUALITY_PAIRS,
  check_valuation,
  outcome_rows,
  quality_correlation,
  quality_spearman,
  rescored_quality,
  valuation_outcomes,
)

__all__ = [
  # settings
  "PAPER_CNN_ROUNDS",
  "PAPER_LOGREG_ROUNDS",
  "PAPER_SEEDS_PER_UNIT",
  "PRESETS",
  "REFERENCES",
  "SCALING_DRAWS",
  "Row",
  "Setting",
  "preset",
  # runner
  "DATA_PARTS",
  "OTHER_RUN",
  "UNIT_LAYOUT",
  "Result",
  "capacity_of",
  "check_data",
  "check_units",
  "load_seeds",
  "load_shared",
  "run_setting",
  "unit_fingerprint",
  "unit_label",
  "unit_path",
  "unit_seeds",
  "write_unit",
  # tables
  "CEILING",
  "GAME_METRICS",
  "PAIRED_GAME_METRICS",
  "accuracy_table",
  "curves",
  "game_paired_table",
  "game_table",
  "gap_vs_clients",
  "groups",
  "load_result",
  "paired_table",
  "per_seed",
  "redundant_loss_table",
  "setting_parts",
  "summary_rows",
  # valuation_study
  "QUALITY_PAIRS",
  "check_valuation",
  "outcome_rows",
  "quality_correlation",
  "quality_spearman",
  "rescored_quality",
  "valuation_outcomes",
]

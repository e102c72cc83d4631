"""The study (docs/RESULTS.md): every mechanism over seeds x training-noise draws, as replicas of one
program, with 95% confidence intervals and paired differences; the N-scaling table.

--preset=quick is a smoke run of every code path (< 60 s on a 2-core CPU); --preset=paper is the full
protocol (fcfn_jax/study/settings.py: presets). --settings picks some of a preset's settings; --seeds,
--draws and --rounds override their counts. Outputs in --out (written whole at the end), per setting <name>_*:
accuracy.*, redundant_loss.*, vs_stackelberg.*, vs_social_optimum.*, game.*, game_vs_stackelberg.*,
curves.csv, summary.csv, history.csv, accuracy_per_round.png, utilities.png, redundant_loss.png;
and scaling.* with gap_vs_clients.png when the preset has a scaling group; timings.*; manifest.json. Examples:

  python scripts/study.py --preset=quick --out=results/study_quick
  python scripts/study.py --preset=paper --settings=femnist_logreg --data_dir=../shared/data

Resuming: each setting trains in units of --seeds_per_unit seeds, and every finished unit is saved at once
to <out>.units/<setting>/seeds-<a>-<b>.json with its fingerprint. Rerunning the same command (after a
kill, a preempted job) loads the finished units, trains only the others and writes the tables from all of
them, the same tables as an uninterrupted run. A unit made with other settings (rounds, seeds per unit,
data...) is refused (exit 2, one line naming the setting and the differing parts); --restart_on_mismatch
sets it aside (seeds-<a>-<b>.other-run.json) and recomputes it. --dry_run loads every selected setting's
data for every seed, checks the saved units and writes nothing. --combine checks that each folder was
written for the same setting (seeds, draws, rounds, config) before using it.

Several processes (README "Multi-device and multi-host"): every process prepares the experiments, trains
its block of each group of replicas, and the results are gathered once, so the tables are the single-
process ones (to float rounding); process 0 alone prints and writes the one results folder:

  python scripts/launch.py --num_processes=2 -- python scripts/study.py --preset=quick --out=results/sq
"""

from __future__ import annotations

import dataclasses
import os

from absl import flags

from fcfn_jax import config as fc
from fcfn_jax import plotting, report, validate
from fcfn_jax import study as st
from fcfn_jax.game import outcome

import sim_flags

RUN = sim_flags.ConfigFlags(fc.RunConfig, skip=sim_flags.CHECKPOINT_FLAGS)
PRESET = flags.DEFINE_enum("preset", "quick", list(st.PRESETS), "The study's preset.")
SETTINGS = sim_flags.define_list(
  "settings", ["all"], lambda name, text: text, "Settings of the preset to run (all = every one)."
)
SEEDS = flags.DEFINE_integer("seeds", 0, "Seeds per setting, >= 2 (a verdict needs >= 3); 0 = the preset's.")
DRAWS = flags.DEFINE_integer("draws", 0, "Training-noise draws per seed (0 = the preset's).")
ROUNDS = flags.DEFINE_integer("rounds", 0, "Federated rounds per run (0 = the preset's).")
SEEDS_PER_UNIT = flags.DEFINE_integer(
  "seeds_per_unit",
  0,
  "Seeds trained together and saved as one resumable unit in <out>.units (>= 0; 0 = the preset's).",
)
RESTART = flags.DEFINE_bool(
  "restart_on_mismatch",
  False,
  "Recompute saved units made with other settings (set aside as *.other-run.json) instead of refusing them.",
)
DATA_DIR = flags.DEFINE_string(
  "data_dir", "../shared/data", "Folder of the offline .npz data (FEMNIST-62, CIFAR-10)."
)
COMBINE = sim_flags.define_list(
  "combine",
  ["none"],
  lambda name, text: text,
  "Output folders of earlier runs, one per setting of --settings in order: build the group tables "
  "(scaling) from their summaries instead of training (none = train).",
)
sim_flags.FLAGS.set_default("out", "results/study")


def _note(setting: st.Setting) -> str:
  cfg = setting.cfg
  return (
    f"{setting.seeds} seeds x {setting.draws} draws; mean +- 95% CI over seeds (draws averaged per seed); "
    f"valuation {cfg.game.valuation!r}, aggregation {cfg.game.aggregation!r}; {outcome.AVERAGE_UTILITY}."
  )


def _write(out: report.ResultsFolder, result: st.Result) -> list[dict]:
  name, note = result.setting.name, _note(result.setting)
  meta = {
    "setting": dataclasses.asdict(result.setting),
    "clients": result.clients,
    "units_loaded": list(result.loaded),
    "timings": result.timings,
  }
  tables = {
    "accuracy": st.accuracy_table(result),
    "redundant_loss": st.redundant_loss_table(result),
    "vs_stackelberg": st.paired_table(result, "stackelberg"),
    "vs_social_optimum": st.paired_table(result, "social_optimum"),
    "game": st.game_table(result),
    "game_vs_stackelberg": st.game_paired_table(result),
  }
  for table, rows in tables.items():
    out.table(f"{name}_{table}", rows, meta=meta, note=note)
  curves = st.curves(result)
  out.csv(f"{name}_curves", curves)
  out.csv(f"{name}_summary", st.summary_rows(result))
  out.csv(f"{name}_history", result.history)
  plotting.accuracy_bands(curves, out.file(f"{name}_accuracy_per_round.png"), name)
  plotting.interval_bars(tables["game"], plotting.UTILITIES, out.file(f"{name}_utilities.png"), name)
  plotting.interval_bars(
    tables["redundant_loss"], ("redundant_accuracy_loss",), out.file(f"{name}_redundant_loss.png"), name
  )
  rho = st.quality_correlation(result)
  print(f"\n== {name} ({result.clients}) ==\n{note}")
  print(report.format_table(tables["accuracy"], ("label", "summary", "seeds", "draws")))
  print(report.format_table(tables["vs_stackelberg"], ("comparison", "summary", "verdict")))
  print(report.format_table(tables["redundant_loss"], ("label", "summary", "significant")))
  print(report.format_table(tables["game"], ("label", "server_utility", "average_utility", "participants")))
  print(f"Spearman rho(Q, accuracy) over mechanisms x seeds: {rho:.3f}")
  return [{"setting": name, "spearman_quality_accuracy": rho, **t} for t in result.timings]


def _check(settings: list[st.Setting], units: str, dry_run: bool) -> list[st.Result]:
  """Before any work: the --combine folders' results (refused unless made with these settings), or the
  saved units (refused or set aside unless made with these settings); with --dry_run also every setting's
  data, every seed, and no unit is set aside."""
  if COMBINE.value != ["none"]:
    validate.require(
      len(COMBINE.value) == len(settings),
      f"combine={COMBINE.value} is invalid: expected one folder per setting of {[s.name for s in settings]}",
    )
    return [st.load_result(folder, s) for folder, s in zip(COMBINE.value, settings)]
  for setting in settings:
    if dry_run:
      loaded = st.check_data(setting)
      units_done = (
        "saved units of other settings would be recomputed"
        if RESTART.value
        else f"{len(st.check_units(setting, units))} of {len(st.unit_seeds(setting))} units finished"
      )
      print(
        f"{setting.name}: the data of {setting.seeds} seeds loads ({loaded['clients']} clients); {units_done}"
      )
    else:
      st.check_units(setting, units, restart_on_mismatch=RESTART.value)
  return []


def main(argv):
  del argv
  run = sim_flags.run_config(RUN)
  settings = st.preset(
    PRESET.value,
    DATA_DIR.value,
    SETTINGS.value,
    seeds=SEEDS.value,
    draws=DRAWS.value,
    rounds=ROUNDS.value,
    seeds_per_unit=SEEDS_PER_UNIT.value,
  )
  units = os.path.abspath(run.out).rstrip(os.sep) + ".units"
  results = _check(settings, units, run.dry_run)
  header = f"preset {PRESET.value}: " + "; ".join(
    f"{s.name} ({s.seeds} seeds x {s.draws} draws, {s.cfg.federated.rounds} rounds)" for s in settings
  )
  if not results:
    header += f"; finished units in {units}"
  with sim_flags.results(
    run, header, {"preset": PRESET.value, "settings": [s.name for s in settings]}
  ) as out:
    timings = []
    for setting in settings if not results else ():
      result = st.run_setting(setting, progress=run.progress, units=units, restart_on_mismatch=RESTART.value)
      if result.loaded:
        print(f"{setting.name}: loaded {len(result.loaded)} finished units ({', '.join(result.loaded)})")
      timings += _write(out, result)
      results.append(result)
    for group, members in st.groups(results).items():
      rows = st.gap_vs_clients(members)
      out.table(group, rows, note=_note(members[0].setting))
      plotting.gap_vs_clients(rows, out.file(f"{group}_gap_vs_clients.png"))
      print(f"\n== {group} ==\n{report.format_table(rows)}")
    if timings:
      out.table("timings", timings)
  print(f"\nwrote {run.out}/")


if __name__ == "__main__":
  sim_flags.run(main)

"""The study: replicas over seeds x draws, its tables (CIs, paired differences, game level, scaling), the
presets, and the script's quick preset (slow)."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax import config as fc
from fcfn_jax import report, simulation, stats, validate
from fcfn_jax import study as st
from fcfn_jax.game import valuation
from fcfn_jax.game.spec import NOISE_LOG_EPS
from fcfn_jax.privacy import surrogate

from . import cli

MECHS = ("stackelberg", "posted_price", "social_optimum")


def _setting(n: int = 6, name: str = "tiny", **kw) -> st.Setting:
  cfg = fc.SimulationConfig(
    data=fc.DataConfig(num_clients=n, capacity=32, test_examples=120, min_examples_per_client=8),
    federated=fc.FederatedConfig(rounds=2, local_steps=1, batch_size=8),
    privacy=fc.PrivacyConfig(calibration="traced"),
  )
  return st.Setting(name, cfg, **{"seeds": 2, "draws": 2, "mechanisms": MECHS, "cohort_size": n, **kw})


@pytest.fixture(scope="module")
def units(tmp_path_factory):
  """The folder of the study fixture's units (one per seed)."""
  return tmp_path_factory.mktemp("study") / "out.units"


@pytest.fixture(scope="module")
def result(units):
  return st.run_setting(_setting(seeds_per_unit=1), units=units)


def _tables(result: st.Result) -> list[list[dict]]:
  return [
    st.accuracy_table(result),
    st.redundant_loss_table(result),
    st.paired_table(result, "stackelberg"),
    st.game_table(result),
    st.curves(result),
  ]


def test_every_replica_and_the_ceiling_ran(result):
  assert len(result.summary) == 2 * 2 * len(MECHS)
  assert {(r["seed"], r["draw"], r["mechanism"]) for r in result.summary} == {
    (s, d, m) for s in range(2) for d in range(2) for m in MECHS
  }
  assert len(result.ceiling) == 2 and all(r["mechanism"] == st.CEILING for r in result.ceiling)
  assert result.clients["capacity"] == 32 and result.clients["examples_max"] <= 32
  # Draws of one (seed, mechanism) share the game but not the training noise.
  acc = st.per_seed(result.summary, "stackelberg", "test_accuracy", 2, 2)
  util = st.per_seed(result.summary, "stackelberg", "server_utility", 2, 2)
  assert np.all(util[:, 0] == util[:, 1]) and not np.allclose(acc[:, 0], acc[:, 1])


@pytest.mark.slow  # shares the study fixture (compiles the game solvers and replica rounds)
def test_accuracy_table_is_the_t_interval_over_seeds(result):
  rows = {r["mechanism"]: r for r in st.accuracy_table(result)}
  assert set(rows) == {*MECHS, st.CEILING}
  acc = st.per_seed(result.summary, "posted_price", "test_accuracy", 2, 2)
  expected = stats.mean_interval(acc.mean(axis=1))
  row = rows["posted_price"]
  assert (row["accuracy"], row["accuracy_ci_low"], row["accuracy_ci_high"]) == pytest.approx(expected[:3])
  assert rows[st.CEILING]["draws"] == 1


@pytest.mark.slow  # shares the study fixture (compiles the game solvers and replica rounds)
def test_redundant_loss_is_the_negated_paired_difference_to_the_social_optimum(result):
  vs = {r["comparison"]: r for r in st.paired_table(result, "social_optimum")}
  for row in st.redundant_loss_table(result):
    diff = vs[f"{row['mechanism']} - social_optimum"]
    assert row["redundant_accuracy_loss"] == pytest.approx(-diff["mean_difference"])
    assert row["redundant_accuracy_loss_ci_low"] == pytest.approx(-diff["ci_high"])
    # A verdict other than a weakness or "not significant" names the winner (2 seeds here: no verdict).
    assert row["significant"] == (
      diff["verdict"] not in (stats.INSUFFICIENT_SEEDS, stats.ZERO_VARIANCE, stats.NOT_SIGNIFICANT)
    )


@pytest.mark.slow  # shares the study fixture (compiles the game solvers and replica rounds)
def test_game_tables_use_one_value_per_seed(result):
  game = {r["mechanism"]: r for r in st.game_table(result)}
  util = st.per_seed(result.summary, "social_optimum", "social_welfare", 2, 2)[:, 0]
  assert game["social_optimum"]["social_welfare"] == pytest.approx(util.mean())
  # The social optimum maximizes welfare: no mechanism's welfare is above it on any seed.
  for mech in MECHS:
    assert np.all(st.per_seed(result.summary, mech, "social_welfare", 2, 2) <= util[:, None] + 1e-6)
  paired = st.game_paired_table(result)
  assert {r["metric"] for r in paired} == set(st.PAIRED_GAME_METRICS)
  assert all(r["seeds"] == 2 for r in paired)


@pytest.mark.slow  # shares the study fixture (compiles the game solvers and replica rounds)
def test_curves_and_the_scaling_table(result):
  curves = st.curves(result)
  assert len(curves) == (len(MECHS) + 1) * 2
  last = {r["mechanism"]: r["accuracy"] for r in curves if r["round"] == 2}
  table = {r["mechanism"]: r["accuracy"] for r in st.accuracy_table(result)}
  assert last == pytest.approx(table)
  other = result._replace(setting=dataclasses.replace(result.setting, group="scaling"))
  rows = st.gap_vs_clients([other, other])
  assert len(rows) == 2 * (len(MECHS) - 1) and {r["clients"] for r in rows} == {6}
  for row in rows:
    assert row["lam"] == result.setting.cfg.game.lam and row["accuracy"] == pytest.approx(
      table[row["mechanism"]]
    )
    assert row["accuracy_ci"] >= 0 and np.isfinite(row["quality"]) and row["mean_epsilon"] >= 0
  assert list(st.groups([result, other])) == ["scaling"]


@pytest.mark.slow  # shares the study fixture (compiles the game solvers and replica rounds)
def test_a_result_reloads_from_its_summary_and_only_for_its_setting(result, tmp_path):
  def write(setting: st.Setting) -> None:
    report.write_csv_atomic(tmp_path / "tiny_summary.csv", st.summary_rows(result))
    meta = {"setting": dataclasses.asdict(setting), "clients": result.clients, "rows": []}
    report.write_json_atomic(tmp_path / "tiny_accuracy.json", meta)

  # Where the data lives and how the seeds were split into units do not change the rows.
  cfg = result.setting.cfg
  write(
    dataclasses.replace(
      result.setting,
      seeds_per_unit=2,
      cfg=dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path="/elsewhere")),
    )
  )
  loaded = st.load_result(tmp_path, result.setting)
  assert st.redundant_loss_table(loaded) == st.redundant_loss_table(result)
  assert st.accuracy_table(loaded) == st.accuracy_table(result)
  assert loaded.clients == result.clients
  fed = dataclasses.replace(cfg.federated, rounds=5)
  write(dataclasses.replace(result.setting, draws=3, cfg=dataclasses.replace(cfg, federated=fed)))
  with pytest.raises(validate.ConfigError, match=r"settings \(cfg.federated.rounds 5 -> 2; draws 3 -> 2\)"):
    st.load_result(tmp_path, result.setting)
  with pytest.raises(validate.ConfigError, match="missing"):
    st.load_result(tmp_path / "nowhere", result.setting)


def test_max_epsilon_spent_is_the_ledgers_within_the_budget(result):
  """Every private replica's max_epsilon_spent is the accountant's ledger of its clients: finite, positive
  where someone trained, at most eps_max (the calibration certifies each client's budget eps_i <= eps_max),
  equal over the draws of a (seed, mechanism); the non-private ceiling spends without a guarantee (inf)."""
  eps_max = result.setting.cfg.game.eps_max
  for mech in MECHS:
    spent = st.per_seed(result.summary, mech, "max_epsilon_spent", 2, 2)
    assert np.all(np.isfinite(spent)) and np.all(spent > 0) and np.all(spent <= eps_max * (1 + 1e-6))
    assert np.all(spent[:, 0] == spent[:, 1])
  assert all(r["max_epsilon_spent"] == np.inf for r in result.ceiling)


def test_a_resumed_setting_trains_only_its_missing_units_to_the_same_tables(result, units):
  """A run killed after its first unit (here: the second unit's file removed) resumes: the rerun loads the
  first unit (its file untouched), trains the second, and its tables are the uninterrupted run's."""
  setting = result.setting
  assert result.loaded == () and [r.start for r in st.unit_seeds(setting)] == [0, 1]
  first, second = (st.unit_path(units, setting, seeds) for seeds in st.unit_seeds(setting))
  os.remove(second)
  stamp = os.stat(first).st_mtime_ns
  resumed = st.run_setting(setting, units=units)
  assert resumed.loaded == ("seeds-0-0",) and os.path.exists(second) and os.stat(first).st_mtime_ns == stamp
  assert _tables(resumed) == _tables(result)
  # Rerun once more: nothing left to train.
  assert st.run_setting(setting, units=units).loaded == ("seeds-0-0", "seeds-1-1")


def test_units_of_other_settings_are_refused_or_set_aside(result, units):
  setting = result.setting
  cfg = setting.cfg
  game = dataclasses.replace(cfg.game, lam=5.0)
  other = dataclasses.replace(setting, cfg=dataclasses.replace(cfg, game=game))
  assert set(st.check_units(setting, units)) == {"seeds-0-0", "seeds-1-1"}  # before any data is loaded
  with pytest.raises(validate.ConfigError) as refused:
    st.check_units(other, units)
  message = str(refused.value)
  assert "\n" not in message and "setting 'tiny'" in message and "seeds-0-0.json" in message
  assert "game.lam 50.0 -> 5.0" in message and "restart_on_mismatch" in message
  # Other units of this setting (another seed grouping) are not this run's: left alone.
  assert st.check_units(dataclasses.replace(setting, seeds_per_unit=2), units) == {}
  copy = units.parent / "copy.units"
  shutil.copytree(units, copy)
  with open(st.unit_path(copy, setting, range(1, 2)), "w") as f:
    f.write("{")  # a truncated file (not written by write_unit, whose files are whole or absent)
  with pytest.raises(validate.ConfigError, match="seeds-1-1.json is unreadable"):
    st.check_units(setting, copy)
  assert set(st.check_units(other, copy, restart_on_mismatch=True)) == set()
  assert sorted(os.listdir(copy / "tiny")) == ["seeds-0-0.other-run.json", "seeds-1-1.other-run.json"]


def test_settings_and_presets_are_validated():
  with pytest.raises(validate.ConfigError, match="mechanisms="):
    _setting(mechanisms=("stackelberg", "contract"))
  with pytest.raises(validate.ConfigError, match="seeds="):
    _setting(seeds=1)
  with pytest.raises(validate.ConfigError, match="preset="):
    st.preset("nope", "data")
  with pytest.raises(validate.ConfigError, match="settings="):
    st.preset("quick", "data", ["femnist_logreg", "cifar"])
  quick = st.preset("quick", "data", seeds=4)
  assert {s.seeds for s in quick} == {4} and any(s.group == "scaling" for s in quick)
  paper = {s.name: s for s in st.preset("paper", "/d")}
  assert paper["femnist_logreg"].seeds >= 10 and paper["femnist_logreg"].draws >= 3
  assert [s.cfg.data.num_clients for s in paper.values() if s.group == "scaling"] == [100, 1000, 5000]
  assert paper["cifar10_iid_cnn"].cfg.data.path == "/d"


# ----------------------------------------------------------------------------------------------------------
# The valuation study (scripts/valuation_study.py): draws averaged, the pairs, Q re-valued.
# ----------------------------------------------------------------------------------------------------------


def _replica_rows(accuracy: np.ndarray, quality) -> list[dict]:
  """Replica rows (one per seed, mechanism, draw) of accuracy [seeds, mechanisms, draws], with Q per
  (seed, mechanism) = quality(seed, mechanism index, the draws' mean accuracy)."""
  return [
    {
      "seed": s,
      "mechanism": m,
      "draw": d,
      "test_accuracy": float(accuracy[s, i, d]),
      "quality": quality(s, i, accuracy[s, i].mean()),
    }
    for s in range(accuracy.shape[0])
    for i, m in enumerate(fc.MECHANISMS)
    for d in reversed(range(accuracy.shape[2]))  # any order: rows are matched by their draw
  ]


def _by_pairs(rows: list[dict]) -> dict[str, dict]:
  return {r["pairs"]: r for r in rows}


def test_outcome_rows_average_the_draws_and_keep_each():
  acc = np.random.default_rng(0).uniform(0.3, 0.7, (3, len(fc.MECHANISMS), 2))
  rows = st.outcome_rows(_replica_rows(acc, lambda s, i, a: float(s)))
  assert [(r["seed"], r["mechanism"]) for r in rows] == [(s, m) for s in range(3) for m in fc.MECHANISMS]
  for r in rows:
    i = fc.MECHANISMS.index(r["mechanism"])
    assert r["test_accuracy"] == pytest.approx(acc[r["seed"], i].mean()) and r["draws"] == 2
    assert (r["accuracy_draw_0"], r["accuracy_draw_1"]) == tuple(acc[r["seed"], i])


def test_quality_spearman_is_one_for_q_monotone_in_the_draw_averaged_accuracy():
  rng = np.random.default_rng(1)
  acc = rng.uniform(0.3, 0.7, (4, len(fc.MECHANISMS), 3))
  rows = st.outcome_rows(_replica_rows(acc, lambda s, i, a: -np.exp(-10 * a)))  # Q = -V, V falls with acc
  rows = [dict(r, quality_flipped=-r["quality"]) for r in rows]
  table = _by_pairs(st.quality_spearman(rows, ("quality", "quality_flipped")))
  assert list(table) == list(st.QUALITY_PAIRS)
  for pairs, count in zip(st.QUALITY_PAIRS, (24, 20, 4)):
    assert table[pairs]["count"] == count
    assert table[pairs]["spearman"] == pytest.approx(1.0)
    assert table[pairs]["spearman_flipped"] == pytest.approx(-1.0)
  # Q follows the draws' mean, not draw 0 alone (draw noise of the size of the spread breaks the ranks).
  assert table[st.QUALITY_PAIRS[0]]["spearman_draw0"] < 0.99


def test_quality_spearman_market_leaves_out_no_incentive_and_ranks_no_model_last():
  acc = np.random.default_rng(2).uniform(0.3, 0.7, (3, len(fc.MECHANISMS), 1))
  mandate = fc.MECHANISMS.index("no_incentive")
  acc[:, mandate] = 0.1  # the mandate's model is the worst but its Q the best: only "all" pairs see it
  rows = st.outcome_rows(_replica_rows(acc, lambda s, i, a: 10.0 if i == mandate else float(a)))
  table = _by_pairs(st.quality_spearman(rows))
  assert table["all but no_incentive"]["spearman"] == pytest.approx(1.0)
  assert table["all (mechanism, seed)"]["spearman"] < 0.9
  assert table["within a seed, mean"]["spearman"] < 0.9
  # Q = -inf (nobody participates) ranks below every finite Q: with the lowest accuracy, rho stays 1.
  rows = st.outcome_rows(_replica_rows(acc, lambda s, i, a: -np.inf if i == mandate else float(a)))
  assert _by_pairs(st.quality_spearman(rows))["all (mechanism, seed)"]["spearman"] == pytest.approx(1.0)
  with pytest.raises(validate.ConfigError, match="seeds=\\[0, 0\\] is invalid"):
    st.check_valuation([0, 0], ["stackelberg"], 1)
  with pytest.raises(validate.ConfigError, match="draws=0 is invalid: expected an integer >= 1"):
    st.check_valuation([0, 1], ["stackelberg"], 0)


@pytest.mark.slow  # trains 2 seeds x 3 mechanisms and builds the accountant's noise table
def test_valuation_outcomes_carry_the_ledgers_max_epsilon_spent():
  setting = _setting()
  configs = [setting.config(seed, "stackelberg", 0) for seed in range(2)]
  datasets = st.load_shared([cfg.data for cfg in configs])
  rows = st.valuation_outcomes(configs, datasets, MECHS, 1)
  assert len(rows) == 2 * len(MECHS)
  for row in rows:
    assert 0 < row["max_epsilon_spent"] <= setting.cfg.game.eps_max * (1 + 1e-6), row


def test_rescored_quality_is_the_outcomes_q_under_the_other_noise_map(monkeypatch):
  """Under its own map the outcome's Q; under the accountant's, the Q with the clients' noise table, built
  once for a seed's mechanisms from their sampling rates. The table is a stand-in, the surrogate's z / 3
  (the real one compiles for seconds; test_valuation.py holds it against the accountant), so Q is the
  surrogate's Q / 9."""
  setting = _setting()  # the study fixture's games: their solvers are compiled already
  fed = st.load_seeds(setting)[0]
  exps = [simulation.prepare(setting.config(0, m, 32), fed) for m in ("posted_price", "social_optimum")]
  own = st.rescored_quality(exps, "surrogate")
  np.testing.assert_allclose(own, [e.outcome.quality for e in exps], rtol=1e-12)

  def table(rates, spec):
    built.append((np.asarray(rates), spec))
    z = surrogate.surrogate_noise_multiplier(jnp.exp(jnp.asarray(NOISE_LOG_EPS)), spec.steps, spec.delta)
    return jnp.broadcast_to(jnp.log(z / 3), (rates.shape[0], len(NOISE_LOG_EPS)))

  built = []
  monkeypatch.setattr(valuation, "noise_table", table)
  rescored = st.rescored_quality(exps, "accountant")
  assert len(built) == 1
  rates, spec = built[0]
  np.testing.assert_array_equal(rates, exps[0].sampling_rates)
  assert (spec.noise_model, spec.steps, spec.delta) == ("accountant", 2, exps[0].cfg.privacy.delta)
  np.testing.assert_allclose(rescored, own / 9, rtol=1e-3)
  with pytest.raises(validate.ConfigError, match="noise_model='exact' is invalid"):
    st.rescored_quality(exps, "exact")


@pytest.mark.slow
def test_the_quick_preset_writes_every_table(tmp_path):
  out = tmp_path / "quick"
  script = os.path.join(cli.REPO, "scripts", "study.py")
  proc = subprocess.run(
    [sys.executable, script, "--preset=quick", f"--out={out}", "--progress=false"],
    cwd=cli.REPO,
    env=cli.env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  files = set(os.listdir(out))
  for name in (
    "femnist_logreg_accuracy.md",
    "femnist_logreg_vs_stackelberg.csv",
    "scaling.md",
    "timings.csv",
  ):
    assert name in files
  assert "scaling_gap_vs_clients.png" in files


# ----------------------------------------------------------------------------------------------------------
# scripts/study.py: resuming after a kill, --dry_run, --combine.
# ----------------------------------------------------------------------------------------------------------

# A tiny study: the quick preset's writer setting (one unit per seed) at 1 round and 1 draw.
TINY_STUDY = ["--preset=quick", "--settings=femnist_logreg", "--draws=1", "--rounds=1", "--progress=false"]
TABLES = ("accuracy", "redundant_loss", "vs_stackelberg", "vs_social_optimum", "game", "game_vs_stackelberg")


@pytest.fixture(scope="module")
def study_script():
  """scripts/study.py in one worker process (tests/cli.py): its import and compiled programs are shared."""
  worker = cli.ScriptWorker("study.py")
  yield worker
  worker.close()


def _one_line_error(result: cli.Result, *parts: str) -> None:
  assert result.rc == 2, result
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  for part in parts:
    assert part in lines[0], lines[0]


def test_dry_run_loads_every_settings_data(study_script, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  out = tmp_path / "out"
  refused = study_script(
    "--preset=paper", "--settings=femnist62_cnn", f"--data_dir={empty}", "--dry_run", f"--out={out}"
  )
  _one_line_error(refused, f"path='{empty / 'femnist_leaf_subset.npz'}' does not exist")
  checked = study_script(*TINY_STUDY, "--seeds=2", "--dry_run", f"--out={out}")
  assert checked.rc == 0, checked
  assert "femnist_logreg: the data of 2 seeds loads (10 clients); 0 of 2 units finished" in checked.stdout
  assert not os.path.exists(out) and not os.path.exists(f"{out}.units")


def test_combine_refuses_a_folder_of_other_settings(study_script, tmp_path):
  folder = tmp_path / "earlier"
  folder.mkdir()
  (setting,) = st.preset("quick", "", ["femnist_logreg"], rounds=1)
  report.write_csv_atomic(folder / "femnist_logreg_summary.csv", [{"mechanism": "stackelberg"}])
  meta = {"setting": dataclasses.asdict(setting), "clients": {}, "rows": []}
  report.write_json_atomic(folder / "femnist_logreg_accuracy.json", meta)
  refused = study_script(
    "--preset=quick", "--settings=femnist_logreg", f"--combine={folder}", f"--out={tmp_path / 'out'}"
  )
  _one_line_error(refused, "setting 'femnist_logreg' made with other settings (cfg.federated.rounds 1 -> 2)")
  assert not os.path.exists(tmp_path / "out")


def _unit_files(folder) -> list[str]:
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.mark.slow  # three studies of 4 seeds x 6 mechanisms, one of them in a fresh process
def test_a_killed_study_resumes_to_the_same_tables_and_refuses_other_settings(study_script, tmp_path):
  run = [*TINY_STUDY, "--seeds=4"]
  out, whole = tmp_path / "killed", tmp_path / "whole"
  units = tmp_path / "killed.units" / "femnist_logreg"
  script = os.path.join(cli.REPO, "scripts", "study.py")
  killed = subprocess.Popen(
    [sys.executable, script, *run, f"--out={out}"],
    cwd=cli.REPO,
    env=cli.env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 900
  while "seeds-0-0.json" not in _unit_files(units):
    assert killed.poll() is None, "the study ended before its first unit was saved"
    assert time.monotonic() < deadline, "no unit saved in 900 s"
    time.sleep(0.01)
  killed.kill()
  killed.wait()
  saved = _unit_files(units)
  assert "seeds-3-3.json" not in saved and not out.exists()  # killed mid-study: no results folder
  stamps = {name: os.stat(units / name).st_mtime_ns for name in saved}
  resumed = study_script(*run, f"--out={out}")
  assert resumed.rc == 0, resumed
  assert f"femnist_logreg: loaded {len(saved)} finished units" in resumed.stdout
  assert {name: os.stat(units / name).st_mtime_ns for name in saved} == stamps  # loaded, not retrained
  assert _unit_files(units) == [f"seeds-{s}-{s}.json" for s in range(4)]
  assert study_script(*run, f"--out={whole}").rc == 0
  for table in (*TABLES, "curves"):
    name = f"femnist_logreg_{table}.csv"
    assert (out / name).read_text() == (whole / name).read_text(), name
  # Another setting (2 rounds) is refused before any work, or with --restart_on_mismatch recomputed.
  other = [*run, "--rounds=2", f"--out={out}"]
  _one_line_error(
    study_script(*other),
    "setting 'femnist_logreg'",
    "seeds-0-0.json",
    "federated.rounds 1 -> 2",
    "--restart_on_mismatch",
  )
  assert {name: os.stat(units / name).st_mtime_ns for name in saved} == stamps
  restarted = study_script(*other, "--restart_on_mismatch")
  assert restarted.rc == 0, restarted
  assert _unit_files(units) == sorted(
    f"seeds-{s}-{s}{suffix}" for s in range(4) for suffix in (".json", ".other-run.json")
  )
  with open(out / "femnist_logreg_curves.csv", newline="") as f:
    assert {row["round"] for row in csv.DictReader(f)} == {"1", "2"}
  assert "loaded" not in restarted.stdout


def test_the_paper_scaling_groups_scale_lambda_with_n_or_hold_it():
  settings = {s.name: s for s in st.preset("paper", "data")}
  for n in (100, 1000, 5000):
    scaled, fixed = settings[f"scaling_n{n}"], settings[f"scaling_fixed_lambda_n{n}"]
    assert (scaled.group, fixed.group) == ("scaling", "scaling_fixed_lambda")
    assert scaled.cfg.game.lam == pytest.approx(fixed.cfg.game.lam * n / 40)
    assert fixed.cfg.game.lam == settings["femnist_logreg"].cfg.game.lam
    assert dataclasses.replace(scaled.cfg, game=fixed.cfg.game) == fixed.cfg

"""The study: every mechanism over seeds x training-noise draws, trained as replicas, reported with
confidence intervals and paired differences (docs/model.md "Metrics", "Study"; docs/RESULTS.md).

A *setting* is one experiment design (data, model, schedule, privacy) run over ``seeds`` seeds (each seed
draws the clients' costs and the data partition: ``SimulationConfig.seed`` = ``DataConfig.seed``) x
``draws`` training-noise draws (``SimulationConfig.draw``) x every mechanism. The private runs of a unit
of seeds train as replicas of one program (:mod:`fcfn_jax.replicas`); the non-private ceiling (every
client, no clipping, no noise, plain FedAvg) trains once per seed beside them.

Tables (all statistics from :mod:`fcfn_jax.stats`: draws are averaged per seed, the interval is Student's t
over the seeds, comparisons are paired by seed):
  accuracy: final test accuracy per mechanism, mean and 95% CI, and the non-private ceiling.
  vs_stackelberg, vs_social_optimum: paired accuracy differences (mechanism - reference) with verdicts;
    redundant accuracy loss = -(mechanism - social_optimum).
  game: the game-level metrics (deterministic per seed) with their CI over seeds, and the paired
    differences of server and average utility vs Stackelberg.
  curves: accuracy per round, mean and CI per mechanism (the plots' bands).

Resuming (docs/model.md "Study"): a setting's seeds are trained in *units* of ``seeds_per_unit`` seeds
(every mechanism x draw of those seeds and their ceiling runs). Each finished
unit is written whole (:func:`write_unit`: a temporary file renamed into place) to
``<units>/<setting>/seeds-<a>-<b>.json`` with its fingerprint (:func:`unit_fingerprint`: every config field
that can change its results, its seeds, draws, mechanisms, evaluation and cohort settings, the pool
capacity and its seeds' data digest). :func:`run_setting` loads every finished unit with the same
fingerprint and trains only the others, so a killed study rerun with the same command gives the tables of
an uninterrupted one; a unit with another fingerprint is refused (:func:`check_units`), or set aside and
recomputed with ``restart_on_mismatch``.

The valuation study (scripts/valuation_study.py) reuses the replicas for any list of seeds:
:func:`valuation_outcomes` (one row per (seed, mechanism), draws averaged, Q also re-valued under the other
noise map: :func:`rescored_quality`) and :func:`quality_spearman` (rank correlations of Q with accuracy).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax import data, distributed, fingerprint, replicas, simulation, stats
from fcfn_jax.config import (
  MECHANISM_LABELS,
  MECHANISMS,
  NOISE_MODELS,
  DataConfig,
  FederatedConfig,
  ModelConfig,
  PrivacyConfig,
  SimulationConfig,
)
from fcfn_jax.game import valuation
from fcfn_jax.game.spec import make_game, spec_from_config
from fcfn_jax.report import Timer, csv_value, write_json_atomic
from fcfn_jax.validate import check_choice, check_int, fail, require

Row = dict[str, Any]
logger = logging.getLogger(__name__)
REFERENCES = ("stackelberg", "social_optimum")
GAME_METRICS = simulation.GAME_COLUMNS
PAIRED_GAME_METRICS = ("server_utility", "average_utility", "social_welfare")
CEILING = "non_private"
PAPER_LOGREG_ROUNDS = 20
PAPER_CNN_ROUNDS = 10
SCALING_DRAWS = 3
PAPER_SEEDS_PER_UNIT = 2  # a killed paper study loses at most one unit of 2 seeds per setting
# Bump when the meaning of a unit file's rows changes: older units then no longer match.
UNIT_LAYOUT = 1
# Fingerprint parts known only once the data is loaded (check_units without datasets skips them).
DATA_PARTS = ("data_digest", "study.capacity")
OTHER_RUN = ".other-run.json"  # suffix of a unit file set aside by restart_on_mismatch


@dataclasses.dataclass(frozen=True)
class Setting:
  """One design of the study.

  Attributes:
    name: the setting's name (tables, folders).
    cfg: the base config; its seed, data.seed, draw and game.mechanism are set per replica.
    seeds: seeds 0 .. seeds - 1 (>= 2: a confidence interval needs two).
    draws: training-noise draws per (seed, mechanism) (>= 1).
    mechanisms: the mechanisms compared (must hold both references: stackelberg and social_optimum).
    eval_examples: test examples of the intermediate rounds' accuracy (0 = all; the last round uses all).
    group: settings of one group (e.g. 'scaling': one per N) form one table across them ('' = none).
    cohort_size: replicas' cohort size (0 = grouped by participant count; K = one program, padded to K).
    seeds_per_unit: seeds trained together and saved as one unit (:func:`run_setting`; 0 = all seeds).
  """

  name: str
  cfg: SimulationConfig
  seeds: int = 10
  draws: int = 3
  mechanisms: tuple[str, ...] = MECHANISMS
  eval_examples: int = 0
  group: str = ""
  cohort_size: int = 0
  seeds_per_unit: int = 0

  def __post_init__(self):
    require(bool(self.name) and self.name.isidentifier(), f"name={self.name!r} is invalid: expected a word")
    require(
      isinstance(self.cfg, SimulationConfig), f"cfg={self.cfg!r} is invalid: expected a SimulationConfig"
    )
    check_int("seeds", self.seeds, minimum=2)
    check_int("draws", self.draws, minimum=1)
    check_int("eval_examples", self.eval_examples, minimum=0)
    check_int("cohort_size", self.cohort_size, minimum=0)
    check_int("seeds_per_unit", self.seeds_per_unit, minimum=0)
    require(
      self.group == "" or self.group.isidentifier(), f"group={self.group!r} is invalid: expected a word"
    )
    unknown = [m for m in self.mechanisms if m not in MECHANISMS]
    require(not unknown, f"mechanisms={self.mechanisms!r} is invalid: expected names from {MECHANISMS}")
    missing = [m for m in REFERENCES if m not in self.mechanisms]
    require(
      not missing and len(set(self.mechanisms)) == len(self.mechanisms),
      f"mechanisms={self.mechanisms!r} is invalid: expected distinct names holding {REFERENCES}",
    )

  def config(self, seed: int, mechanism: str, capacity: int, ceiling: bool = False) -> SimulationConfig:
    """The config of (seed, mechanism): seed and data.seed = seed, the seeds' shared pool capacity; the
    ceiling's is non-private (no clipping, no noise) with plain FedAvg weights."""
    cfg = self.cfg
    return dataclasses.replace(
      cfg,
      seed=seed,
      data=dataclasses.replace(cfg.data, seed=seed, capacity=capacity),
      game=dataclasses.replace(
        cfg.game, mechanism=mechanism, aggregation="fedavg" if ceiling else cfg.game.aggregation
      ),
      # The ceiling trains without noise: its z_i are never used, so the cheapest map computes them.
      privacy=dataclasses.replace(cfg.privacy, private=False, calibration="surrogate")
      if ceiling
      else cfg.privacy,
    )


class Result(NamedTuple):
  """A setting's raw results: one summary row per replica (private runs), their history rows, the
  non-private ceiling's summary and history rows (one draw per seed), the data's sizes, the timings, and
  the labels of the units read back from disk instead of trained (:func:`run_setting`)."""

  setting: Setting
  summary: list[Row]
  history: list[Row]
  ceiling: list[Row]
  ceiling_history: list[Row]
  clients: Row
  timings: list[Row]
  loaded: tuple[str, ...] = ()


def load_shared(configs: Sequence[DataConfig]) -> list[data.FederatedData]:
  """Each config's data with one pool capacity (replicas share one pool; ``replicas.stack_pools``).

  Where a config's capacity is 0 its data is loaded with the largest client over all configs as capacity,
  so no client is subsampled and it equals what ``simulation.run`` loads with that explicit capacity.
  """
  loaded = [data.load_federated(cfg) for cfg in configs]
  capacity = max(d.pool.x.shape[1] for d in loaded)
  return [
    d
    if cfg.capacity or d.pool.x.shape[1] == capacity
    else data.load_federated(dataclasses.replace(cfg, capacity=capacity))
    for cfg, d in zip(configs, loaded)
  ]


def load_seeds(setting: Setting) -> dict[int, data.FederatedData]:
  """Every seed's data with one pool capacity (:func:`load_shared`; with ``capacity = 0`` the largest
  client over all seeds)."""
  cfg = setting.cfg.data
  seeds = range(setting.seeds)
  return dict(zip(seeds, load_shared([dataclasses.replace(cfg, seed=seed) for seed in seeds])))


def capacity_of(datasets: Mapping[int, data.FederatedData]) -> int:
  """The pool capacity the seeds share."""
  return int(next(iter(datasets.values())).pool.x.shape[1])


def _prepare(cfg: SimulationConfig, fed_data: data.FederatedData) -> simulation.Experiment:
  # Replicas index one stacked pool: each experiment's own device copy of its participants is not needed.
  return simulation.prepare(cfg, fed_data)._replace(train_pool=None)


def run_setting(
  setting: Setting,
  *,
  progress: bool = False,
  units: str | os.PathLike[str] | None = None,
  restart_on_mismatch: bool = False,
) -> Result:
  """Trains every (seed, mechanism, draw) of ``setting`` as replicas, and the non-private ceiling, one
  unit of seeds at a time (:func:`unit_seeds`).

  With ``units`` (a folder) every finished unit is written there (:func:`write_unit`), and a unit written
  there before with this run's fingerprint is read back instead of trained (:func:`check_units`: a unit of
  another run is refused, or set aside and recomputed with ``restart_on_mismatch``). The rows are the
  units' rows as read back, so a resumed setting's tables are those of an uninterrupted one.
  """
  datasets = load_seeds(setting)
  capacity = capacity_of(datasets)
  finished = (
    {} if units is None else check_units(setting, units, datasets, restart_on_mismatch=restart_on_mismatch)
  )
  parts = []
  for seeds in unit_seeds(setting):
    unit = finished.get(unit_label(seeds))
    if unit is None:
      unit = _train_unit(setting, seeds, datasets, capacity, progress)
      if units is not None:
        unit = write_unit(units, setting, seeds, unit, unit_fingerprint(setting, seeds, datasets))
    parts.append(unit)
  sizes = np.concatenate([np.asarray(d.pool.num_examples) for d in datasets.values()])
  clients = {
    "clients": setting.cfg.data.num_clients,
    "capacity": capacity,
    "examples_min": int(sizes.min()),
    "examples_median": float(np.median(sizes)),
    "examples_mean": float(sizes.mean()),
    "examples_max": int(sizes.max()),
    "test_examples": int(len(next(iter(datasets.values())).test.y)),
  }
  rows = {key: [row for unit in parts for row in unit[key]] for key in _UNIT_ROWS}
  return Result(setting, **rows, clients=clients, loaded=tuple(finished))


def _train_unit(
  setting: Setting,
  seeds: range,
  datasets: Mapping[int, data.FederatedData],
  capacity: int,
  progress: bool,
) -> Row:
  """One unit: every (seed, mechanism, draw) of ``seeds`` as replicas of one program and the seeds'
  non-private ceiling runs; its rows by kind (``_UNIT_ROWS``). Each (seed, mechanism)'s spent epsilon is
  accounted once (its draws share the noise multipliers): the summaries' max_epsilon_spent."""
  label = unit_label(seeds)
  timings = []
  with Timer() as prep:
    experiments = [
      _prepare(setting.config(seed, mech, capacity), datasets[seed])
      for seed in seeds
      for mech in setting.mechanisms
    ]
  timings.append({"unit": label, "part": "prepare (mechanisms, calibration)", "wall_time_s": prep.elapsed})
  runs = [replicas.Replica(e, d) for e in range(len(experiments)) for d in range(setting.draws)]
  trained = replicas.run(
    experiments,
    runs,
    eval_examples=setting.eval_examples,
    cohort_size=setting.cohort_size,
    progress=progress,
  )
  timings += [
    {"unit": label, "part": f"train {t['replicas']} replicas x {t['cohort_size']} clients", **t}
    for t in trained.timings
  ]
  with Timer() as ceiling_time:
    ceilings = [
      _prepare(setting.config(seed, "no_incentive", capacity, ceiling=True), datasets[seed]) for seed in seeds
    ]
    top = replicas.run(
      ceilings,
      [replicas.Replica(s, 0) for s in range(len(ceilings))],
      eval_examples=setting.eval_examples,
      progress=progress,
      account=False,
    )
  # Non-private: no noise, no guarantee (epsilon = inf), whatever the ledger would count.
  ceiling = [dict(row, max_epsilon_spent=float("inf")) for row in top.summary]
  timings.append(
    {"unit": label, "part": f"non-private ceiling, {len(seeds)} seeds", "wall_time_s": ceiling_time.elapsed}
  )
  return {
    "summary": trained.summary,
    "history": trained.history,
    "ceiling": ceiling,
    "ceiling_history": top.history,
    "timings": timings,
  }


# ----------------------------------------------------------------------------------------------------------
# Units: what a study saves as it goes, so that a rerun of the same command resumes (module docstring).
# ----------------------------------------------------------------------------------------------------------

_UNIT_ROWS = ("summary", "history", "ceiling", "ceiling_history", "timings")


def unit_seeds(setting: Setting) -> list[range]:
  """The setting's units: consecutive ranges of ``seeds_per_unit`` seeds (the last may be shorter)."""
  size = setting.seeds_per_unit or setting.seeds
  return [range(first, min(first + size, setting.seeds)) for first in range(0, setting.seeds, size)]


def unit_label(seeds: range) -> str:
  """``seeds-<first>-<last>``: a unit's name (its file is ``<label>.json``)."""
  return f"seeds-{seeds[0]}-{seeds[-1]}"


def unit_path(folder: str | os.PathLike[str], setting: Setting, seeds: range) -> str:
  """Where a unit of ``setting`` is saved: ``<folder>/<setting>/seeds-<first>-<last>.json``."""
  return os.path.join(os.fspath(folder), setting.name, f"{unit_label(seeds)}.json")


def unit_fingerprint(
  setting: Setting, seeds: range, datasets: Mapping[int, data.FederatedData] | None = None
) -> fingerprint.Fingerprint:
  """What determines a unit's rows: ``simulation.run_fingerprint`` of the setting's config (every field
  that can change results), the unit's seeds, the draws, mechanisms, evaluation subsample, cohort size and
  ``UNIT_LAYOUT``; with ``datasets`` (every seed's, :func:`load_seeds`) also ``DATA_PARTS``: the pool
  capacity the seeds share and the digest of the unit's seeds' data (without them both are absent)."""
  digest = None
  if datasets is not None:
    digest = fingerprint.digest({str(s): simulation.data_digest(datasets[s]) for s in seeds})
  parts = simulation.run_fingerprint(setting.cfg, digest)
  parts.update(
    {
      "study.seeds": list(seeds),
      "study.draws": setting.draws,
      "study.mechanisms": list(setting.mechanisms),
      "study.eval_examples": setting.eval_examples,
      "study.cohort_size": setting.cohort_size,
      "study.unit_layout": UNIT_LAYOUT,
    }
  )
  if datasets is None:
    del parts["data_digest"]
  else:
    parts["study.capacity"] = capacity_of(datasets)
  return fingerprint.canonical(parts)


def check_units(
  setting: Setting,
  folder: str | os.PathLike[str],
  datasets: Mapping[int, data.FederatedData] | None = None,
  *,
  restart_on_mismatch: bool = False,
) -> dict[str, Row]:
  """The finished units of ``setting`` saved in ``folder`` with this run's fingerprint: label -> unit.

  A unit file with another fingerprint (other settings, rounds, seeds per unit..., or other data), or one
  that cannot be read, is refused, or with ``restart_on_mismatch`` renamed to ``<label>.other-run.json``
  (replacing an older one) so that the run recomputes it. Without ``datasets`` the parts that need the
  data (``DATA_PARTS``) are not compared: a check before any data is loaded. Files of another seed
  grouping are not this run's units and are left alone. Several processes: process 0 reads (and renames);
  every process gets its answer.

  Raises:
    ConfigError: naming the setting, the file and the differing parts (without ``restart_on_mismatch``).
  """
  return distributed.run_on_coordinator(
    lambda: _check_units(setting, os.fspath(folder), datasets, restart_on_mismatch)
  )


def _check_units(
  setting: Setting,
  folder: str,
  datasets: Mapping[int, data.FederatedData] | None,
  restart_on_mismatch: bool,
) -> dict[str, Row]:
  finished = {}
  for seeds in unit_seeds(setting):
    path = unit_path(folder, setting, seeds)
    if not os.path.exists(path):
      continue
    expected = unit_fingerprint(setting, seeds, datasets)
    try:
      with open(path) as f:
        unit = json.load(f)
      stored = {k: v for k, v in unit["fingerprint"].items() if datasets is not None or k not in DATA_PARTS}
      complete = all(isinstance(unit[key], list) for key in _UNIT_ROWS)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
      stored, complete, what = None, False, f"unreadable: {type(error).__name__}"
    if stored == expected and complete:
      finished[unit_label(seeds)] = unit
      continue
    if stored is not None:
      changed = fingerprint.differences(stored, expected)
      what = f"made with other settings: {changed}" if changed else "incomplete (rows missing)"
    if not restart_on_mismatch:
      fail(
        f"setting {setting.name!r}: unit {path} is {what}; rerun with the settings it was made with to "
        "resume, restart_on_mismatch=True (--restart_on_mismatch) to recompute it, or use another output "
        "folder"
      )
    os.replace(path, path.removesuffix(".json") + OTHER_RUN)
    logger.warning("setting %r: unit %s is %s: set aside, recomputing it", setting.name, path, what)
  return finished


def write_unit(
  folder: str | os.PathLike[str], setting: Setting, seeds: range, unit: Row, parts: fingerprint.Fingerprint
) -> Row:
  """Saves a finished unit with its fingerprint ``parts`` atomically (a temporary file renamed into
  place: a killed run leaves the whole file or none) and returns it as read back, so that its rows are
  those a resumed run loads. Several processes: process 0 writes; every process gets what it read."""

  def write() -> Row:
    path = unit_path(folder, setting, seeds)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, {"fingerprint": parts, "setting": setting.name, "seeds": list(seeds), **unit})
    with open(path) as f:
      return json.load(f)

  return distributed.run_on_coordinator(write)


def check_data(setting: Setting) -> Row:
  """Loads every seed's data of ``setting`` (one at a time) as a run would: raises ConfigError where it is
  missing or cannot be partitioned. Returns the clients and the examples of the largest client."""
  largest = 0
  for seed in range(setting.seeds):
    fed = data.load_federated(dataclasses.replace(setting.cfg.data, seed=seed))
    largest = max(largest, int(np.max(fed.pool.num_examples)))
  return {"setting": setting.name, "clients": setting.cfg.data.num_clients, "examples_max": largest}


def per_seed(rows: Sequence[Row], mechanism: str, metric: str, seeds: int, draws: int) -> np.ndarray:
  """``metric`` of ``mechanism``'s replicas as an array [seeds, draws] (seed-major, draw order)."""
  values = np.full((seeds, draws), np.nan)
  for r in rows:
    if r["mechanism"] == mechanism:
      values[r["seed"], r["draw"]] = r[metric]
  require(
    not np.isnan(values).any(), f"{mechanism}: {metric} is missing for some (seed, draw) of {seeds} x {draws}"
  )
  return values


def _interval_row(interval: stats.Interval, prefix: str) -> Row:
  return {
    f"{prefix}": interval.mean,
    f"{prefix}_ci_low": interval.low,
    f"{prefix}_ci_high": interval.high,
  }


def accuracy_table(result: Result) -> list[Row]:
  """Final test accuracy per mechanism (mean and 95% CI over seeds, draws averaged per seed), and the
  non-private ceiling as the last row."""
  s = result.setting
  rows = []
  for mech in s.mechanisms:
    acc = per_seed(result.summary, mech, "test_accuracy", s.seeds, s.draws)
    interval = stats.mean_interval(acc)
    rows.append(
      {
        "mechanism": mech,
        "label": MECHANISM_LABELS[mech],
        **_interval_row(interval, "accuracy"),
        "summary": format(interval, ".3f"),
        "seeds": s.seeds,
        "draws": s.draws,
      }
    )
  ceiling = stats.mean_interval(per_seed(result.ceiling, "no_incentive", "test_accuracy", s.seeds, 1))
  rows.append(
    {
      "mechanism": CEILING,
      "label": "non-private (ceiling)",
      **_interval_row(ceiling, "accuracy"),
      "summary": format(ceiling, ".3f"),
      "seeds": s.seeds,
      "draws": 1,
    }
  )
  return rows


def paired_table(result: Result, reference: str, metric: str = "test_accuracy") -> list[Row]:
  """Paired differences (mechanism - reference) of ``metric`` over seeds, with the verdict."""
  s = result.setting
  values = {m: per_seed(result.summary, m, metric, s.seeds, s.draws) for m in s.mechanisms}
  return [{"metric": metric, **row} for row in stats.pairwise_table(values, reference, floatfmt=".3f")]


def redundant_loss_table(result: Result) -> list[Row]:
  """Redundant accuracy loss per mechanism: accuracy(social optimum) - accuracy(mechanism), paired by seed
  and draw (docs/model.md "Metrics"), mean and 95% CI over seeds."""
  s = result.setting
  best = per_seed(result.summary, "social_optimum", "test_accuracy", s.seeds, s.draws)
  rows = []
  for mech in s.mechanisms:
    if mech == "social_optimum":
      continue
    loss = stats.paired_difference(best, per_seed(result.summary, mech, "test_accuracy", s.seeds, s.draws))
    rows.append(
      {
        "mechanism": mech,
        "label": MECHANISM_LABELS[mech],
        **_interval_row(loss, "redundant_accuracy_loss"),
        "summary": format(loss, ".3f"),
        "significant": loss.significant(),
      }
    )
  return rows


def game_table(result: Result) -> list[Row]:
  """Game-level metrics per mechanism: mean and 95% CI over seeds (one value per seed: the game does not
  depend on the training draw)."""
  s = result.setting
  rows = []
  for mech in s.mechanisms:
    row: Row = {"mechanism": mech, "label": MECHANISM_LABELS[mech]}
    for metric in GAME_METRICS:
      interval = stats.mean_interval(per_seed(result.summary, mech, metric, s.seeds, s.draws)[:, 0])
      row[metric] = interval.mean
      row[f"{metric}_ci"] = interval.half_width
    rows.append(row)
  return rows


def game_paired_table(result: Result) -> list[Row]:
  """Paired differences of the game-level utilities vs Stackelberg (one value per seed), with verdicts."""
  s = result.setting
  rows = []
  for metric in PAIRED_GAME_METRICS:
    values = {m: per_seed(result.summary, m, metric, s.seeds, s.draws)[:, :1] for m in s.mechanisms}
    rows += [{"metric": metric, **row} for row in stats.pairwise_table(values, "stackelberg", floatfmt=".4g")]
  return rows


def quality_correlation(result: Result) -> float:
  """Spearman's rho of the valuation Q and the final accuracy (draws averaged) over mechanisms x seeds."""
  return quality_spearman(outcome_rows(result.summary))[0]["spearman"]


# ----------------------------------------------------------------------------------------------------------
# The valuation study (scripts/valuation_study.py; docs/model.md "Metrics"): is Q what training produces?
# ----------------------------------------------------------------------------------------------------------

QUALITY_PAIRS = ("all (mechanism, seed)", "all but no_incentive", "within a seed, mean")


def rescored_quality(experiments: Sequence[simulation.Experiment], noise_model: str) -> np.ndarray:
  """Q of each experiment's outcome re-valued under the eps -> noise map ``noise_model``: [experiments].

  Q(eps) = -V(eps) (docs/model.md "Stage I") of the outcome's budgets eps [clients] in the game of the
  experiment's config with ``GameConfig.noise_model = noise_model`` (same costs, weights, sampling rates,
  data budget, aggregation rule): the mechanism's outcome stays what was trained, only its valuation
  changes. Under the map it was solved with this is ``outcome.quality``. The accountant's noise table is
  built once per distinct (sampling rates, steps, delta), i.e. once per seed: its mechanisms share it.
  """
  check_choice("noise_model", noise_model, NOISE_MODELS)
  tables: dict[tuple, Any] = {}
  out = []
  with jax.enable_x64(True):
    for exp in experiments:
      game_cfg = dataclasses.replace(exp.cfg.game, noise_model=noise_model)
      spec = spec_from_config(game_cfg, simulation.total_steps(exp.cfg), exp.cfg.privacy.delta)
      game = make_game(exp.costs, exp.weights, exp.sampling_rates, game_cfg, jnp.float64)
      if noise_model == "accountant":
        key = (np.asarray(exp.sampling_rates, np.float64).tobytes(), spec.steps, spec.delta)
        if key not in tables:
          tables[key] = valuation.noise_table(game.sampling_rates, spec)
        game = game._replace(noise_table=tables[key])
      out.append(float(valuation.quality(jnp.asarray(exp.outcome.budgets, jnp.float64), game, spec)))
  return np.asarray(out, np.float64)


def check_valuation(seeds: Sequence[int], mechanisms: Sequence[str], draws: int) -> None:
  """Raises ConfigError unless the seeds and the mechanisms are distinct (one row per pair) and non-empty
  and draws >= 1."""
  require(
    len(seeds) > 0 and len(set(seeds)) == len(seeds), f"seeds={list(seeds)} is invalid: expected distinct"
  )
  require(
    len(mechanisms) > 0 and len(set(mechanisms)) == len(mechanisms),
    f"mechanisms={list(mechanisms)} is invalid: expected distinct names",
  )
  check_int("draws", draws, minimum=1)


def valuation_outcomes(
  configs: Sequence[SimulationConfig],
  datasets: Sequence[data.FederatedData],
  mechanisms: Sequence[str],
  draws: int,
  *,
  progress: bool = False,
) -> list[Row]:
  """Trains every (seed, mechanism) ``draws`` times as replicas; one row per (seed, mechanism).

  Args:
    configs: one per seed (its game.mechanism is replaced by each of ``mechanisms``); datasets: their
      data (:func:`load_shared`: one capacity). draws: training-noise draws 0 .. draws - 1 (>= 1).

  Returns:
    :func:`outcome_rows` of the replicas (test_accuracy = the draws' mean, accuracy_draw_<d> each draw's),
    in (seed, mechanism) order, each with ``quality_<other>``: its outcome's Q re-valued under the other
    noise model than its config's (:func:`rescored_quality`).
  """
  check_valuation([cfg.seed for cfg in configs], mechanisms, draws)
  require(len(configs) == len(datasets), "configs / datasets: expected one dataset per config")
  capacity = capacity_of(dict(enumerate(datasets)))
  experiments = [
    _prepare(
      dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, capacity=capacity),
        game=dataclasses.replace(cfg.game, mechanism=mech),
      ),
      fed,
    )
    for cfg, fed in zip(configs, datasets)
    for mech in mechanisms
  ]
  runs = [replicas.Replica(e, d) for e in range(len(experiments)) for d in range(draws)]
  # Accounted once per (seed, mechanism): max_epsilon_spent is the ledger's (as in compare_mechanisms.py).
  trained = replicas.run(experiments, runs, progress=progress)
  other = next(m for m in NOISE_MODELS if m != configs[0].game.noise_model)
  rescored = dict(
    zip(((e.cfg.seed, e.cfg.game.mechanism) for e in experiments), rescored_quality(experiments, other))
  )
  return [
    {**row, f"quality_{other}": float(rescored[row["seed"], row["mechanism"]])}
    for row in outcome_rows(trained.summary)
  ]


def outcome_rows(summary: Sequence[Row]) -> list[Row]:
  """One row per (seed, mechanism) from replica rows (one per draw; first-seen order): the first draw's row
  (its game columns hold for every draw) with ``test_accuracy`` = the draws' mean, ``draws`` their count
  and ``accuracy_draw_<d>`` each draw's accuracy."""
  grouped: dict[tuple[int, str], list[Row]] = {}
  for r in summary:
    grouped.setdefault((r["seed"], r["mechanism"]), []).append(r)
  out = []
  for draws in grouped.values():
    draws = sorted(draws, key=lambda r: r["draw"])
    accuracy = [r["test_accuracy"] for r in draws]
    per_draw = {f"accuracy_draw_{r['draw']}": r["test_accuracy"] for r in draws}
    out.append({**draws[0], "test_accuracy": float(np.mean(accuracy)), "draws": len(draws), **per_draw})
  return out


def _spearman_finite(quality: Sequence[float], accuracy: Sequence[float]) -> float:
  """Spearman's rho of Q and accuracy (NaN for fewer than 3 pairs); Q = -inf (nobody participates: no
  model) ranks below every finite Q."""
  if len(quality) < 3:
    return float("nan")
  q = np.asarray(quality, np.float64)
  finite = np.isfinite(q)
  return stats.spearman(np.where(finite, q, q[finite].min(initial=0.0) - 1.0), accuracy)


def quality_spearman(rows: Sequence[Row], qualities: Sequence[str] = ("quality",)) -> list[Row]:
  """Spearman's rho of each Q column of ``rows`` (:func:`outcome_rows`) with the test accuracy.

  One row per kind of pairs (``QUALITY_PAIRS``): all (mechanism, seed) pairs; all but no_incentive's (a
  mandate at one fixed budget, the easy ranks: the market outcomes); within each seed over its mechanisms,
  averaged over the seeds (NaN-skipping). For each Q column ``quality<suffix>``: ``spearman<suffix>`` with
  the draws' mean accuracy and ``spearman<suffix>_draw0`` with draw 0's alone.
  """
  require(len(rows) > 0, "rows is empty: expected one row per (seed, mechanism)")
  market = [r for r in rows if r["mechanism"] != "no_incentive"]
  seeds = [[r for r in rows if r["seed"] == s] for s in dict.fromkeys(r["seed"] for r in rows)]
  kinds = [(QUALITY_PAIRS[0], [rows]), (QUALITY_PAIRS[1], [market]), (QUALITY_PAIRS[2], seeds)]
  out = []
  for name, groups in kinds:
    row: Row = {"pairs": name, "count": len(groups[0]) if len(groups) == 1 else len(groups)}
    for column in qualities:
      suffix = column.removeprefix("quality")
      for accuracy, tail in (("test_accuracy", ""), ("accuracy_draw_0", "_draw0")):
        rhos = [_spearman_finite([r[column] for r in g], [r[accuracy] for r in g]) for g in groups]
        row[f"spearman{suffix}{tail}"] = rhos[0] if len(rhos) == 1 else float(np.nanmean(rhos))
    out.append(row)
  return out


def curves(result: Result) -> list[Row]:
  """Accuracy per round per mechanism (and the ceiling): mean and 95% CI over seeds."""
  s = result.setting
  rounds = s.cfg.federated.rounds
  out = []
  groups = [(m, result.history, m, s.draws) for m in s.mechanisms]
  groups.append((CEILING, result.ceiling_history, "no_incentive", 1))
  for name, history, mech, draws in groups:
    for t in range(1, rounds + 1):
      rows = [r for r in history if r["round"] == t]
      interval = stats.mean_interval(per_seed(rows, mech, "test_accuracy", s.seeds, draws))
      out.append({"mechanism": name, "round": t, **_interval_row(interval, "accuracy")})
  return out


def gap_vs_clients(results: Sequence[Result]) -> list[Row]:
  """Each mechanism's accuracy gap to the social optimum (the redundant accuracy loss), its accuracy,
  participants, mean eps, Q, server and average utility per number of clients N (and the setting's
  lambda), mean and 95% CI over seeds: the scaling table."""
  rows = []
  for result in results:
    n = result.setting.cfg.data.num_clients
    games = {r["mechanism"]: r for r in game_table(result)}
    accuracy = {
      r["mechanism"]: {
        "accuracy": r["accuracy"],
        "accuracy_ci": (r["accuracy_ci_high"] - r["accuracy_ci_low"]) / 2,
      }
      for r in accuracy_table(result)
    }
    for loss in redundant_loss_table(result):
      mech = loss["mechanism"]
      rows.append(
        {
          "clients": n,
          "lam": result.setting.cfg.game.lam,
          "examples_per_client": result.clients["examples_median"],
          "mechanism": mech,
          "label": loss["label"],
          "accuracy": accuracy[mech]["accuracy"],
          "accuracy_ci": accuracy[mech]["accuracy_ci"],
          "redundant_accuracy_loss": loss["redundant_accuracy_loss"],
          "ci_low": loss["redundant_accuracy_loss_ci_low"],
          "ci_high": loss["redundant_accuracy_loss_ci_high"],
          "significant": loss["significant"],
          **{
            key: games[mech][key]
            for key in ("participants", "mean_epsilon", "quality", "server_utility", "average_utility")
          },
        }
      )
  return rows


def summary_rows(result: Result) -> list[Row]:
  """One row per replica and one per ceiling run (mechanism = CEILING): what ``<name>_summary.csv`` holds
  and :func:`load_result` reads back."""
  return result.summary + [dict(r, mechanism=CEILING) for r in result.ceiling]


# Setting fields that do not change a setting's rows: where its data file lives, how its seeds are split
# into units.
_NOT_COMPARED = ("cfg.data.path", "cfg.checkpoint_dir", "seeds_per_unit")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def setting_parts(setting: Setting | Mapping[str, Any]) -> fingerprint.Fingerprint:
  """Every field of a setting (or of its ``dataclasses.asdict``, as an output folder stores it) by dotted
  path (``cfg.federated.rounds``, ``seeds``), but ``_NOT_COMPARED``: what its output folder's rows depend
  on besides the data."""
  tree = dataclasses.asdict(setting) if isinstance(setting, Setting) else setting
  flat = _flat(fingerprint.canonical(tree))
  return {key: value for key, value in flat.items() if key not in _NOT_COMPARED}


def load_result(folder: str | os.PathLike[str], setting: Setting) -> Result:
  """The Result of an earlier run of ``setting`` from its output folder (``<name>_summary.csv``, the
  clients' sizes from ``<name>_accuracy.json``), e.g. to build a group's table from settings that ran in
  separate processes. History and timings are not reloaded (empty).

  Raises:
    ConfigError: a file is missing, or the folder's setting (stored in ``<name>_accuracy.json``) differs
      from ``setting`` (:func:`setting_parts`: other rounds, seeds, draws, clients...).
  """
  path = os.path.join(folder, f"{setting.name}_summary.csv")
  meta_path = os.path.join(folder, f"{setting.name}_accuracy.json")
  require(
    os.path.isfile(path) and os.path.isfile(meta_path),
    f"{path} or {meta_path} is missing: expected an output folder of setting {setting.name!r}",
  )
  with open(meta_path) as f:
    meta = json.load(f)
  stored = meta.get("setting") if isinstance(meta, dict) else None
  require(isinstance(stored, dict), f"{meta_path} holds no setting: expected a study's output folder")
  what = fingerprint.differences(setting_parts(stored), setting_parts(setting))
  require(
    not what,
    f"{folder} holds setting {setting.name!r} made with other settings ({what}): expected an output "
    "folder of this setting run with the same seeds, draws, rounds and config",
  )
  with open(path, newline="") as f:
    rows = [{k: csv_value(v) for k, v in row.items()} for row in csv.DictReader(f)]
  summary = [r for r in rows if r["mechanism"] != CEILING]
  ceiling = [dict(r, mechanism="no_incentive") for r in rows if r["mechanism"] == CEILING]
  return Result(setting, summary, [], ceiling, [], meta["clients"], [])


def groups(results: Sequence[Result]) -> dict[str, list[Result]]:
  """The results of each non-empty ``Setting.group``, in run order."""
  out: dict[str, list[Result]] = {}
  for result in results:
    if result.setting.group:
      out.setdefault(result.setting.group, []).append(result)
  return out


# ----------------------------------------------------------------------------------------------------------
# Presets (docs/RESULTS.md): the schedules come from the non-private tuning recorded there and stay fixed for
# every mechanism of a setting.
# ----------------------------------------------------------------------------------------------------------


def _cfg(data_cfg: DataConfig, model: str, fed: FederatedConfig) -> SimulationConfig:
  # 'traced': the tight RDP accountant at dp-accounting's orders, vectorized over clients (its host
  # inversion takes seconds per client: hours at N = 5000).
  return SimulationConfig(
    data=data_cfg, model=ModelConfig(model), federated=fed, privacy=PrivacyConfig(calibration="traced")
  )


def _paper(data_dir: str) -> list[Setting]:
  digits = DataConfig(dataset="femnist", source="embedded", partition="writer", num_clients=40)
  femnist62 = DataConfig(
    dataset="femnist",
    source="npz",
    path=os.path.join(data_dir, "femnist_leaf_subset.npz"),
    partition="writer",
    num_clients=40,
  )
  cifar = DataConfig(
    dataset="cifar10", source="npz", path=data_dir, partition="iid", num_clients=40, test_examples=2000
  )
  logreg = FederatedConfig(rounds=PAPER_LOGREG_ROUNDS, local_steps=3, client_lr=1.0)
  cnn = FederatedConfig(rounds=PAPER_CNN_ROUNDS, local_steps=3, client_lr=0.1)
  # FEMNIST-62 (the shared LEAF subset, 49k training examples): the embedded digits (31k) cannot give
  # 5,000 Dirichlet(0.5) clients an example each; 62 classes can (min 1, median 10 examples).
  # lambda scaled with N (lambda = lambda_40 x N / 40: the server values its population as the 40-client
  # settings do) and, as the contrast, held at lambda_40 (a server that stops buying as N grows).
  scaling = [
    Setting(
      f"scaling_{rule}n{n}",
      dataclasses.replace(
        cfg := _cfg(
          dataclasses.replace(femnist62, partition="dirichlet", num_clients=n, min_examples_per_client=1),
          "logreg",
          logreg,
        ),
        game=dataclasses.replace(cfg.game, lam=cfg.game.lam * (n / 40 if rule == "" else 1.0)),
      ),
      seeds=10,
      draws=SCALING_DRAWS,
      group="scaling" if rule == "" else "scaling_fixed_lambda",
      eval_examples=500,
    )
    for rule in ("", "fixed_lambda_")
    for n in (100, 1000, 5000)
  ]
  settings = [
    Setting("femnist_logreg", _cfg(digits, "logreg", logreg), seeds=10, draws=3),
    *scaling,
    Setting("femnist_cnn", _cfg(digits, "cnn", cnn), seeds=5, draws=2, eval_examples=500),
    Setting("femnist62_cnn", _cfg(femnist62, "cnn", cnn), seeds=5, draws=2, eval_examples=500),
    Setting(
      "cifar10_dirichlet_cnn",
      _cfg(dataclasses.replace(cifar, partition="dirichlet", dirichlet_alpha=0.5), "cnn", cnn),
      seeds=5,
      draws=2,
      eval_examples=500,
    ),
    Setting(
      "cifar10_iid_cnn", _cfg(dataclasses.replace(cifar, partition="iid"), "cnn", cnn), seeds=5, draws=2
    ),
  ]
  return [dataclasses.replace(s, seeds_per_unit=PAPER_SEEDS_PER_UNIT) for s in settings]


def _quick(data_dir: str) -> list[Setting]:
  del data_dir  # the embedded data only: the smoke runs on a fresh clone
  fed = FederatedConfig(rounds=2, local_steps=2, batch_size=16)

  def small(n: int, partition: str) -> DataConfig:
    return DataConfig(
      num_clients=n, partition=partition, min_examples_per_client=8, test_examples=300, capacity=128
    )

  return [
    Setting(
      "femnist_logreg",
      _cfg(small(10, "writer"), "logreg", fed),
      seeds=3,
      draws=2,
      cohort_size=10,
      seeds_per_unit=1,  # the resume path: one unit per seed
    ),
    *(
      Setting(f"scaling_n{n}", _cfg(small(n, "dirichlet"), "logreg", fed), seeds=2, draws=1, group="scaling")
      for n in (10, 20)
    ),
  ]


PRESETS = {"quick": _quick, "paper": _paper}


def preset(
  name: str,
  data_dir: str,
  names: Sequence[str] = ("all",),
  *,
  seeds: int = 0,
  draws: int = 0,
  rounds: int = 0,
  seeds_per_unit: int = 0,
) -> list[Setting]:
  """The settings of preset ``name`` (those in ``names``; 'all' = every one), with the seeds, draws,
  rounds and seeds per unit overridden where > 0. Raises ConfigError naming an unknown preset or
  setting."""
  require(name in PRESETS, f"preset={name!r} is invalid: expected one of {sorted(PRESETS)}")
  check_int("seeds", seeds, minimum=0)
  check_int("draws", draws, minimum=0)
  check_int("rounds", rounds, minimum=0)
  check_int("seeds_per_unit", seeds_per_unit, minimum=0)
  settings = PRESETS[name](data_dir)
  known = [s.name for s in settings]
  unknown = [n for n in names if n != "all" and n not in known]
  require(not unknown, f"settings={list(names)!r} is invalid: {unknown} not in preset {name!r} ({known})")
  chosen = [s for s in settings if "all" in names or s.name in names]
  return [
    dataclasses.replace(
      s,
      seeds=seeds or s.seeds,
      draws=draws or s.draws,
      seeds_per_unit=seeds_per_unit or s.seeds_per_unit,
      cfg=dataclasses.replace(
        s.cfg, federated=dataclasses.replace(s.cfg.federated, rounds=rounds or s.cfg.federated.rounds)
      ),
    )
    for s in chosen
  ]

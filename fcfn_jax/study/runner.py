"""Runs a setting (:func:`run_setting`): its replicas and the non-private ceiling, in resumable units of
seeds saved as they finish.

The private runs of a unit of seeds (every mechanism x draw of those seeds) train as replicas of one
program (:mod:`fcfn_jax.replicas`); the non-private ceiling (every client, no clipping, no noise, plain
FedAvg) trains once per seed beside them.

Resuming (docs/model.md "Study"): a setting's seeds are trained in *units* of ``seeds_per_unit`` seeds
(every mechanism x draw of those seeds and their ceiling runs). Each finished
unit is written whole (:func:`write_unit`: a temporary file renamed into place) to
``<units>/<setting>/seeds-<a>-<b>.json`` with its fingerprint (:func:`unit_fingerprint`: every config field
that can change its results, its seeds, draws, mechanisms, evaluation and cohort settings, the pool
capacity and its seeds' data digest). :func:`run_setting` loads every finished unit with the same
fingerprint and trains only the others, so a killed study rerun with the same command gives the tables of
an uninterrupted one; a unit with another fingerprint is refused (:func:`check_units`), or set aside and
recomputed with ``restart_on_mismatch``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from fcfn_jax import data, distributed, fingerprint, replicas, simulation
from fcfn_jax.config import DataConfig, SimulationConfig
from fcfn_jax.report import Timer, write_json_atomic
from fcfn_jax.resume import data_digest, run_fingerprint
from fcfn_jax.study.settings import Row, Setting
from fcfn_jax.validate import fail

logger = logging.getLogger(__name__)
# Bump when the meaning of a unit file's rows changes: older units then no longer match.
UNIT_LAYOUT = 1
# Fingerprint parts known only once the data is loaded (check_units without datasets skips them).
DATA_PARTS = ("data_digest", "study.capacity")
OTHER_RUN = ".other-run.json"  # suffix of a unit file set aside by restart_on_mismatch
# The mechanism of the non-private ceiling's rows in a Result, its tables and the summary CSV. It trains
# as 'no_incentive' (every client, no noise): unit files keep that config's rows as trained, and
# run_setting relabels them here once.
CEILING = "non_private"


class Result(NamedTuple):
  """A setting's raw results: one summary row per replica (private runs), their history rows, the
  non-private ceiling's summary and history rows (one draw per seed, mechanism = ``CEILING``), the data's
  sizes, the timings, and
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
  for key in ("ceiling", "ceiling_history"):
    rows[key] = [dict(row, mechanism=CEILING) for row in rows[key]]
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
  """What determines a unit's rows: ``resume.run_fingerprint`` of the setting's config (every field
  that can change results), the unit's seeds, the draws, mechanisms, evaluation subsample, cohort size and
  ``UNIT_LAYOUT``; with ``datasets`` (every seed's, :func:`load_seeds`) also ``DATA_PARTS``: the pool
  capacity the seeds share and the digest of the unit's seeds' data (without them both are absent)."""
  digest = None
  if datasets is not None:
    digest = fingerprint.digest({str(s): data_digest(datasets[s]) for s in seeds})
  parts = run_fingerprint(setting.cfg, digest)
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

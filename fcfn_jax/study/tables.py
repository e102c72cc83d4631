"""The study's tables of a setting's :class:`~fcfn_jax.study.runner.Result`, and the Result read back
from an output folder (:func:`load_result`).

All statistics come from :mod:`fcfn_jax.stats`: draws are averaged per seed, the interval is Student's t
over the seeds, comparisons are paired by seed (docs/model.md "Metrics"):
  accuracy: final test accuracy per mechanism, mean and 95% CI, and the non-private ceiling.
  vs_stackelberg, vs_social_optimum: paired accuracy differences (mechanism - reference) with verdicts;
    redundant accuracy loss = -(mechanism - social_optimum).
  game: the game-level metrics (deterministic per seed) with their CI over seeds, and the paired
    differences of server and average utility vs Stackelberg.
  curves: accuracy per round, mean and CI per mechanism (the plots' bands).
  scaling: per number of clients N, each mechanism's gap to the social optimum (:func:`gap_vs_clients`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fcfn_jax import fingerprint, simulation, stats
from fcfn_jax.config import MECHANISM_LABELS
from fcfn_jax.report import csv_value
from fcfn_jax.study.runner import CEILING, Result
from fcfn_jax.study.settings import Row, Setting
from fcfn_jax.validate import require

GAME_METRICS = simulation.GAME_COLUMNS
PAIRED_GAME_METRICS = ("server_utility", "average_utility", "social_welfare")


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
  ceiling = stats.mean_interval(per_seed(result.ceiling, CEILING, "test_accuracy", s.seeds, 1))
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


def curves(result: Result) -> list[Row]:
  """Accuracy per round per mechanism (and the ceiling): mean and 95% CI over seeds."""
  s = result.setting
  rounds = s.cfg.federated.rounds
  out = []
  groups = [(m, result.history, s.draws) for m in s.mechanisms]
  groups.append((CEILING, result.ceiling_history, 1))
  for mech, history, draws in groups:
    for t in range(1, rounds + 1):
      rows = [r for r in history if r["round"] == t]
      interval = stats.mean_interval(per_seed(rows, mech, "test_accuracy", s.seeds, draws))
      out.append({"mechanism": mech, "round": t, **_interval_row(interval, "accuracy")})
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
  return result.summary + result.ceiling


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
  ceiling = [r for r in rows if r["mechanism"] == CEILING]
  return Result(setting, summary, [], ceiling, [], meta["clients"], [])


def groups(results: Sequence[Result]) -> dict[str, list[Result]]:
  """The results of each non-empty ``Setting.group``, in run order."""
  out: dict[str, list[Result]] = {}
  for result in results:
    if result.setting.group:
      out.setdefault(result.setting.group, []).append(result)
  return out

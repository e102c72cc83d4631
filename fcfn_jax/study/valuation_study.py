"""The valuation study (scripts/valuation_study.py; docs/model.md "Metrics"): is the valuation Q what
training produces?

:func:`valuation_outcomes` trains replicas for any list of seeds: one row per (seed, mechanism), draws
averaged, Q also re-valued under the other noise map (:func:`rescored_quality`); :func:`quality_spearman`
gives the rank correlations of Q with accuracy (:func:`quality_correlation`: of a study's setting).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax import data, replicas, simulation, stats
from fcfn_jax.config import NOISE_MODELS, SimulationConfig
from fcfn_jax.game import valuation
from fcfn_jax.game.spec import make_game, spec_from_config
from fcfn_jax.study.runner import Result, _prepare, capacity_of
from fcfn_jax.study.settings import Row
from fcfn_jax.validate import check_choice, check_int, require

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


def quality_correlation(result: Result) -> float:
  """Spearman's rho of the valuation Q and the final accuracy (draws averaged) over mechanisms x seeds."""
  return quality_spearman(outcome_rows(result.summary))[0]["spearman"]

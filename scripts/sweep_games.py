"""Sweep many games x seeds x lambda values x cost ranges x caps in one compiled program
(``fcfn_jax.game.sweep``).

Every (seed, lam, cost range, eps_max) draws one game of --num_clients clients and solves every
--mechanisms mechanism on it under --valuation and --aggregation, vmapped in chunks of --games_per_chunk
games (optionally sharded across all devices with --shard). Outputs in --out (written whole at the end):
sweep.{csv,json,md} (one row per configuration and mechanism), sweep_summary.{csv,json,md} (means per
mechanism, lam and eps_max, also printed) and manifest.json. Example (about a minute on a CPU, most of it
compiling):

  python scripts/sweep_games.py --num_seeds=16 --lams=5,20,50,200 --cost_ranges=0.5:2,1:1.5 \
      --eps_maxes=2,8 --out=results/sweep
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
from absl import flags

from fcfn_jax import config as fc
from fcfn_jax import data, report, validate
from fcfn_jax.game import outcome, sweep

import sim_flags

# Every game's lam, cost range and cap come from --lams, --cost_ranges and --eps_maxes; the rest of
# GameConfig from flags.
GAME = sim_flags.ConfigFlags(fc.GameConfig, skip=("mechanism", "lam", "cost_low", "cost_high", "eps_max"))
RUN = sim_flags.ConfigFlags(fc.RunConfig, skip=sim_flags.CHECKPOINT_FLAGS)


class CostRange(NamedTuple):
  """Costs ~ Uniform[low, high]; written ``low:high`` as the flag takes it (its help shows the default so)."""

  low: float
  high: float

  def __str__(self) -> str:
    return f"{self.low:g}:{self.high:g}"


def _cost_range(name: str, text: str) -> CostRange:
  validate.require(text.count(":") == 1, f"{name}={text!r} is invalid: expected low:high")
  low, high = (sim_flags.number(validate.check_positive)(name, part) for part in text.split(":"))
  validate.require(low <= high, f"{name}={text!r} is invalid: expected low <= high")
  return CostRange(low, high)


flags.DEFINE_integer(
  "num_seeds", 8, "Games per (lam, cost range): seeds 0..num_seeds-1 (common random numbers)."
)
LAMS = sim_flags.define_list(
  "lams", [5, 20, 50, 200], sim_flags.number(validate.check_positive), "Server valuations lambda to sweep."
)
COST_RANGES = sim_flags.define_list(
  "cost_ranges", ["0.5:2", "1:1.5"], _cost_range, "Cost distributions Uniform[low, high] as low:high."
)
MECHANISMS = sim_flags.define_list(
  "mechanisms", fc.MECHANISMS, sim_flags.choice(fc.MECHANISMS), "Mechanisms."
)
flags.DEFINE_integer("num_clients", 40, "Clients per game.")
EPS_MAXES = sim_flags.define_list(
  "eps_maxes",
  [8],
  sim_flags.number(validate.check_positive),
  "Budget caps eps_max to sweep (each >= eps_min).",
)
flags.DEFINE_integer("batch_size", 32, "DP-SGD batch size B of the eps -> noise map (q_i = min(1, B / n_i)).")
flags.DEFINE_integer("steps", 30, "DP-SGD steps of a participant's run (rounds x local steps).")
flags.DEFINE_float("delta", 1e-5, "Every client's target delta, in (0, 1).")
flags.DEFINE_float(
  "weight_spread", 4.0, "Data sizes d_i ~ Uniform[1, weight_spread] (finite, >= 1), w = d / mean(d)."
)
flags.DEFINE_integer("games_per_chunk", 0, "Games per vmapped chunk (0 = all at once); bounds memory.")
flags.DEFINE_bool("shard", False, "Split each chunk's games across all devices.")
flags.DEFINE_bool("x64", True, "Compute in float64.")
flags.DEFINE_integer("seed", 0, "Seed of the games' costs and data sizes.")
FLAGS = flags.FLAGS
FLAGS.set_default("out", "results/sweep")

SUMMARY_METRICS = sweep.SweepMetrics._fields


def _grid_and_settings() -> tuple[sweep.SweepConfigs, sweep.SweepSettings]:
  """The configurations and settings the flags describe; raises ConfigError naming a bad flag."""
  validate.check_int("num_seeds", FLAGS.num_seeds)
  validate.check_int("games_per_chunk", FLAGS.games_per_chunk, minimum=0)
  validate.check_int("num_clients", FLAGS.num_clients, minimum=2)
  validate.check_seed("seed", FLAGS.seed)
  validate.check_finite("weight_spread", FLAGS.weight_spread)
  validate.require(
    FLAGS.weight_spread >= 1, f"weight_spread={FLAGS.weight_spread!r} is invalid: expected a number >= 1"
  )
  for i, eps_max in enumerate(EPS_MAXES.value):  # GameConfig's rule, as tune_pricing.py applies it
    validate.require(
      FLAGS.eps_min <= eps_max,
      f"eps_min={FLAGS.eps_min!r} > eps_maxes[{i}]={eps_max!r}: expected eps_min <= every eps_max (lower "
      "--eps_min, the no-incentive mandate)",
    )
  games = FLAGS.num_seeds * len(LAMS.value) * len(COST_RANGES.value) * len(EPS_MAXES.value)
  chunk = min(games, FLAGS.games_per_chunk or games)
  # Per game: its grid point and metrics, and a table row per mechanism (~1 KB of Python); per client of
  # a chunk's games, about 16 float64 temporaries of the solvers.
  need = games * len(MECHANISMS.value) * 1024 + chunk * FLAGS.num_clients * 16 * 8
  validate.require(
    need <= data.memory_limit(),
    f"num_seeds={FLAGS.num_seeds} x {len(LAMS.value)} lams x {len(COST_RANGES.value)} cost ranges x "
    f"{len(EPS_MAXES.value)} eps_maxes = {games} "
    f"games of num_clients={FLAGS.num_clients} (games_per_chunk={FLAGS.games_per_chunk}) need about "
    f"{need / 2**30:.3g} GiB: expected at most {data.memory_limit() / 2**30:.3g} GiB (half of this machine's "
    "memory); lower them or set games_per_chunk",
  )
  settings = sweep.SweepSettings(
    # Every game's cap is swept; the largest keeps the GameConfig valid (eps_min <= eps_max).
    game=GAME.value({"eps_max": max(EPS_MAXES.value)}),
    num_clients=FLAGS.num_clients,
    weight_spread=FLAGS.weight_spread,
    batch_size=FLAGS.batch_size,
    steps=FLAGS.steps,
    delta=FLAGS.delta,
    mechanisms=tuple(MECHANISMS.value),
  )
  return sweep.make_grid(range(FLAGS.num_seeds), LAMS.value, COST_RANGES.value, EPS_MAXES.value), settings


def main(_):
  run = sim_flags.run_config(RUN)
  with jax.enable_x64(FLAGS.x64):
    configs, settings = _grid_and_settings()
    mesh = sweep.game_mesh() if FLAGS.shard else None
    games = int(configs.lam.shape[0])
    header = (
      f"{games} games x {len(settings.mechanisms)} mechanisms of {settings.num_clients} clients "
      f"(lams {LAMS.value}, cost ranges {','.join(map(str, COST_RANGES.value))}, "
      f"eps_maxes {EPS_MAXES.value}, "
      f"{FLAGS.num_seeds} seeds) on "
      f"{1 if mesh is None else mesh.size} device(s), game: "
      f"{sim_flags.fields(settings.game, skip=('mechanism', 'lam', 'cost_low', 'cost_high', 'eps_max'))}"
    )
    setup = {
      "settings": dataclasses.asdict(settings),
      "lams": LAMS.value,
      "cost_ranges": COST_RANGES.value,
      "eps_maxes": EPS_MAXES.value,
    }
    with sim_flags.results(run, header, setup) as out:
      key = jax.random.PRNGKey(FLAGS.seed)
      with report.Timer() as compile_and_run:
        results = jax.block_until_ready(sweep.run_sweep(key, configs, settings, FLAGS.games_per_chunk, mesh))
      with report.Timer() as rerun:
        jax.block_until_ready(sweep.run_sweep(key, configs, settings, FLAGS.games_per_chunk, mesh))
      rows = sweep.sweep_table(configs, results)
      summary = sweep.mean_by(rows, ["mechanism", "lam", "eps_max"], SUMMARY_METRICS)
      out.table("sweep", rows)
      out.table("sweep_summary", summary, note=outcome.AVERAGE_UTILITY)
  print(f"compile+run {compile_and_run.elapsed:.2f} s, run {rerun.elapsed:.3f} s")
  print(report.format_table(summary))
  print(f"\n{outcome.AVERAGE_UTILITY}")


if __name__ == "__main__":
  sim_flags.run(main)

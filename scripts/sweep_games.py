"""Sweep many games x seeds x lambda values x cost ranges x caps in one compiled program
(``fcfn_jax.game.sweep``).

Every (seed, lam, cost range, eps_max) draws one game of --num_clients clients and solves every
--mechanisms mechanism on it under --valuation and --aggregation, vmapped in chunks of --games_per_chunk
games (optionally sharded across all devices with --shard). Outputs in --out: sweep.{csv,json} (one row
per configuration and mechanism) and sweep_summary.{csv,json} (means per mechanism and lam, also
printed). Example (about a minute on a CPU, most of it compiling):

  python scripts/sweep_games.py --num_seeds=16 --lams=5,20,50,200 --cost_ranges=0.5:2,1:1.5 \
      --eps_maxes=2,8 --out=results/sweep
"""

from __future__ import annotations

import os

import jax
from absl import app, flags

from fcfn_jax import config as fc
from fcfn_jax import report, validate
from fcfn_jax.game import outcome, sweep

import sim_flags

flags.DEFINE_integer(
  "num_seeds", 8, "Games per (lam, cost range): seeds 0..num_seeds-1 (common random numbers)."
)
flags.DEFINE_list("lams", ["5", "20", "50", "200"], "Server valuations lambda to sweep (> 0).")
flags.DEFINE_list("cost_ranges", ["0.5:2", "1:1.5"], "Cost distributions Uniform[low, high] as low:high.")
flags.DEFINE_list("eps_maxes", ["8"], "Budget caps eps_max to sweep (> 0).")
flags.DEFINE_list("mechanisms", list(fc.MECHANISMS), f"Mechanisms to run, from {list(fc.MECHANISMS)}.")
flags.DEFINE_float(
  "weight_spread", 4.0, "Data sizes d_i ~ Uniform[1, weight_spread] (>= 1), w = d / mean(d)."
)
flags.DEFINE_integer("games_per_chunk", 0, "Games per vmapped chunk (0 = all at once); bounds memory.")
flags.DEFINE_bool("shard", False, "Split each chunk's games across all devices.")
flags.DEFINE_bool("x64", True, "Compute in float64.")
FLAGS = flags.FLAGS
FLAGS.set_default("out", "results/sweep")

SUMMARY_METRICS = sweep.SweepMetrics._fields


def _number(flag: str, text: str) -> float:
  try:
    return float(text)
  except ValueError:
    validate.require(False, f"{flag} has {text!r}: expected a number")


def _grid_and_settings() -> tuple[sweep.SweepConfigs, sweep.SweepSettings]:
  """The configurations and settings the flags describe; raises ConfigError naming a bad flag."""
  validate.check_int("num_seeds", FLAGS.num_seeds)
  validate.check_int("games_per_chunk", FLAGS.games_per_chunk, minimum=0)
  lams = [_number("lams", v) for v in FLAGS.lams]
  ranges = []
  for text in FLAGS.cost_ranges:
    validate.require(text.count(":") == 1, f"cost_ranges has {text!r}: expected low:high")
    ranges.append(tuple(_number("cost_ranges", v) for v in text.split(":")))
  eps_maxes = [_number("eps_maxes", v) for v in FLAGS.eps_maxes]
  game = fc.GameConfig(
    eps_min=min(FLAGS.eps_min, *eps_maxes),
    num_types=FLAGS.num_types,
    num_aggregators=FLAGS.num_aggregators,
    valuation=FLAGS.valuation,
    aggregation=FLAGS.aggregation,
    data_epsilon=FLAGS.data_epsilon,
  )
  settings = sweep.SweepSettings(
    game=game,
    num_clients=FLAGS.num_clients,
    weight_spread=FLAGS.weight_spread,
    batch_size=FLAGS.batch_size,
    steps=FLAGS.rounds * FLAGS.local_steps,
    delta=FLAGS.delta,
    mechanisms=tuple(FLAGS.mechanisms),
  )
  return sweep.make_grid(range(FLAGS.num_seeds), lams, ranges, eps_maxes), settings


def main(_):
  with jax.enable_x64(FLAGS.x64):
    configs, settings = sim_flags.config_or_exit(_grid_and_settings)
    mesh = sweep.game_mesh() if FLAGS.shard else None
    key = jax.random.PRNGKey(FLAGS.seed)
    with report.Timer() as compile_and_run:
      results = jax.block_until_ready(sweep.run_sweep(key, configs, settings, FLAGS.games_per_chunk, mesh))
    with report.Timer() as run:
      jax.block_until_ready(sweep.run_sweep(key, configs, settings, FLAGS.games_per_chunk, mesh))
  rows = sweep.sweep_table(configs, results)
  summary = sweep.mean_by(rows, ["mechanism", "lam", "eps_max"], SUMMARY_METRICS)
  os.makedirs(FLAGS.out, exist_ok=True)
  for name, table in (("sweep", rows), ("sweep_summary", summary)):
    report.write_csv_atomic(os.path.join(FLAGS.out, f"{name}.csv"), table)
    report.write_json_atomic(os.path.join(FLAGS.out, f"{name}.json"), table)
  games = int(configs.lam.shape[0])
  print(
    f"{games} games x {len(settings.mechanisms)} mechanisms, {settings.num_clients} clients each, "
    f"on {1 if mesh is None else mesh.size} device(s): compile+run {compile_and_run.elapsed:.2f} s, "
    f"run {run.elapsed:.3f} s"
  )
  print(report.format_table(summary))
  print(f"\n{outcome.AVERAGE_UTILITY}")


if __name__ == "__main__":
  app.run(main, flags_parser=sim_flags.parse_flags)

"""Cost of each mechanism's experiment as the number of clients grows: game solve, calibration, one round.

For every N in --clients the FEMNIST-62 subset (--data_path, the shared LEAF file) is split into N
Dirichlet(--dirichlet_alpha) clients, logreg, as ``compare_mechanisms.py`` runs it; per mechanism one row:

- solve_s / solve_warm_s: ``baselines.solve`` on the experiment's game in float64, first call (with its
  compilation) and second call;
- calibration_s: ``simulation.calibrate`` as ``simulation.prepare`` calls it, timed on its own: the noise
  multipliers of the participants (the map per distinct client; 0 when nobody is calibrated);
- prepare_s: the whole ``simulation.prepare`` (its solve, then compiled, the calibration, the model, the
  training pool on the device);
- round_s / round_warm_s: one federated round, first (with its compilation) and second;
- load: the 1-minute load average when the row finished (timings taken beside other jobs are not figures).

Example:
  python benchmarks/bench_mechanisms.py --clients=1000,5000,10000
  python benchmarks/bench_mechanisms.py --clients=40 --mechanisms=stackelberg,contract --out=/tmp/bench
"""

from __future__ import annotations

import dataclasses
import os
from unittest import mock

import jax
import numpy as np
from absl import app, flags

from fcfn_jax import data, simulation
from fcfn_jax.config import MECHANISMS, DataConfig, FederatedConfig, ModelConfig, SimulationConfig
from fcfn_jax.game import baselines
from fcfn_jax.report import Timer

from common import machine, write_tables

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_list("clients", ["1000", "5000", "10000"], "Client counts N.")
flags.DEFINE_list("mechanisms", list(MECHANISMS), f"Mechanisms, from {list(MECHANISMS)}.")
flags.DEFINE_string(
  "data_path",
  os.path.join(os.path.dirname(_REPO), "shared", "data", "femnist_leaf_subset.npz"),
  "The FEMNIST-62 LEAF subset (.npz).",
)
flags.DEFINE_float("dirichlet_alpha", 0.5, "Dirichlet concentration of the label skew.")
flags.DEFINE_integer("rounds", 2, "Federated rounds of the run (every client's noise depends on them).")
flags.DEFINE_string("out", "results/bench_mechanisms", "Folder of bench_mechanisms.{json,md}, mechanisms.csv")
FLAGS = flags.FLAGS


def _config(clients: int) -> SimulationConfig:
  """compare_mechanisms.py's run on N Dirichlet clients of FEMNIST-62, logreg."""
  data_cfg = DataConfig(
    dataset="femnist",
    source="npz",
    path=FLAGS.data_path,
    partition="dirichlet",
    dirichlet_alpha=FLAGS.dirichlet_alpha,
    num_clients=clients,
    min_examples_per_client=1,
  )
  return SimulationConfig(
    data=data_cfg, model=ModelConfig("logreg"), federated=FederatedConfig(rounds=FLAGS.rounds)
  )


def _row(cfg: SimulationConfig, fed_data: data.FederatedData) -> dict:
  """One mechanism at one N: the timings of the module docstring."""
  n = np.asarray(fed_data.pool.num_examples)
  costs = simulation.client_costs(jax.random.PRNGKey(cfg.seed), n.shape[0], cfg.game)
  times = {}
  with jax.enable_x64(True):
    game, spec = simulation.game_of(cfg, costs, simulation.quality_weights(n), n)
    for name in ("solve_s", "solve_warm_s"):
      with Timer() as timer:
        outcome = jax.block_until_ready(baselines.solve(game, spec))
      times[name] = timer.elapsed
  times["calibration_s"] = 0.0
  calibrate = simulation.calibrate

  def timed_calibrate(*args, **kwargs):  # prepare's own call, timed directly (it returns host arrays)
    with Timer() as timer:
      z = calibrate(*args, **kwargs)
    times["calibration_s"] += timer.elapsed
    return z

  with mock.patch.object(simulation, "calibrate", timed_calibrate), Timer() as timer:
    exp = simulation.prepare(cfg, fed_data)
  times["prepare_s"] = timer.elapsed
  state, key = simulation.init_state(exp), simulation.training_key(cfg)
  for name in ("round_s", "round_warm_s"):
    with Timer() as timer:
      state, _ = jax.block_until_ready(simulation.participants_round(exp, state, key))
    times[name] = timer.elapsed
  return {
    "clients": int(n.shape[0]),
    "mechanism": cfg.game.mechanism,
    "participants": int(outcome.participants),
    **{name: round(seconds, 3) for name, seconds in times.items()},
    "load": round(os.getloadavg()[0], 2),
  }


def main(argv):
  del argv
  rows = []
  for clients in (int(c) for c in FLAGS.clients):
    cfg = _config(clients)
    fed_data = data.load_federated(cfg.data)
    for mechanism in FLAGS.mechanisms:
      mech_cfg = dataclasses.replace(cfg, game=dataclasses.replace(cfg.game, mechanism=mechanism))
      rows.append(_row(mech_cfg, fed_data))
      print(rows[-1], flush=True)
  meta = {**machine(), "data_path": FLAGS.data_path, "dirichlet_alpha": FLAGS.dirichlet_alpha}
  write_tables(FLAGS.out, "bench_mechanisms", {"mechanisms": rows}, meta | {"rounds": FLAGS.rounds})


if __name__ == "__main__":
  app.run(main)

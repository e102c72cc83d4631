"""R replicas in one program vs R sequential runs, side by side (issue 15 item 2).

A replica is one (seed, mechanism, training-noise draw) run. The sequential side is what a user without
replicas does: ``simulation.run`` once per replica (each prepares its experiment and trains it, its
round compiled once and reused). The replica side prepares each (seed, mechanism) once and trains all R
as ONE jitted program per round (``replicas.run``). Both sides first run once untimed (compilation), then
alternate ``--repeats`` timed passes; the table gives the median wall time of each side and their ratio
(speedup), one prepare's time (host: mechanism, calibration) and the ratio without it (training only),
and checks that the two sides trained the same models (max |param difference|).

Example:
  python benchmarks/bench_replicas.py --models=logreg,cnn --replicas=4,16
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from fcfn_jax import config as fc
from fcfn_jax import data, replicas, report, simulation

from common import machine, write_tables

flags.DEFINE_list("models", ["logreg", "cnn"], "Models.")
flags.DEFINE_list("replicas", ["4", "16"], "Replica counts R (draws of one seed's Stackelberg experiment).")
flags.DEFINE_integer("clients", 10, "Clients per experiment.")
flags.DEFINE_integer("rounds", 3, "Rounds per run.")
flags.DEFINE_integer("local_steps", 2, "Local steps per round.")
flags.DEFINE_integer("repeats", 2, "Timed passes per side.")
flags.DEFINE_string("out", "results/bench_replicas", "Folder for bench_replicas.{json,md} and replicas.csv.")
FLAGS = flags.FLAGS


def _config(model: str, draw: int = 0) -> fc.SimulationConfig:
  return fc.SimulationConfig(
    data=fc.DataConfig(num_clients=FLAGS.clients, capacity=64, test_examples=500),
    model=fc.ModelConfig(model),
    federated=fc.FederatedConfig(rounds=FLAGS.rounds, local_steps=FLAGS.local_steps),
    draw=draw,
  )


def measure(model: str, count: int, fed_data: data.FederatedData) -> dict:
  """One row: R = ``count`` draws, sequential simulation.run vs replicas.run."""

  def sequential():
    return [
      simulation.run(_config(model, d), fed_data=fed_data, progress=False).state.server.params
      for d in range(count)
    ]

  def together():
    exp = simulation.prepare(_config(model), fed_data)
    runs = [replicas.Replica(0, d) for d in range(count)]
    return replicas.run([exp], runs, progress=False, account=False)

  single, batched = sequential(), together()  # compile both sides
  with report.Timer() as prep:
    simulation.prepare(_config(model), fed_data)
  times = {"sequential": [], "replicas": []}
  for _ in range(FLAGS.repeats):
    for side, fn in (("sequential", sequential), ("replicas", together)):
      with report.Timer() as t:
        jax.block_until_ready(jax.tree.leaves(fn()))
      times[side].append(t.elapsed)
  diff = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b)[d])))
    for d, params in enumerate(single)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(batched.states.params))
  )
  seq, rep = float(np.median(times["sequential"])), float(np.median(times["replicas"]))
  timing = batched.timings[0]
  return {
    "model": model,
    "replicas": count,
    "clients": FLAGS.clients,
    "rounds": FLAGS.rounds,
    "sequential_s": seq,
    "replicas_s": rep,
    "speedup": seq / rep,
    "prepare_s": prep.elapsed,
    "speedup_training_only": (seq - count * prep.elapsed) / max(rep - prep.elapsed, 1e-9),
    "replica_chunk": timing["chunk_size"],
    "replica_group": timing["group"],
    "max_param_diff": diff,
    "repeats": FLAGS.repeats,
  }


def main(argv: Sequence[str]) -> None:
  del argv
  fed_data = data.load_federated(_config("logreg").data)
  meta = {
    **machine(),
    "what": "median wall time of R sequential simulation.run calls (each prepares and trains one draw) vs "
    "one prepare + replicas.run of the R draws (one program per round); both compiled first",
    **{k: FLAGS[k].value for k in ("clients", "rounds", "local_steps", "repeats")},
  }
  rows = []
  for model in FLAGS.models:
    for count in (int(r) for r in FLAGS.replicas):
      rows.append(measure(model, count, fed_data))
      # Written after every row: a long CNN row cut short keeps the rows before it.
      write_tables(FLAGS.out, "bench_replicas", {"replicas": rows}, meta)


if __name__ == "__main__":
  app.run(main)

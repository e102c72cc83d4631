"""Cost of one hypergradient dU/dR vs one forward training run of the same objective (issue 23).

U(R) = lambda_acc (-validation loss after T DP FedAvg rounds) - R (``fcfn_jax.hypergrad``), K noise draws
vmapped, float64, for each model in --models, side by side in one run (``common.measure``: compiled first,
then --repeats interleaved timed passes, median):

- forward: ``hypergrad.objective_draws``, U per draw (R -> eps -> z -> T rounds -> validation loss);
- reverse: ``hypergrad.hypergradient``, U and dU/dR per draw by reverse mode (holds the T rounds'
  residuals of the K draws);
- forward_mode: ``jax.jvp`` of the forward program in R (one tangent: the single parameter R; the
  equilibrium and the accountant's inverse have custom JVPs, so forward mode runs through them).

Per case: compile_s, median_s, min_s, the ratio to the forward run, and XLA's compiled memory analysis
(temp_mb: the program's temporary buffers, the residuals of reverse mode among them; argument and output
sizes); the process's peak RSS (ru_maxrss, one high-water mark for the whole run, so not per case) is in
the meta. Also the largest |dU/dR reverse - dU/dR forward mode| over the draws.

Example:
  python benchmarks/bench_hypergrad.py --models=logreg,cnn --repeats=5
  python benchmarks/bench_hypergrad.py --models=logreg --clients=4 --rounds=1 --local_steps=1 --draws=2 \
      --repeats=1 --out=/tmp/bench_hypergrad   # smoke run
"""

from __future__ import annotations

import functools
import resource
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fcfn_jax import config as fc
from fcfn_jax import data, hypergrad
from fcfn_jax.game import leader

from common import Case, machine, measure, write_tables

flags.DEFINE_list("models", ["logreg", "cnn"], "Models.")
flags.DEFINE_integer("clients", 10, "Clients in the game.")
flags.DEFINE_integer("capacity", 64, "Examples per client slot (the padded pool).")
flags.DEFINE_integer("test_examples", 500, "Test examples (half become the validation split).")
flags.DEFINE_integer("rounds", 3, "Federated rounds T.")
flags.DEFINE_integer("local_steps", 2, "Local steps per round.")
flags.DEFINE_integer("batch_size", 16, "Expected batch size.")
flags.DEFINE_integer("draws", 4, "Noise draws K (vmapped in every case).")
flags.DEFINE_float("lambda_acc", 100.0, "Payment units per nat of validation loss.")
flags.DEFINE_float("payment", 0.0, "R of every case (0 = the Q-optimal R*, leader.solve_leader).")
flags.DEFINE_integer("repeats", 5, "Timed passes per case.")
flags.DEFINE_string(
  "out", "results/bench_hypergrad", "Folder for bench_hypergrad.{json,md} and hypergrad.csv."
)
FLAGS = flags.FLAGS


def _config(model: str) -> fc.SimulationConfig:
  return fc.SimulationConfig(
    data=fc.DataConfig(num_clients=FLAGS.clients, capacity=FLAGS.capacity, test_examples=FLAGS.test_examples),
    model=fc.ModelConfig(model),
    federated=fc.FederatedConfig(
      rounds=FLAGS.rounds, local_steps=FLAGS.local_steps, batch_size=FLAGS.batch_size
    ),
    privacy=fc.PrivacyConfig(calibration="traced"),
    game=fc.GameConfig(mechanism="stackelberg"),
  )


def _case(name: str, fn, args: tuple, memory: dict) -> Case:
  """A jitted case whose compiled memory analysis is recorded in ``memory[name]``."""

  def prepare():
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.memory_analysis()
    memory[name] = {
      "temp_mb": analysis.temp_size_in_bytes / 2**20,
      "argument_mb": analysis.argument_size_in_bytes / 2**20,
      "output_mb": analysis.output_size_in_bytes / 2**20,
    }
    return (lambda: jax.block_until_ready(compiled(*args))), None

  return Case(name, prepare)


def _rows(model: str, fed_data: data.FederatedData) -> list[dict]:
  """The three cases of one model, measured side by side."""
  cfg = _config(model)
  problem, spec, apply_fn, _ = hypergrad.make_problem(cfg, fed_data)
  keys = hypergrad.draw_keys(cfg, FLAGS.draws)
  payment = jnp.float64(FLAGS.payment or leader.solve_leader(problem.game, spec).payment)
  kw = dict(lambda_acc=FLAGS.lambda_acc, apply_fn=apply_fn, cfg=cfg, spec=spec)
  forward = functools.partial(hypergrad.objective_draws, **kw)
  reverse = functools.partial(hypergrad.hypergradient, **kw)

  def forward_mode(r, problem, keys):
    return jax.jvp(lambda x: forward(x, problem, keys), (r,), (jnp.ones_like(r),))

  memory: dict[str, dict] = {}
  cases = [
    _case("forward", forward, (payment, problem, keys), memory),
    _case("reverse", reverse, (payment, problem, keys), memory),
    _case("forward_mode", forward_mode, (payment, problem, keys), memory),
  ]
  rows, outputs = measure(cases, FLAGS.repeats)
  _, hg, (_, tangent) = outputs
  grad_diff = float(np.max(np.abs(np.asarray(hg.grads) - np.asarray(tangent))))
  base = rows[0]
  for row in rows:
    row.update(
      model=model,
      payment=float(payment),
      clients=FLAGS.clients,
      rounds=FLAGS.rounds,
      draws=FLAGS.draws,
      time_vs_forward=row["median_s"] / base["median_s"],
      **memory[row["case"]],
      temp_vs_forward=memory[row["case"]]["temp_mb"] / max(memory["forward"]["temp_mb"], 1e-12),
      max_grad_diff_reverse_vs_forward_mode=grad_diff,
    )
  return rows


def main(argv: Sequence[str]) -> None:
  del argv
  meta = {
    **machine(),
    "what": "median wall time and XLA temp memory of one forward run of U(R) (K draws vmapped), one "
    "reverse-mode hypergradient and one forward-mode jvp in R, compiled first, interleaved",
    **{
      k: FLAGS[k].value
      for k in ("clients", "capacity", "test_examples", "rounds", "local_steps", "batch_size", "draws")
    },
    **{k: FLAGS[k].value for k in ("lambda_acc", "repeats")},
  }
  rows = []
  with jax.enable_x64(True):
    fed_data = data.load_federated(_config("logreg").data)
    for model in FLAGS.models:
      rows += _rows(model, fed_data)
      meta["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
      # Written after every model: a long CNN row cut short keeps the rows before it.
      write_tables(FLAGS.out, "bench_hypergrad", {"hypergrad": rows}, meta)


if __name__ == "__main__":
  app.run(main)

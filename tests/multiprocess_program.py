"""One process of a multi-process check, started N times by ``distributed.launch_local`` (tests/
test_multihost.py): it runs like every script (``sim_flags.run``: joins the runtime, only process 0 prints
and writes the results folder) and writes what the test compares with a single-process run.

--checks (any of):
  round: ``--rounds`` DP rounds of ``--model`` over ``--clients`` clients split over all processes'
    devices (each process loads only its own block; it prints ``ROWS <process> <start> <stop>`` to stderr).
  sweep: the game sweep of tests/multiprocess_cases.py split over all devices.
  checkpoint: a Checkpointer round trip (process 0 writes; every process restores the same step).
  simulate: ``simulation.run`` of the short experiment with checkpoints in ``<out>.checkpoints``, stopping
    after ``--stop_after`` rounds (0 = all); a rerun resumes.
  replicas: the study's replicas of tests/multiprocess_cases.py, each process training its block.
  blocks: an uneven host-side split (5 items) gathered whole (each process prints ``BLOCK <process> <ids>``
    to stderr).
--fail_in=i: process i fails with a ConfigError before the checks (its peers wait in a collective).
Results in --out: round.npz, sweep.npz, checkpoint.json, simulate.json, replicas.json (summary, history,
timings) and replicas.npz (final states), blocks.npz (by process 0 only).
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "scripts")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from fcfn_jax import checkpoint, distributed, federated, simulation, validate  # noqa: E402
from fcfn_jax import config as fc  # noqa: E402
from fcfn_jax.game import sweep  # noqa: E402
from tests import multiprocess_cases as cases  # noqa: E402

import sim_flags  # noqa: E402

RUN = sim_flags.ConfigFlags(fc.RunConfig)
CHECKS = sim_flags.define_list(
  "checks",
  ["round"],
  sim_flags.choice(("round", "sweep", "checkpoint", "simulate", "replicas", "blocks")),
  "What to run.",
)
flags.DEFINE_enum("model", "logreg", ["logreg", "cnn"], "Model of the round check.")
flags.DEFINE_integer("clients", 7, "Clients of the round check.")
flags.DEFINE_integer("rounds", 2, "Rounds of the round check.")
flags.DEFINE_integer("stop_after", 0, "simulate: stop after this round (0 = run all).")
flags.DEFINE_enum("calibration", "exact", ["exact", "traced"], "simulate: the privacy calibration.")
flags.DEFINE_integer("fail_in", -1, "This process raises a ConfigError before the checks (-1: none).")
FLAGS = flags.FLAGS


def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
  return {
    prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree.leaves_with_path(tree)
  }


def main(argv):
  del argv
  run = sim_flags.run_config(RUN)
  header = f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices"
  validate.require(jax.process_index() != FLAGS.fail_in, f"fail_in={FLAGS.fail_in} is this process: failing")
  with sim_flags.results(run, header, {"checks": CHECKS.value}) as out:
    if "round" in CHECKS.value:
      on_load = lambda rows: print("ROWS", jax.process_index(), rows.start, rows.stop, file=sys.stderr)
      state, history = cases.run_rounds(
        FLAGS.model, FLAGS.clients, FLAGS.rounds, federated.client_mesh(), on_load
      )
      np.savez(out.file("round.npz"), **_flat(state, "state"), **_flat(history, "metrics"))
    if "sweep" in CHECKS.value:
      mesh = sweep.game_mesh() if jax.device_count() > 1 else None
      np.savez(out.file("sweep.npz"), **_flat(cases.run_sweep(mesh), ""))
    if "checkpoint" in CHECKS.value:
      template = {"w": np.zeros(3, np.float32), "n": np.zeros((), np.int32)}
      with checkpoint.Checkpointer(run.out + ".checkpoints") as ckpt:
        ckpt.save(1, {"w": np.arange(3, dtype=np.float32), "n": np.int32(jax.process_index())}, {"by": "p0"})
        restored = ckpt.restore(template)
        steps = ckpt.all_steps()
      with open(out.file("checkpoint.json"), "w") as f:
        json.dump({"step": restored.step, "metadata": restored.metadata, "steps": steps}, f)
      print(
        "RESTORED",
        jax.process_index(),
        restored.step,
        restored.state["w"].tolist(),
        int(restored.state["n"]),
        file=sys.stderr,
      )
    if "simulate" in CHECKS.value:
      cfg = cases.simulation_config(run.out + ".checkpoints", FLAGS.calibration)
      result = simulation.run(cfg, progress=False, stop_after=FLAGS.stop_after or None)
      with open(out.file("simulate.json"), "w") as f:
        json.dump({"history": result.history, "clients": result.clients}, f)
      np.savez(out.file("simulate.npz"), **_flat(result.state, "state"))
    if "replicas" in CHECKS.value:
      runs = cases.run_replicas()
      with open(out.file("replicas.json"), "w") as f:
        json.dump({"summary": runs.summary, "history": runs.history, "timings": runs.timings}, f)
      np.savez(out.file("replicas.npz"), **_flat(runs.states, "states"))
    if "blocks" in CHECKS.value:
      ids = np.arange(cases.BLOCK_ITEMS)[distributed.process_block(cases.BLOCK_ITEMS)]
      print("BLOCK", jax.process_index(), *ids, file=sys.stderr)
      np.savez(out.file("blocks.npz"), **cases.gather_block_rows())
  print("DONE", jax.process_index())


if __name__ == "__main__":
  sim_flags.run(main)

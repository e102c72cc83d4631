"""Per-round time of the DP round on three layouts of two CPU cores, side by side in one run:

  1 process x 1 device   (the reference: no mesh)
  1 process x 2 devices  (XLA_FLAGS=--xla_force_host_platform_device_count=2; the client axis split over a
                          mesh of the process's 2 devices, partial sums meet in one in-process all-reduce)
  2 processes x 1 device (scripts/launch.py's layout: ``distributed.launch_local``, gloo collectives; each
                          process loads only its own block of clients, ``federated.shard_clients``)

Every layout runs in fresh processes with the same round (the same clients, keys, configs). Besides the
round, each timed process measures the round's one all-reduce alone: a jitted ``psum`` over the same mesh
of a payload shaped like the round's totals (the params pytree + 4 scalars); ``comm_share`` = that time /
the round's time (0 on one device). Clients are resampled from the embedded FEMNIST digits
(``common.resampled_pool``).

``--mode=replicas``: a study's replicas (``replicas.run``: R draws of one seed's Stackelberg experiment on
the embedded digits, 'traced' calibration as in the study) in 1 process vs 2 processes (each trains its
block of R/2 and the results are gathered once), side by side in one run. ``run_s`` = median wall time of
``replicas.run`` in process 0 after a first, compiling run (the gather included: it waits for the slower
process); ``gather_s`` = the gather of the final states alone; ``load_start`` / ``load_end`` = the load
average when the layout started / ended (the machine is shared).

Examples (a few minutes on 2 cores):
  python benchmarks/bench_multihost.py
  python benchmarks/bench_multihost.py --cases=logreg:4096:64,cnn:256:8 --repeats=5
  python benchmarks/bench_multihost.py --mode=replicas --replica_cases=logreg:16   # ~3 minutes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

from fcfn_jax import distributed  # noqa: E402

flags.DEFINE_enum(
  "mode",
  "round",
  ["round", "replicas"],
  "round: one DP round (--cases); replicas: replicas.run (--replica_cases).",
)
flags.DEFINE_list("cases", ["logreg:4096:64", "cnn:256:8"], "round mode: model:clients:chunk_size per case.")
flags.DEFINE_list("replica_cases", ["logreg:16"], "replicas mode: model:replicas per case.")
flags.DEFINE_integer("clients", 10, "replicas mode: clients of the experiment.")
flags.DEFINE_integer("rounds", 3, "replicas mode: rounds per replica.")
flags.DEFINE_integer("local_steps", 2, "Local DP-SGD steps per client.")
flags.DEFINE_integer("batch_size", 32, "Local batch size.")
flags.DEFINE_integer("capacity", 64, "Examples per client.")
flags.DEFINE_integer("repeats", 3, "Timed rounds per layout (median reported).")
flags.DEFINE_float("timeout_s", 900.0, "Stop a layout's processes after this many seconds.")
flags.DEFINE_string(
  "out", "results/bench_multihost", "Folder for bench_multihost.{json,md} and multihost.csv."
)
flags.DEFINE_string("worker", None, "Internal: time one case (of --mode) in this process.")
FLAGS = flags.FLAGS

LAYOUTS = (("1 process x 1 device", 1, 1), ("1 process x 2 devices", 1, 2), ("2 processes x 1 device", 2, 1))
REPLICA_LAYOUTS = (("1 process", 1, 1), ("2 processes", 2, 1))  # replicas split over processes only
NOISE_MULTIPLIER = 1.0
RESULT = "RESULT "


def time_case(model_name: str, clients: int, chunk: int) -> dict[str, Any]:
  """One case in this process (after ``distributed.initialize``): compile, warm-up, median round time,
  and the median time of the round's all-reduce alone."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from fcfn_jax import federated, models, report
  from fcfn_jax.config import FederatedConfig, PrivacyConfig

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from common import resampled_pool

  pool, classes = resampled_pool(clients, FLAGS.capacity)
  shape = tuple(pool.x.shape[2:])
  model = models.CNN(classes) if model_name == "cnn" else models.LogisticRegression(classes)
  fed = FederatedConfig(local_steps=FLAGS.local_steps, batch_size=FLAGS.batch_size, chunk_size=chunk)
  state = federated.init_server_state(models.init_params(model, jax.random.key(0), shape), fed)
  z, w = np.full(clients, NOISE_MULTIPLIER, np.float32), np.ones(clients, np.float32)
  mesh = federated.client_mesh() if jax.device_count() > 1 else None
  if mesh is None:
    pool = jax.device_put(pool)
  else:
    pool = federated.shard_clients(mesh, clients, lambda rows: jax.tree.map(lambda a: a[rows], pool))
    z, w = federated.pad_sit_outs(z, w, pool.y.shape[0], xp=np)

  def one_round():
    return jax.block_until_ready(
      federated.federated_round(
        state,
        pool,
        z,
        w,
        jax.random.key(1),
        apply_fn=model.apply,
        fed=fed,
        privacy=PrivacyConfig(),
        mesh=mesh,
      )
    )

  def median_s(fn) -> float:
    fn()  # compile and warm up
    return _median_s(fn, FLAGS.repeats)

  with report.Timer() as compile_and_first:
    one_round()
  round_s = median_s(one_round)
  allreduce_s = 0.0
  if mesh is not None:
    # The round's totals: one params-shaped sum and 4 scalars, summed over the client axis.
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    payload = jax.tree.map(lambda p: jnp.zeros((mesh.size, *p.shape), p.dtype), (state.params, jnp.zeros(4)))
    payload = jax.device_put(payload, jax.sharding.NamedSharding(mesh, spec))
    psum = jax.jit(
      jax.shard_map(
        lambda t: jax.lax.psum(jax.tree.map(lambda a: a[0], t), mesh.axis_names),
        mesh=mesh,
        in_specs=spec,
        out_specs=jax.sharding.PartitionSpec(),
      )
    )
    allreduce_s = median_s(lambda: jax.block_until_ready(psum(payload)))
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  return {
    "first_round_s": compile_and_first.elapsed,
    "round_s": round_s,
    "allreduce_s": allreduce_s,
    "comm_share": allreduce_s / round_s,
    "params": params,
  }


def _median_s(fn, repeats: int) -> float:
  """The median wall time of ``repeats`` calls of ``fn``."""
  import numpy as np

  from fcfn_jax import report

  times = []
  for _ in range(repeats):
    with report.Timer() as t:
      fn()
    times.append(t.elapsed)
  return float(np.median(times))


def time_replicas(model_name: str, count: int) -> dict[str, Any]:
  """``replicas.run`` of ``count`` draws in this process (after ``distributed.initialize``; with several
  processes each trains its block): prepare, first (compiling) run, median run, the gather alone."""
  import jax
  import numpy as np

  from fcfn_jax import config as fc
  from fcfn_jax import replicas, report, simulation

  cfg = fc.SimulationConfig(
    data=fc.DataConfig(num_clients=FLAGS.clients, capacity=FLAGS.capacity, test_examples=500),
    model=fc.ModelConfig(model_name),
    federated=fc.FederatedConfig(
      rounds=FLAGS.rounds, local_steps=FLAGS.local_steps, batch_size=FLAGS.batch_size
    ),
    privacy=fc.PrivacyConfig(calibration="traced"),
  )
  with report.Timer() as prepare:
    exp = simulation.prepare(cfg)
  runs = [replicas.Replica(0, d) for d in range(count)]

  def train():
    return replicas.run([exp], runs, progress=False, account=False)

  with report.Timer() as first:
    result = train()
  run_s = _median_s(train, FLAGS.repeats)
  # The gather's payload, dominated by the final states: this process's block of them.
  mine = jax.tree.map(lambda a: np.asarray(a[distributed.process_block(count)]), result.states)
  blocks = [len(range(count)[distributed.process_block(count, p)]) for p in range(jax.process_count())]
  gather_s = _median_s(lambda: distributed.gather_blocks(mine, blocks), FLAGS.repeats)
  return {
    "replicas_per_process": blocks[jax.process_index()],
    "vmap_group": result.timings[0]["group"],
    "prepare_s": prepare.elapsed,
    "first_run_s": first.elapsed,
    "run_s": run_s,
    "gather_s": gather_s,
    "comm_share": gather_s / run_s,
    "final_accuracy_mean": float(np.mean([r["test_accuracy"] for r in result.summary])),
  }


def run_layout(case: str, processes: int, devices: int) -> dict[str, Any]:
  """The case in fresh process(es) of one layout: process 0's result."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  names = ("mode", "local_steps", "batch_size", "capacity", "repeats", "clients", "rounds")
  passed = [f"--{n}={FLAGS[n].value}" for n in names]
  command = [sys.executable, os.path.abspath(__file__), f"--worker={case}", *passed]
  with tempfile.TemporaryDirectory() as logs:
    if processes == 1:
      done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=FLAGS.timeout_s)
      if done.returncode:
        raise RuntimeError(f"{case} failed: {done.stderr[-2000:]}")
      output = done.stdout
    else:
      result = distributed.launch_local(command, processes, logs, FLAGS.timeout_s, env)
      if not result.ok:
        raise RuntimeError(f"{case}: {distributed.describe_failure(result, FLAGS.timeout_s)}")
      output = result.logs[0].read_text()
  line = next(line for line in output.splitlines() if line.startswith(RESULT))
  return json.loads(line[len(RESULT) :])


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.worker:
    distributed.initialize()
    import jax

    if FLAGS.mode == "replicas":
      model_name, count = FLAGS.worker.split(":")
      result = time_replicas(model_name, int(count))
    else:
      model_name, clients, chunk = FLAGS.worker.split(":")
      result = time_case(model_name, int(clients), int(chunk))
    if jax.process_index() == 0:
      print(RESULT + json.dumps(result), flush=True)
    return
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from common import machine, write_tables

  if FLAGS.mode == "replicas":
    bench_replicas(machine, write_tables)
    return
  rows = []
  for case in FLAGS.cases:
    model_name, clients, chunk = case.split(":")
    base = None
    for layout, processes, devices in LAYOUTS:
      result = run_layout(case, processes, devices)
      base = base or result["round_s"]
      rows.append(
        {
          "model": model_name,
          "clients": int(clients),
          "chunk_size": int(chunk),
          "layout": layout,
          **result,
          "speedup_vs_1x1": base / result["round_s"],
        }
      )
      print(f"{case} {layout}: {result['round_s']:.3f} s/round", flush=True)
  meta = {
    **_settings(machine),
    "noise_multiplier": NOISE_MULTIPLIER,
    "note": "round_s = median round time (process 0); allreduce_s = median time of a psum of the round's "
    "totals alone over the same mesh; comm_share = allreduce_s / round_s; first_round_s includes the "
    "compilation; speedup_vs_1x1 = (1 process x 1 device round_s) / round_s, measured in the same run",
  }
  write_tables(FLAGS.out, "bench_multihost", {"multihost": rows}, meta)


def _settings(machine) -> dict:
  """The run's machine and the settings both modes share, for the tables' metadata."""
  return {
    **machine(),
    "local_steps": FLAGS.local_steps,
    "batch_size": FLAGS.batch_size,
    "capacity": FLAGS.capacity,
    "repeats": FLAGS.repeats,
  }


def bench_replicas(machine, write_tables) -> None:
  """The replicas mode: every case in 1 process, then in 2 processes, side by side."""
  rows = []
  for case in FLAGS.replica_cases:
    model_name, count = case.split(":")
    base = None
    for layout, processes, devices in REPLICA_LAYOUTS:
      load_start = os.getloadavg()[0]
      result = run_layout(case, processes, devices)
      base = base or result["run_s"]
      rows.append(
        {
          "model": model_name,
          "replicas": int(count),
          "clients": FLAGS.clients,
          "rounds": FLAGS.rounds,
          "layout": layout,
          **result,
          "speedup_vs_1p": base / result["run_s"],
          "load_start": load_start,
          "load_end": os.getloadavg()[0],
        }
      )
      print(f"{case} {layout}: {result['run_s']:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
  meta = {
    **_settings(machine),
    "note": "run_s = median wall time of replicas.run in process 0 after a first compiling run "
    "(first_run_s), the final gather included; gather_s = median time of gathering the final states "
    "alone; comm_share = gather_s / run_s; speedup_vs_1p = (1 process run_s) / run_s, measured in the "
    "same run; vmap_group = replicas vmapped side by side (process 0); load_start, load_end = the 1-minute "
    "load average when the layout started and ended (a shared machine: with more runnable jobs than cores, "
    "2 processes also get a larger share of the CPU than 1)",
  }
  write_tables(FLAGS.out, "bench_multihost_replicas", {"multihost_replicas": rows}, meta)


if __name__ == "__main__":
  app.run(main)

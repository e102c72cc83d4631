"""Scaling of one federated DP round with the number of clients: wall time, compile time, peak memory.

Each (model, clients) configuration runs in a fresh subprocess, so its peak resident memory (the process
RSS high-water mark, ``ru_maxrss``) is its own; next to it is XLA's compiled memory analysis of the round
(temp = XLA's working buffers, argument = the inputs, mostly the client pool), and the temp size the
same round would need as ONE vmap over all clients (compiled, not run). Clients come from resampling a
train split (``common.resampled_pool``: the embedded FEMNIST digits, or --dataset=cifar10 from
--data_path), every client with --capacity examples. Rounds run in chunks of --chunk_sizes clients so the
working memory stays bounded (auto: the chunk ``federated.chunk_clients`` picks, shown in column chunk). A
size whose round is estimated (linearly from the previous size) to take
longer than --max_round_s is skipped and listed as such.

Example:
  python benchmarks/bench_scaling.py --quick
  python benchmarks/bench_scaling.py --clients=10,100,1000,10000 --models=logreg,cnn
  python benchmarks/bench_scaling.py --dataset=cifar10 --data_path=../shared/data --models=cnn \
      --chunk_sizes=64
  python benchmarks/bench_scaling.py --models=logreg,logreg,logreg,cnn,cnn,cnn \
      --chunk_sizes=auto,32,1000,auto,1,16 --clients=1000   # automatic vs fixed chunks
"""

from __future__ import annotations

import dataclasses
import functools
import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fcfn_jax import federated, models, report
from fcfn_jax.config import FederatedConfig, PrivacyConfig

from common import machine, resampled_pool, write_tables

MODELS = ("logreg", "cnn")

flags.DEFINE_list("models", list(MODELS), f"Models, from {list(MODELS)}.")
flags.DEFINE_list("clients", ["10", "100", "1000", "10000"], "Client counts.")
flags.DEFINE_list(
  "chunk_sizes",
  ["32", "1"],
  "Chunk size per model (same order as --models; a model may repeat): a number, or auto = chunk_size 0, "
  "the chunk federated.chunk_clients picks from the backend's memory budget (the row shows it).",
)
flags.DEFINE_integer("local_steps", 5, "Local DP-SGD steps per client.")
flags.DEFINE_integer("batch_size", 32, "Local batch size.")
flags.DEFINE_integer("capacity", 64, "Examples per client.")
flags.DEFINE_enum(
  "dataset",
  "femnist",
  ["femnist", "cifar10"],
  "Images the clients are resampled from "
  "(femnist: 28x28x1, the EMNIST CNN; cifar10: 32x32x3, the CIFAR CNN).",
)
flags.DEFINE_string(
  "data_path",
  None,
  "The .npz source (file or folder; cifar10: e.g. ../shared/data); None = the embedded FEMNIST digits.",
)
flags.DEFINE_integer("repeats", 3, "Timed rounds per size (1 when a round is estimated above 10 s).")
flags.DEFINE_float("max_round_s", 400.0, "Skip sizes whose round is estimated to take longer.")
flags.DEFINE_string("out", "results/bench_scaling", "Folder for bench_scaling.{json,md} and scaling.csv.")
flags.DEFINE_bool("quick", False, "Smoke run: 10 and 100 clients, 2 local steps, 1 repeat.")
flags.DEFINE_string("single", None, "Internal: 'model:clients:chunk:repeats' = measure one size, print JSON.")
flags.DEFINE_enum(
  "sampling",
  "fixed",
  ["fixed", "poisson"],
  "Sampler of the round: fixed-size batches of B (as the published tables), or Poisson with the default "
  "B_max slots (bench_round.py --modes=sampling measures its cost).",
)
FLAGS = flags.FLAGS

NOISE_MULTIPLIER = 1.0


def measure_one(model_name: str, clients: int, chunk: int, repeats: int) -> dict[str, Any]:
  """One size in this process: compile (AOT), memory analysis, warm-up round, median of timed rounds."""
  pool, classes = resampled_pool(clients, FLAGS.capacity, FLAGS.dataset, FLAGS.data_path)
  pool = jax.device_put(pool)
  shape = tuple(pool.x.shape[2:])
  model = models.CNN(classes) if model_name == "cnn" else models.LogisticRegression(classes)
  fed = FederatedConfig(local_steps=FLAGS.local_steps, batch_size=FLAGS.batch_size, chunk_size=chunk)
  privacy = PrivacyConfig(sampling=FLAGS.sampling)
  state = federated.init_server_state(models.init_params(model, jax.random.key(0), shape), fed)
  round_fn = functools.partial(federated.federated_round, apply_fn=model.apply, fed=fed, privacy=privacy)
  row = jax.ShapeDtypeStruct(pool.x.shape[1:], pool.x.dtype)
  chosen = federated.chunk_clients(fed, privacy, model.apply, state.params, row, clients)
  args = (state, pool, jnp.full(clients, NOISE_MULTIPLIER), jnp.ones(clients), jax.random.key(1))
  with report.Timer() as t:
    compiled = jax.jit(round_fn).lower(*args).compile()
  compile_s = t.elapsed
  memory = compiled.memory_analysis()
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    with report.Timer() as t:
      jax.block_until_ready(compiled(*args))
    times.append(t.elapsed)
  median = float(np.median(times))
  # What one vmap over all clients would need (compiled only, never run: for the CNN it would not fit).
  unchunked = jax.jit(functools.partial(round_fn, fed=dataclasses.replace(fed, chunk_size=clients)))
  unchunked_temp = unchunked.lower(*args).compile().memory_analysis().temp_size_in_bytes
  return {
    "model": model_name,
    "dataset": FLAGS.dataset,
    "clients": clients,
    "chunk_size": "auto" if chunk == 0 else chunk,
    "chunk": chosen,
    "compile_s": compile_s,
    "round_s": median,
    "ms_per_client": 1e3 * median / clients,
    "repeats": repeats,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "xla_temp_mb": memory.temp_size_in_bytes / 2**20,
    "xla_temp_unchunked_mb": unchunked_temp / 2**20,
    "xla_argument_mb": memory.argument_size_in_bytes / 2**20,
    "pool_mb": pool.x.nbytes / 2**20,
  }


def run_sizes(model_name: str, chunk: int, sizes: Sequence[int]) -> list[dict[str, Any]]:
  """Each size in a subprocess, smallest first; skips the rest once the estimate exceeds max_round_s."""
  rows, previous = [], None
  for clients in sizes:
    estimate = previous["round_s"] * clients / previous["clients"] if previous else 0.0
    if estimate > FLAGS.max_round_s:
      rows.append(
        {
          "model": model_name,
          "dataset": FLAGS.dataset,
          "clients": clients,
          "chunk_size": chunk,
          "skipped": f"estimated {estimate:.0f} s per round > --max_round_s={FLAGS.max_round_s:g}",
        }
      )
      continue
    repeats = FLAGS.repeats if estimate < 10 else 1
    flags_passed = [
      f"--{name}={FLAGS[name].value}"
      for name in ("local_steps", "batch_size", "capacity", "dataset", "sampling")
    ]
    flags_passed += [f"--data_path={FLAGS.data_path}"] if FLAGS.data_path else []
    command = [sys.executable, __file__, f"--single={model_name}:{clients}:{chunk}:{repeats}", *flags_passed]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    previous = json.loads(result.stdout.strip().splitlines()[-1])
    print(
      f"{model_name} {clients:>6} clients: {previous['round_s']:.3f} s/round, peak RSS "
      f"{previous['peak_rss_mb']:.0f} MB",
      flush=True,
    )
    rows.append(previous)
  return rows


def main(argv: Sequence[str]) -> None:
  del argv
  if FLAGS.single:
    model_name, clients, chunk, repeats = FLAGS.single.split(":")
    print(json.dumps(measure_one(model_name, int(clients), int(chunk), int(repeats))))
    return
  for name in FLAGS.models:
    if name not in MODELS:
      raise app.UsageError(f"--models has {name!r}: expected a comma list from {list(MODELS)}")
  for chunk in FLAGS.chunk_sizes:
    if chunk != "auto" and not (chunk.isdigit() and int(chunk) >= 1):
      raise app.UsageError(f"--chunk_sizes has {chunk!r}: expected auto or an integer >= 1")
  if len(FLAGS.chunk_sizes) != len(FLAGS.models):
    raise app.UsageError(f"--chunk_sizes={FLAGS.chunk_sizes} needs one entry per model of {FLAGS.models}")
  if FLAGS.dataset == "cifar10" and not FLAGS.data_path:
    raise app.UsageError("--dataset=cifar10 needs --data_path (a CIFAR-10 .npz or the ../shared/data folder)")
  if FLAGS.quick:
    FLAGS.clients, FLAGS.local_steps, FLAGS.repeats = ["10", "100"], 2, 1
  sizes = sorted(int(c) for c in FLAGS.clients)
  rows = []
  for name, chunk in zip(FLAGS.models, FLAGS.chunk_sizes):
    rows += run_sizes(name, 0 if chunk == "auto" else int(chunk), sizes)
  meta = {
    **machine(),
    "dataset": FLAGS.dataset,
    "local_steps": FLAGS.local_steps,
    "batch_size": FLAGS.batch_size,
    "capacity": FLAGS.capacity,
    "noise_multiplier": NOISE_MULTIPLIER,
    "memory": "peak_rss_mb = the subprocess's RSS high-water mark (ru_maxrss; includes the host "
    "copy of the pool and the Python/JAX runtime); xla_temp_mb / xla_argument_mb = the "
    "compiled round's memory_analysis(); xla_temp_unchunked_mb = the same for "
    "chunk_size = clients (one vmap over all clients), compiled only",
  }
  write_tables(FLAGS.out, "bench_scaling", {"scaling": rows}, meta)


if __name__ == "__main__":
  app.run(main)

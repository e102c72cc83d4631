"""Shared by the benchmark scripts: interleaved timing with separate compile time, FLOPs, machine info,
resampled EMNIST client pools and result tables (no flags here)."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax import data, report
from fcfn_jax.config import DataConfig


class Case(NamedTuple):
  """A timed case: ``prepare()`` compiles / warms up and returns (run, flops): ``run()`` blocks until done
  and returns the result; flops = XLA cost-analysis FLOPs of one run, or None."""

  name: str
  prepare: Callable[[], tuple[Callable[[], Any], float | None]]


def flops_of(compiled: Any) -> float:
  """XLA cost-analysis FLOPs of a compiled program (a loop body counts once: not for programs with loops)."""
  return float(compiled.cost_analysis().get("flops", float("nan")))


def jit_case(name: str, fn: Callable[..., Any], *args: Any, flops: float | None = None) -> Case:
  """Case of ``jax.jit(fn)(*args)``: compile time = AOT lower + compile; flops from XLA's cost analysis
  unless given (XLA counts a loop body once, so programs with loops must pass ``flops``)."""

  def prepare():
    compiled = jax.jit(fn).lower(*args).compile()
    return (lambda: jax.block_until_ready(compiled(*args))), (flops_of(compiled) if flops is None else flops)

  return Case(name, prepare)


def measure(cases: Sequence[Case], repeats: int) -> tuple[list[dict[str, Any]], list[Any]]:
  """Prepares every case (timing it), runs each once untimed, then ``repeats`` interleaved timed rounds.

  Returns one row per case (compile_s, median_s, min_s; gflops and gflop_per_s when flops are known) and
  each case's output of its untimed run.
  """
  runs, flops, compile_s, outputs = [], [], [], []
  for case in cases:
    with report.Timer() as t:
      run, case_flops = case.prepare()
    runs.append(run)
    flops.append(case_flops)
    compile_s.append(t.elapsed)
    outputs.append(run())
  times = [[] for _ in cases]
  for _ in range(repeats):
    for run, out in zip(runs, times):
      with report.Timer() as t:
        run()
      out.append(t.elapsed)
  rows = []
  for case, c, ts, f in zip(cases, compile_s, times, flops):
    row = {
      "case": case.name,
      "compile_s": c,
      "median_s": float(np.median(ts)),
      "min_s": float(np.min(ts)),
      "repeats": repeats,
    }
    if f is not None:
      row.update(gflops=f / 1e9, gflop_per_s=f / 1e9 / row["median_s"])
    rows.append(row)
  return rows, outputs


def matmul_peak_case(size: int = 2048) -> Case:
  """A float32 [size, size] @ [size, size] matmul: the machine's practical FLOP/s ceiling."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  return jit_case(f"matmul {size}x{size} f32 (peak reference)", lambda m: m @ m, a)


def machine() -> dict[str, Any]:
  """What ran the benchmark: CPU model and cores, JAX version and devices."""
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  return {
    "cpu": cpu,
    "cpu_cores": os.cpu_count(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def resampled_pool(
  clients: int, capacity: int, dataset: str = "femnist", path: str | None = None, seed: int = 0
) -> tuple[data.ClientPool, int]:
  """(pool of ``clients`` full clients resampled from a train split, classes).

  dataset 'femnist' without ``path``: the embedded FEMNIST-digits data; otherwise the ``.npz`` source at
  ``path`` (e.g. ../shared/data for CIFAR-10). For client counts beyond the real clients: speed does not
  depend on which images a client holds.
  """
  source = "embedded" if path is None and dataset == "femnist" else "npz"
  partition = "writer" if dataset == "femnist" else "iid"
  train = data.load_splits(DataConfig(dataset=dataset, source=source, path=path, partition=partition)).train
  rows = np.random.default_rng(seed).integers(0, train.y.shape[0], (clients, capacity))
  pool = data.ClientPool(train.x[rows], train.y[rows], np.full(clients, capacity, np.int32))
  return pool, train.num_classes


def write_tables(out: str, name: str, tables: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> None:
  """Prints every table and writes ``{name}.json`` (meta + tables), ``{name}.md`` and ``{table}.csv``."""
  os.makedirs(out, exist_ok=True)
  md = [f"# {name}", "", "```", *(f"{k}: {v}" for k, v in meta.items()), "```"]
  for table, rows in tables.items():
    print(f"\n== {table} ==\n{report.format_table(rows)}")
    report.write_csv_atomic(os.path.join(out, f"{table}.csv"), rows)
    md += ["", f"## {table}", "", report.markdown_table(rows)]
  report.write_json_atomic(os.path.join(out, f"{name}.json"), {"meta": meta, "tables": tables})
  report.write_text_atomic(os.path.join(out, f"{name}.md"), "\n".join(md) + "\n")
  print(f"\nwrote {out}/{name}.{{json,md}} and {', '.join(f'{t}.csv' for t in tables)}")

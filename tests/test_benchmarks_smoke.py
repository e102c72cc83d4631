"""Smoke runs of the benchmark scripts (benchmarks/*.py) at the tiniest sizes their flags allow.

Each script runs in a subprocess as a user runs it (``python benchmarks/<script>``: it imports
``benchmarks/common.py`` from its own folder), writing into tmp_path; the test reads back the CSV and JSON it
wrote and checks the columns and that every timing is a finite duration >= 0 (the figures themselves are
not checked: the machine is shared). Runs that compile many programs or start several processes are marked
slow (run them with -m slow).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from .cli import REPO, env

EMBEDDED = os.path.join(REPO, "fcfn_jax", "assets", "femnist_digits.npz")
# The columns every common.measure table has (bench_round).
MEASURED = ("case", "compile_s", "median_s", "min_s", "repeats")
# bench_round.MODES
ROUND_MODES = ("methods", "overhead", "chunks", "loop", "sampling", "blocks", "accountant")


def _run(tmp_path, script: str, *flags: str, timeout: float = 600.0) -> str:
  """Runs ``benchmarks/<script>`` with ``flags`` and ``--out=tmp_path/out``; returns that folder."""
  out = str(tmp_path / "out")
  # One plain CPU device, as a user's run has (the tests' XLA_FLAGS asks for four).
  proc = subprocess.run(
    [sys.executable, os.path.join(REPO, "benchmarks", script), *flags, f"--out={out}"],
    cwd=tmp_path,
    env=env(XLA_FLAGS=""),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def _read(out: str, name: str, table: str | None) -> tuple[list[str], list[dict]]:
  """(the header of ``{table or name}.csv``, the rows of that table in ``{name}.json``)."""
  with open(os.path.join(out, f"{table or name}.csv"), newline="") as f:
    header = next(csv.reader(f))
  with open(os.path.join(out, f"{name}.json")) as f:
    written = json.load(f)
  rows = written["rows"] if table is None else written["tables"][table]
  assert rows, f"{name}.json has no rows"
  assert list(dict.fromkeys(c for row in rows for c in row)) == header  # the CSV's and the JSON's table
  return header, rows


def _check(header, rows, columns, durations) -> None:
  """``columns`` are in the table (in order); every ``durations`` cell is a finite number >= 0."""
  assert [c for c in header if c in columns] == list(columns), header
  for row in rows:
    for column in durations:
      value = row[column]
      assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (column, row)


def test_bench_game_closed_form_and_generic_solver(tmp_path):
  out = _run(tmp_path, "bench_game.py", "--sizes=4", "--games=2", "--repeats=1", "--leader_max_clients=0")
  header, rows = _read(out, "bench_game", None)
  _check(header, rows, ("clients", "games", "method", "compile_s", "run_s", "per_game_ms", "ratio"), ())
  assert [r["method"] for r in rows] == ["closed_form", "generic", "generic_caps", "generic_grad"]
  _check(header, rows, (), ("compile_s", "run_s", "per_game_ms", "ratio"))
  generic = rows[1]
  assert generic["max_rel_diff"] < 1e-4  # uncapped, the generic solver is the closed form (float32)


@pytest.mark.slow  # compiles the capped leader under three valuations and the noise table: ~20 s loaded
def test_bench_game_leader_rows(tmp_path):
  out = _run(tmp_path, "bench_game.py", "--sizes=4", "--games=2", "--repeats=1", "--leader_games=1")
  header, rows = _read(out, "bench_game", None)
  methods = [r["method"] for r in rows]
  assert methods[4:] == ["leader_log", "leader_dp", "noise_table", "leader_dp_accountant"]
  _check(header, rows, ("method", "compile_s", "run_s"), ("compile_s", "run_s", "per_game_ms", "ratio"))


def test_bench_mechanisms_every_column_is_a_measured_duration(tmp_path):
  out = _run(
    tmp_path,
    "bench_mechanisms.py",
    "--clients=8",
    "--mechanisms=posted_price",
    "--rounds=1",
    f"--data_path={EMBEDDED}",
  )
  timings = ("solve_s", "solve_warm_s", "calibration_s", "prepare_s", "round_s", "round_warm_s")
  header, rows = _read(out, "bench_mechanisms", "mechanisms")
  _check(header, rows, ("clients", "mechanism", "participants", *timings, "load"), timings)
  (row,) = rows
  assert (row["clients"], row["mechanism"]) == (8, "posted_price")
  assert 0 <= row["participants"] <= 8
  assert row["calibration_s"] <= row["prepare_s"]  # the calibration is part of prepare


def test_bench_scaling_one_tiny_size(tmp_path):
  out = _run(
    tmp_path,
    "bench_scaling.py",
    "--models=logreg",
    "--chunk_sizes=2",
    "--clients=4",
    "--local_steps=1",
    "--capacity=8",
    "--batch_size=4",
    "--repeats=1",
  )
  header, rows = _read(out, "bench_scaling", "scaling")
  sizes = ("peak_rss_mb", "xla_temp_mb", "xla_argument_mb", "pool_mb")
  _check(header, rows, ("model", "clients", "chunk_size", "compile_s", "round_s", *sizes), ("compile_s",))
  (row,) = rows
  assert (row["model"], row["clients"], row["chunk"]) == ("logreg", 4, 2)
  _check(header, rows, (), ("round_s", "ms_per_client", *sizes))


@pytest.mark.slow  # two sides of simulation.run / replicas.run compiled: ~35 s loaded
def test_bench_replicas_sides_train_the_same_models(tmp_path):
  out = _run(
    tmp_path,
    "bench_replicas.py",
    "--models=logreg",
    "--replicas=2",
    "--clients=4",
    "--rounds=1",
    "--local_steps=1",
    "--repeats=1",
  )
  timings = ("sequential_s", "replicas_s", "prepare_s")
  header, rows = _read(out, "bench_replicas", "replicas")
  columns = ("model", "replicas", "sequential_s", "replicas_s", "speedup", "prepare_s", "max_param_diff")
  _check(header, rows, columns, (*timings, "speedup"))
  (row,) = rows
  assert row["max_param_diff"] <= 1e-6  # R sequential runs and one replicas.run train the same models


@pytest.mark.slow  # the forward run, the hypergradient and the jvp compiled (float64): ~100 s loaded
def test_bench_hypergrad_reverse_and_forward_mode_agree(tmp_path):
  out = _run(
    tmp_path,
    "bench_hypergrad.py",
    "--models=logreg",
    "--clients=4",
    "--capacity=16",
    "--test_examples=60",
    "--rounds=1",
    "--local_steps=1",
    "--batch_size=4",
    "--draws=2",
    "--repeats=1",
  )
  header, rows = _read(out, "bench_hypergrad", "hypergrad")
  sizes = ("temp_mb", "argument_mb", "output_mb")
  _check(header, rows, (*MEASURED, "model", "time_vs_forward", *sizes), (*MEASURED[1:4], *sizes))
  assert [r["case"] for r in rows] == ["forward", "reverse", "forward_mode"]
  # dU/dR per draw by reverse mode and by forward mode: the same derivative (|dU/dR| ~ 1 here).
  assert all(r["max_grad_diff_reverse_vs_forward_mode"] <= 1e-6 for r in rows)


@pytest.mark.slow  # three layouts, each in fresh processes (two of them gloo-connected): ~40 s loaded
def test_bench_multihost_round_layouts(tmp_path):
  out = _run(
    tmp_path,
    "bench_multihost.py",
    "--cases=logreg:4:2",
    "--local_steps=1",
    "--batch_size=4",
    "--capacity=8",
    "--repeats=1",
    "--timeout_s=300",
  )
  timings = ("first_round_s", "round_s", "allreduce_s")
  header, rows = _read(out, "bench_multihost", "multihost")
  _check(header, rows, ("model", "clients", "layout", *timings, "speedup_vs_1x1"), timings)
  assert [r["layout"] for r in rows] == [
    "1 process x 1 device",
    "1 process x 2 devices",
    "2 processes x 1 device",
  ]
  assert rows[0]["allreduce_s"] == 0  # one device: no all-reduce


@pytest.mark.slow  # a few processes each compiling replicas.run: ~1 minute loaded
def test_bench_multihost_replicas_layouts(tmp_path):
  out = _run(
    tmp_path,
    "bench_multihost.py",
    "--mode=replicas",
    "--replica_cases=logreg:2",
    "--clients=4",
    "--rounds=1",
    "--local_steps=1",
    "--repeats=1",
    "--timeout_s=300",
  )
  timings = ("run_s", "gather_s")
  header, rows = _read(out, "bench_multihost_replicas", "multihost_replicas")
  _check(header, rows, ("model", "replicas", "layout", *timings, "speedup_vs_1p"), timings)
  assert [r["layout"] for r in rows] == ["1 process", "2 processes"]


@pytest.mark.slow  # --quick still compiles several CNN rounds per table: 40-120 s each loaded
@pytest.mark.parametrize("mode", ROUND_MODES)
def test_bench_round_quick_table(tmp_path, mode):
  out = _run(tmp_path, "bench_round.py", "--quick", f"--modes={mode}")
  header, rows = _read(out, "bench_round", mode)
  _check(header, rows, MEASURED, ("compile_s", "median_s", "min_s"))

"""Two processes of one JAX program on this machine (``distributed.launch_local``, gloo collectives) give
the single-process results: the DP round with its clients split over the processes, the game sweep, a
checkpointed simulation resumed across launches, a study's replicas split over the processes (and the
study script end to end); only process 0 writes; a failing process ends the run. The host-side split of
the replicas (blocks, uneven splits, the order restored after the gather) is also tested in-process.

Each test launches tests/multiprocess_program.py (one CPU device per process: the test session's forced
host-device count is left out of their environment) and compares with the same case run here in one
process (tests/multiprocess_cases.py).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fcfn_jax import config as fc
from fcfn_jax import distributed, replicas, simulation, validate

from . import multiprocess_cases as cases
from .cli import REPO, TINY

PROGRAM = os.path.join(REPO, "tests", "multiprocess_program.py")
TIMEOUT_S = 300.0


def _env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def _launch(command: list[str], log_dir) -> distributed.LaunchResult:
  result = distributed.launch_local(command, 2, log_dir, timeout_s=TIMEOUT_S, env=_env())
  assert result.ok, distributed.describe_failure(result, TIMEOUT_S)
  return result


def _program(tmp_path, *flags: str, out: str = "out") -> tuple[str, list[str]]:
  """Runs the program in 2 processes with ``flags``: (results folder, the processes' logs)."""
  folder = str(tmp_path / out)
  result = _launch([sys.executable, PROGRAM, f"--out={folder}", *flags], tmp_path / f"logs_{out}")
  return folder, [log.read_text() for log in result.logs]


def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
  return {prefix + jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def _assert_close(
  saved: str, expected: dict[str, np.ndarray], exact: bool = False, atol: float = 1e-6
) -> None:
  with np.load(saved) as got:
    assert sorted(got.files) == sorted(expected)
    for name, value in expected.items():
      if exact:
        np.testing.assert_array_equal(got[name], value, err_msg=name)
      else:
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=atol, err_msg=name)


def test_two_processes_split_the_round_write_once_and_share_checkpoints(tmp_path):
  """The CI smoke: one launch of 2 processes checks the round, the loading, the results and checkpoints."""
  folder, logs = _program(tmp_path, "--checks=round,checkpoint,blocks", "--clients=7", "--rounds=2")
  # Each process loaded only its own clients: 7 clients padded to 8 on 2 devices, 4 per process.
  for i, log in enumerate(logs):
    assert re.findall(r"^ROWS .*$", log, re.M) == [f"ROWS {i} {4 * i} {min(4 * i + 4, 7)}"]
  # A host-side split (the replicas'): 5 items as blocks of 3 and 2, gathered whole, dtypes kept.
  assert [re.findall(r"^BLOCK .*$", log, re.M) for log in logs] == [["BLOCK 0 0 1 2"], ["BLOCK 1 3 4"]]
  ids = np.arange(cases.BLOCK_ITEMS)
  expected = {"id": ids, "value": ids / 3.0, "pair": np.stack([ids, -ids], axis=1).astype(np.int32)}
  _assert_close(os.path.join(folder, "blocks.npz"), expected, exact=True)
  with np.load(os.path.join(folder, "blocks.npz")) as got:
    assert {k: got[k].dtype for k in got.files} == {k: v.dtype for k, v in expected.items()}
  # 2 processes == 1 process: the same keys, so the same round up to the order of the float sums.
  state, history = cases.run_rounds("logreg", 7, 2)
  _assert_close(os.path.join(folder, "round.npz"), {**_flat(state, "state"), **_flat(history, "metrics")})
  # Only process 0 printed the header and wrote the one results folder (no staging folder left).
  assert "process 0 of 2, 2 devices" in logs[0] and "DONE 0" in logs[0]
  assert "devices ->" not in logs[1] and "DONE" not in logs[1]
  assert sorted(os.listdir(tmp_path)) == ["logs_out", "out", "out.checkpoints"]
  assert sorted(os.listdir(folder)) == ["blocks.npz", "checkpoint.json", "manifest.json", "round.npz"]
  # Process 0 alone saved (one step, its state); every process restored that step.
  with open(os.path.join(folder, "checkpoint.json")) as f:
    assert json.load(f) == {"step": 1, "metadata": {"by": "p0"}, "steps": [1]}
  for i, log in enumerate(logs):
    assert re.findall(r"^RESTORED .*$", log, re.M) == [f"RESTORED {i} 1 [0.0, 1.0, 2.0] 0"]


@pytest.mark.slow
def test_two_process_cnn_round_equals_one_process_round(tmp_path):
  folder, _ = _program(tmp_path, "--checks=round", "--model=cnn", "--clients=9", "--rounds=2")
  state, history = cases.run_rounds("cnn", 9, 2)
  _assert_close(os.path.join(folder, "round.npz"), {**_flat(state, "state"), **_flat(history, "metrics")})


@pytest.mark.slow
def test_two_process_sweep_equals_one_process_sweep_exactly(tmp_path):
  folder, _ = _program(tmp_path, "--checks=sweep")
  # 1 process x 2 devices runs the same program on each device (the same games per device and chunk):
  # where the devices live changes nothing, to the bit.
  two_devices = str(tmp_path / "two_devices")
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2")
  done = subprocess.run(
    [sys.executable, PROGRAM, "--checks=sweep", f"--out={two_devices}"],
    env=env,
    capture_output=True,
    text=True,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with np.load(os.path.join(two_devices, "sweep.npz")) as expected:
    _assert_close(os.path.join(folder, "sweep.npz"), dict(expected), exact=True)
  # One device compiles another program (no shard_map): the float32 solvers of the social optimum stop
  # within their tolerance of the same optimum (here 2e-4 relative), the closed forms agree to rounding.
  with np.load(os.path.join(folder, "sweep.npz")) as got:
    for name, want in _flat(cases.run_sweep(), "").items():
      np.testing.assert_allclose(got[name], want, rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("calibration", ["exact", "traced"])  # host accountant / jax map, once in prepare
def test_checkpointed_run_resumed_in_two_processes_equals_one_uninterrupted_run(tmp_path, calibration):
  full = simulation.run(cases.simulation_config(calibration=calibration), progress=False)
  flags = ("--checks=simulate", f"--calibration={calibration}")
  partial, _ = _program(tmp_path, *flags, "--stop_after=1")
  with open(os.path.join(partial, "simulate.json")) as f:
    assert len(json.load(f)["history"]) == 1
  folder, logs = _program(tmp_path, *flags)  # the same --out: resumes from <out>.checkpoints
  with open(os.path.join(folder, "simulate.json")) as f:
    resumed = json.load(f)
  assert len(resumed["history"]) == len(full.history) == 3
  for got, want in zip(resumed["history"], full.history):
    assert got.keys() == want.keys()
    for key, value in want.items():
      assert got[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-4, abs=1e-5)), key
  # The privacy ledger (steps per client) and the accounted epsilons are the same, client by client.
  assert [r["steps"] for r in resumed["clients"]] == [r["steps"] for r in full.clients]
  for got, want in zip(resumed["clients"], full.clients):
    assert got["epsilon_spent"] == pytest.approx(want["epsilon_spent"], rel=1e-9)
  # Three rounds of training carry the sums' rounding (2e-5 measured for 'traced', 3e-8 for 'exact').
  _assert_close(os.path.join(folder, "simulate.npz"), _flat(full.state, "state"), atol=1e-4)


@pytest.mark.slow
def test_a_failing_process_ends_the_run_with_its_error(tmp_path):
  start = time.monotonic()
  result = distributed.launch_local(
    [sys.executable, PROGRAM, f"--out={tmp_path / 'out'}", "--fail_in=1"], 2, tmp_path / "logs", 120, _env()
  )
  assert time.monotonic() - start < 100  # process 0 would otherwise wait in the collective for its peer
  assert result.failed == 1 and result.returncodes[1] == 2 and not result.timed_out
  message = distributed.describe_failure(result, 120)
  assert "process 1 exited with status 2" in message
  assert "error: fail_in=1 is this process: failing" in message
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_launch_script_runs_a_comparison_in_two_processes(tmp_path):
  out, logs = tmp_path / "compare", tmp_path / "logs"
  command = [
    sys.executable,
    os.path.join(REPO, "scripts", "launch.py"),
    "--num_processes=2",
    f"--logs={logs}",
  ]
  script = [sys.executable, os.path.join(REPO, "scripts", "compare_mechanisms.py"), *TINY, f"--out={out}"]
  done = subprocess.run(command + ["--", *script], env=_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert "2 processes finished" in done.stdout
  assert "comparison.csv" in os.listdir(out)
  assert "wrote" in (logs / "process_0.log").read_text()
  assert "wrote" not in (logs / "process_1.log").read_text()


def _rows_close(got: list[dict], want: list[dict]) -> None:
  """Rows equal key by key: strings and integers exactly, floats to float32 rounding (NaN = NaN); the wall
  times are left out."""
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for key, value in b.items():
      if key == "wall_time_s":
        continue
      if isinstance(value, float):
        assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
      else:
        assert a[key] == value, key


@pytest.mark.slow
def test_two_process_replicas_equal_one_process_replicas(tmp_path):
  """Each process trains its block of each cohort-size group (groups of 4, 4 and 1 replicas: blocks of
  2 + 2, 2 + 2 and 1 + 0); the gathered rows are the single-process rows in the same order, with the same
  keys and cohorts. Not to the bit: a process vmaps 2 replicas where one process vmaps 4, and XLA's
  batched sums round differently (1.5e-8 measured; the same block alone in one process is bit-equal)."""
  folder, _ = _program(tmp_path, "--checks=replicas")
  with open(os.path.join(folder, "replicas.json")) as f:
    got = json.load(f)
  want = cases.run_replicas()
  _rows_close(got["summary"], want.summary)
  _rows_close(got["history"], want.history)
  assert [t["replicas"] for t in got["timings"]] == [t["replicas"] for t in want.timings] == [1, 4, 4]
  assert got["timings"][0]["padded_replicas"] == 1  # process 1 trained none of the lone replica's group
  assert {t["processes"] for t in got["timings"]} == {2} and "processes" not in want.timings[0]
  _assert_close(os.path.join(folder, "replicas.npz"), _flat(want.states, "states"))


@pytest.mark.slow
def test_study_script_runs_in_two_processes(tmp_path):
  """scripts/study.py under scripts/launch.py: one results folder (process 0's) holding every replica once,
  in the single-process order; 3 seeds make the ceiling's split uneven (2 + 1)."""
  out, logs = tmp_path / "study", tmp_path / "logs"
  launch = [sys.executable, os.path.join(REPO, "scripts", "launch.py"), "--num_processes=2", f"--logs={logs}"]
  script = [
    sys.executable,
    os.path.join(REPO, "scripts", "study.py"),
    "--preset=quick",
    "--settings=femnist_logreg",
    "--seeds=3",
    "--draws=1",
    "--rounds=1",
    "--progress=false",
    f"--out={out}",
  ]
  done = subprocess.run(launch + ["--", *script], env=_env(), capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr
  assert sorted(os.listdir(tmp_path)) == ["logs", "study", "study.units"]
  assert "wrote" in (logs / "process_0.log").read_text()
  assert "wrote" not in (logs / "process_1.log").read_text()
  with open(out / "femnist_logreg_summary.csv") as f:
    rows = list(csv.DictReader(f))
  expected = [(m, str(s)) for s in range(3) for m in fc.MECHANISMS] + [
    ("non_private", str(s)) for s in range(3)
  ]
  assert [(r["mechanism"], r["seed"]) for r in rows] == expected
  assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
  with open(out / "timings.csv") as f:
    trained = [r for r in csv.DictReader(f) if r["part"].startswith("train")]
  assert trained and {r["processes"] for r in trained} == {"2"}


def test_process_blocks_are_contiguous_balanced_and_cover_every_item():
  for processes in (1, 2, 3, 4):
    for count in range(10):
      blocks = [distributed.process_block(count, p, processes) for p in range(processes)]
      assert [i for b in blocks for i in range(count)[b]] == list(range(count))  # in order, each once
      sizes = [len(range(count)[b]) for b in blocks]
      assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # the first take more
  assert distributed.process_block(7) == slice(0, 7)  # a single process: all of them
  with pytest.raises(validate.ConfigError, match=r"process=2 is invalid: expected an integer in \[0, 2\)"):
    distributed.process_block(5, 2, 2)


def test_joined_blocks_restore_the_replicas_order():
  """What replicas.run does with its gathered rows, with the collective replaced by its stacking: uneven
  groups (5, 1 and 2 replicas) over 3 processes, one process with no replica of two groups."""
  sizes = np.array([8, 4, 8, 8, 16, 8, 4, 8])
  groups = [np.flatnonzero(sizes == s) for s in np.unique(sizes)]
  processes = 3
  mine = [replicas.process_replicas(groups, p, processes) for p in range(processes)]
  assert [m.tolist() for m in mine] == [[1, 0, 2, 4], [6, 3, 5], [7]]
  counts = [len(m) for m in mine]
  # Each process's rows (here: the replica's id and a float per replica), padded to one length, stacked.
  padded = np.stack([np.pad(m, (0, max(counts) - len(m)), constant_values=-1) for m in mine])
  joined = distributed.join_blocks({"id": padded, "x": padded / 2.0}, counts)
  order = np.concatenate(mine)
  restored = jax.tree.map(lambda a: a[np.argsort(order)], joined)
  np.testing.assert_array_equal(restored["id"], np.arange(len(sizes)))
  np.testing.assert_array_equal(restored["x"], np.arange(len(sizes)) / 2.0)


def test_gather_blocks_in_one_process_returns_the_block():
  tree = {"a": np.arange(3), "b": np.zeros((3, 2), np.float32)}
  assert distributed.gather_blocks(tree, [3]) is tree
